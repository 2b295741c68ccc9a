"""Flax reference: the Flax transfer-learning guide's method on the same workloads.

Run through ``flax_reference.sh``, which builds the environment this needs (transformers<5,
which still has the Flax models, pins huggingface_hub<1: it cannot share eqxtl's venv).

The guide's method: the transformers Flax module (``FlaxCLIPVisionModel(...).module`` /
``FlaxResNetModel(...).module``, here randomly initialised at the ViT-B/32 and ResNet-50
configs) wrapped in a ``Classifier`` with a ``nn.Dense`` head on ``pooler_output``;
``optax.multi_transform`` with ``optax.set_to_zero()`` for frozen parameters and Adam for
the trained ones; gradients of the loss with respect to *all* parameters, under
``jax.jit`` (no donation), and XLA drops what ``set_to_zero`` never reads. ResNet's
BatchNorm runs on batch statistics (``deterministic=False``, ``batch_stats`` mutable) only
for full fine-tuning, on the running ones otherwise (the guide's module takes one flag for
the whole network).

    bash benchmarks/flax_reference.sh [--models clip resnet50] [--workloads ...] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402


def build(model_name: str, quick: bool):
    """``(classifier module, block paths, image size)``; block paths are tuples of param-tree
    keys (under ``backbone``) of the backbone's blocks in forward order."""
    import flax.linen as nn

    if model_name == "clip":
        from transformers import CLIPVisionConfig
        from transformers.models.clip.modeling_flax_clip import FlaxCLIPVisionModule

        kwargs = C.clip_hf_kwargs(quick)
        backbone = FlaxCLIPVisionModule(CLIPVisionConfig(**kwargs))
        blocks = [
            ("vision_model", "encoder", "layers", str(i))
            for i in range(kwargs["num_hidden_layers"])
        ]
        image = kwargs["image_size"]
    elif model_name == "resnet50":
        from transformers import ResNetConfig
        from transformers.models.resnet.modeling_flax_resnet import FlaxResNetModule

        config = ResNetConfig()  # the defaults are microsoft/resnet-50's
        if quick:
            config = ResNetConfig(
                embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1]
            )
        backbone = FlaxResNetModule(config)
        blocks = None  # found from the initialised parameter tree below
        image = C.QUICK_IMAGE if quick else C.IMAGE
    else:
        raise ValueError(model_name)

    class Classifier(nn.Module):
        """The guide's wrapper: backbone, then a Dense head named ``head``."""

        num_classes: int
        backbone: nn.Module

        @nn.compact
        def __call__(self, x, deterministic: bool = True):
            pooled = self.backbone(x, deterministic=deterministic).pooler_output
            pooled = pooled.reshape(pooled.shape[0], -1)
            return nn.Dense(self.num_classes, name="head")(pooled)

    return Classifier(C.NUM_CLASSES, backbone=backbone), blocks, image


def _resnet_blocks(params) -> list[tuple[str, ...]]:
    stages = params["backbone"]["encoder"]["stages"]
    out = []
    for s in sorted(stages, key=int):
        layers = stages[s]["layers"]
        out += [("encoder", "stages", s, "layers", i) for i in sorted(layers, key=int)]
    return out


def run_one(model_name: str, workload: str, args) -> None:
    import flax
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import traverse_util

    batch_size = C.batch_size(args)
    module, blocks, image = build(model_name, args.quick)
    rng = np.random.default_rng(0)
    # The transformers Flax modules take channels-last input (their PreTrainedModel wrapper
    # transposes NCHW first; the guide calls the module directly).
    x = jnp.asarray(rng.normal(size=(batch_size, image, image, 3)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, C.NUM_CLASSES, batch_size).astype(np.int32))
    variables = jax.jit(module.init)(jax.random.key(0), x[:1])
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    if blocks is None:
        blocks = _resnet_blocks(params)

    def loss_of(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    extra = {"flax": flax.__version__, "jax": jax.__version__}
    if workload == "eval":

        @jax.jit
        def eval_step(params, batch_stats, x, y):
            logits = module.apply({"params": params, "batch_stats": batch_stats}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        start = time.perf_counter()
        compiled = eval_step.lower(params, batch_stats, x, y).compile()
        compile_s = time.perf_counter() - start

        def call():
            return compiled(params, batch_stats, x, y)

    else:
        trained = {
            "head": [("head",)],
            "last2": [("head",)] + [("backbone", *b) for b in blocks[-2:]],
            "full": [()],
        }[workload]

        def label(path, _):
            trains = any(tuple(path[: len(p)]) == p for p in trained)
            return "trainable" if trains else "frozen"

        partition = traverse_util.path_aware_map(label, params)
        tx = optax.multi_transform(
            {"trainable": optax.adam(1e-3), "frozen": optax.set_to_zero()}, partition
        )
        opt_state = tx.init(params)
        train_bn = workload == "full" and bool(batch_stats)

        @jax.jit
        def train_step(params, batch_stats, opt_state, x, y):
            def loss_fn(params):
                v = {"params": params, "batch_stats": batch_stats}
                if train_bn:
                    logits, new = module.apply(v, x, deterministic=False, mutable=["batch_stats"])
                    return loss_of(logits), new["batch_stats"]
                return loss_of(module.apply(v, x)), batch_stats

            (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_stats, opt_state, loss

        start = time.perf_counter()
        compiled = train_step.lower(params, batch_stats, opt_state, x, y).compile()
        compile_s = time.perf_counter() - start
        carry = [params, batch_stats, opt_state]

        def call():
            p, b, o, loss = compiled(*carry, x, y)
            carry[:] = [p, b, o]
            return p, b, o, loss

        leaves = traverse_util.flatten_dict(params)
        flat_labels = traverse_util.flatten_dict(partition)
        extra["trainable_params"] = int(
            sum(v.size for k, v in leaves.items() if flat_labels[k] == "trainable")
        )
    flops = C.cost_flops(compiled)
    timing = C.measure(call, C.block, rounds=args.rounds, steps=args.steps, warmup=args.warmup)
    if args.quick:
        extra["quick"] = True
    C.emit(
        C.result(
            "flax",
            model_name,
            workload,
            batch_size,
            timing,
            compile_s=compile_s,
            flops=flops,
            **extra,
        )
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(parser)
    parser.add_argument("--peak", action="store_true", help="only measure the jnp.dot peak")
    args = parser.parse_args(argv)
    if args.peak:
        n = 1024 if args.quick else 4096
        peak = C.peak_gflops(n=n)
        C.emit({"framework": "flax-env", "kind": "peak", "what": f"f32 jnp.dot {n}x{n}", **peak})
        return
    C.dispatch(os.path.abspath(__file__), args, lambda m, w: run_one(m, w, args))


if __name__ == "__main__":
    main()
