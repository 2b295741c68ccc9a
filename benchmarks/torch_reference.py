"""PyTorch reference: the same workloads as ``steps.py`` in PyTorch + transformers 5.

``CLIPVisionModel`` at the ViT-B/32 config, ``ResNetModel`` at the ResNet-50 config,
``ViTModel`` at ViT-B/16 and ``Dinov2Model`` at DINOv2-S/14 (224 positions), random init,
each with a new ``nn.Linear`` head on ``pooler_output``; batch 32, 224x224,
3 classes, ``torch.optim.Adam``. Freezing is ``requires_grad_(False)``; frozen modules run
in ``eval()`` (BatchNorm uses its running statistics), trained ones in ``train()``, like
eqxtl's ``make_step``. ``lora``: Hugging Face PEFT's ``LoraConfig(r=8, lora_alpha=8,
target_modules=_common.LORA_TARGETS[model])`` injected into the backbone, head trained too.
Eager mode (the issue measured ``torch.compile`` at about the same
speed on this CPU), ``torch.set_num_threads(os.cpu_count())``.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` over one extra step (matmuls
and convolutions only, where XLA's cost analysis counts every op): ``gflops_per_s`` is
comparable across frameworks only roughly.

    python benchmarks/torch_reference.py [--models clip resnet50] [--workloads ...] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402


def build(model_name: str, quick: bool):
    """``(model, blocks, image_size)``: backbone + head, and the backbone's blocks in order."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if model_name == "clip":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        kwargs = C.clip_hf_kwargs(quick)
        backbone = CLIPVisionModel(CLIPVisionConfig(**kwargs))
        tower = getattr(backbone, "vision_model", backbone)  # transformers 4 nests it
        blocks = list(tower.encoder.layers)
        features, image = kwargs["hidden_size"], kwargs["image_size"]
    elif model_name == "resnet50":
        from transformers import ResNetConfig, ResNetModel

        config = ResNetConfig()  # the defaults are microsoft/resnet-50's
        if quick:
            config = ResNetConfig(
                embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1]
            )
        backbone = ResNetModel(config)
        blocks = [layer for stage in backbone.encoder.stages for layer in stage.layers]
        features = config.hidden_sizes[-1]
        image = C.QUICK_IMAGE if quick else C.IMAGE
    elif model_name == "vit_b16":
        from transformers import ViTConfig, ViTModel

        kwargs = C.vit_family_hf_kwargs(model_name, quick)
        backbone = ViTModel(ViTConfig(**kwargs))  # with its pooler, as the in21k checkpoint
        # transformers 5 runs ViT's blocks as `layers` (its files still say encoder.layer)
        blocks = list(getattr(backbone, "layers", None) or backbone.encoder.layer)
        features, image = backbone.config.hidden_size, kwargs["image_size"]
    elif model_name == "dinov2_s14":
        from transformers import Dinov2Config, Dinov2Model

        kwargs = C.vit_family_hf_kwargs(model_name, quick)
        backbone = Dinov2Model(Dinov2Config(**kwargs))
        blocks = list(backbone.encoder.layer)
        features, image = kwargs["hidden_size"], kwargs["image_size"]
    else:
        raise ValueError(model_name)

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = backbone
            self.head = nn.Linear(features, C.NUM_CLASSES)

        def forward(self, x):
            pooled = self.backbone(pixel_values=x).pooler_output
            return self.head(pooled.flatten(1))

    return Classifier(), blocks, image


def run_one(model_name: str, workload: str, args) -> None:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count())
    batch_size = C.QUICK_BATCH if args.quick else C.BATCH
    model, blocks, image = build(model_name, args.quick)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, image, image, generator=g)
    y = torch.randint(0, C.NUM_CLASSES, (batch_size,), generator=g)

    if workload == "eval":
        model.eval()

        def call():
            with torch.inference_mode():
                return F.cross_entropy(model(x), y)

    else:
        if workload == "lora":
            import peft

            targets = list(C.LORA_TARGETS[model_name])
            config = peft.LoraConfig(r=C.LORA_RANK, lora_alpha=C.LORA_RANK, target_modules=targets)
            model.backbone = peft.inject_adapter_in_model(config, model.backbone)
            lora = [m for name, m in model.named_modules() if name.endswith(".lora_A")]
            lora += [m for name, m in model.named_modules() if name.endswith(".lora_B")]
            trained = [model.head, *lora]
        elif workload == "full":
            trained = [model]
        elif workload == "head":
            trained = [model.head]
        elif workload == "last2":
            trained = [model.head, *blocks[-2:]]
        else:
            raise ValueError(workload)
        model.requires_grad_(False)
        model.eval()
        for module in trained:
            module.requires_grad_(True)
            module.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=1e-3)

        def call():
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            return loss.detach()

    flops = None
    if not args.no_flops:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            call()
        flops = float(counter.get_total_flops()) or None
    timing = C.measure(call, float, rounds=args.rounds, steps=args.steps, warmup=args.warmup)
    extra = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if workload != "eval":
        extra["trainable_params"] = sum(p.numel() for p in params)
        extra["opt_state_bytes"] = sum(
            t.numel() * t.element_size()
            for state in optimizer.state.values()
            for t in state.values()
            if torch.is_tensor(t) and t.dim() > 0
        )
    if args.quick:
        extra["quick"] = True
    record = C.result(
        "torch",
        model_name,
        workload,
        batch_size,
        timing,
        compile_s=None,
        flops=flops,
        flops_via="FlopCounterMode (matmul/conv only)",
        **extra,
    )
    C.emit(record)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(parser)
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting step")
    args = parser.parse_args(argv)
    extra = ["--no-flops"] if args.no_flops else []
    C.dispatch(os.path.abspath(__file__), args, lambda m, w: run_one(m, w, args), extra=extra)


if __name__ == "__main__":
    main()
