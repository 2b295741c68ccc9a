"""PyTorch reference: the same workloads as ``steps.py`` in PyTorch + transformers 5.

``CLIPVisionModel`` at the ViT-B/32 config, ``ResNetModel`` at the ResNet-50 config,
``ViTModel`` at ViT-B/16 and ``Dinov2Model`` at DINOv2-S/14 (224 positions), random init,
each with a new ``nn.Linear`` head on ``pooler_output``; batch 32, 224x224,
3 classes, ``torch.optim.Adam``. Freezing is ``requires_grad_(False)``; frozen modules run
in ``eval()`` (BatchNorm uses its running statistics), trained ones in ``train()``, like
eqxtl's ``make_step``. ``lora``: Hugging Face PEFT's ``LoraConfig(r=8, lora_alpha=8,
target_modules=_common.LORA_TARGETS[model])`` injected into the backbone, head trained too.
Eager mode by default (the issue measured ``torch.compile`` at about the same speed on this
CPU), ``torch.set_num_threads(os.cpu_count())``.

``--compile``: the classifier runs under ``torch.compile`` (``--compile-backend``, default
inductor; the record's framework is ``torch-compile``, ``compile_s`` is the first call minus
a step: Dynamo + the backend's compile of forward and backward). ``--dtype bf16``: the step
runs under ``torch.autocast`` in bfloat16 (float32 master weights, as eqxtl's
``compute_dtype``). ``--device cuda``: on the GPU, with ``cudnn.benchmark`` (XLA autotunes
its convolutions too) and TF32 float32 matmuls (``set_float32_matmul_precision("high")``,
XLA's default precision on GPUs); the record says which.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` over one extra step (matmuls
and convolutions only, where XLA's cost analysis counts every op): ``gflops_per_s`` is
comparable across frameworks only roughly.

    python benchmarks/torch_reference.py [--models clip resnet50] [--workloads ...] [--quick]
    python benchmarks/torch_reference.py --device cuda --compile --dtype bf16 --batch-size 128
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
    if model_name in ("clip", "clip_l14"):
        from transformers import CLIPVisionConfig, CLIPVisionModel

        kwargs = C.clip_hf_kwargs(quick, model_name)
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


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def run_one(model_name: str, workload: str, args) -> None:
    import contextlib

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count())
    device = _device(args.device)
    cuda = device.startswith("cuda")
    extra = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "dtype": args.dtype}
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
        extra["f32_matmul"] = "tf32" if args.tf32 else "ieee"
        torch.cuda.reset_peak_memory_stats(device)
    batch_size = C.batch_size(args)
    model, blocks, image = build(model_name, args.quick)
    model.to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, image, image, generator=g).to(device)
    y = torch.randint(0, C.NUM_CLASSES, (batch_size,), generator=g).to(device)
    eager = model
    if args.compile:
        # A fresh cache per workload: several in one process would otherwise exhaust
        # Dynamo's recompile limit (one code object, Classifier.forward) and fall back to eager.
        torch._dynamo.reset()
        model = torch.compile(model, backend=args.compile_backend)
        extra["compile_backend"] = args.compile_backend

    def autocast():
        if args.dtype == "bf16":
            return torch.autocast(device.split(":")[0], dtype=torch.bfloat16)
        return contextlib.nullcontext()

    if workload == "eval":
        eager.eval()

        def call(net=model):
            with torch.inference_mode(), autocast():
                return F.cross_entropy(net(x), y)

    else:
        if workload == "lora":
            import peft

            targets = list(C.LORA_TARGETS[model_name])
            config = peft.LoraConfig(r=C.LORA_RANK, lora_alpha=C.LORA_RANK, target_modules=targets)
            eager.backbone = peft.inject_adapter_in_model(config, eager.backbone)
            lora = [m for name, m in eager.named_modules() if name.endswith(".lora_A")]
            lora += [m for name, m in eager.named_modules() if name.endswith(".lora_B")]
            trained = [eager.head, *lora]
        elif workload == "full":
            trained = [eager]
        elif workload == "head":
            trained = [eager.head]
        elif workload == "last2":
            trained = [eager.head, *blocks[-2:]]
        else:
            raise ValueError(workload)
        eager.requires_grad_(False)
        eager.eval()
        for module in trained:
            module.requires_grad_(True)
            module.train()
        params = [p for p in eager.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=1e-3)

        def call(net=model):
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = F.cross_entropy(net(x), y)
            loss.backward()
            optimizer.step()
            return loss.detach()

    flops = None
    if not args.no_flops:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            call(eager)  # the same step, uncompiled (the counter cannot see inside a graph)
        flops = float(counter.get_total_flops()) or None
    timing = C.measure(call, float, rounds=args.rounds, steps=args.steps, warmup=args.warmup)
    extra |= {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if cuda:
        extra["peak_device_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
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
    compile_s = None
    if args.compile and timing["first_call_s"] is not None:
        compile_s = max(timing["first_call_s"] - timing["sec_per_step"], 0.0)
    record = C.result(
        "torch-compile" if args.compile else "torch",
        model_name,
        workload,
        batch_size,
        timing,
        compile_s=compile_s,
        flops=flops,
        flops_via="FlopCounterMode (matmul/conv only)",
        **extra,
    )
    C.emit(record)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(parser)
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting step")
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    parser.add_argument("--dtype", default="f32", choices=("f32", "bf16"), help="bf16: autocast")
    parser.add_argument("--compile", action="store_true", help="run under torch.compile")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    parser.add_argument(
        "--no-tf32",
        dest="tf32",
        action="store_false",
        help="on CUDA, float32 matmuls in full IEEE precision (default: TF32, as XLA)",
    )
    args = parser.parse_args(argv)
    extra = ["--no-flops"] if args.no_flops else []
    extra += ["--device", args.device, "--dtype", args.dtype]
    extra += ["--compile-backend", args.compile_backend]
    extra += (["--compile"] if args.compile else []) + ([] if args.tf32 else ["--no-tf32"])
    C.dispatch(os.path.abspath(__file__), args, lambda m, w: run_one(m, w, args), extra=extra)


if __name__ == "__main__":
    main()
