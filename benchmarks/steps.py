"""eqxtl step benchmarks: CLIP ViT-B/32, ResNet-50, ViT-B/16 and DINOv2-S/14, batch 32,
224x224, 3 classes.

Workloads (see ``_common.WORKLOADS``): ``eval`` (``make_eval_step``: forward + loss),
``head`` (head-only step), ``last2`` (head + last two blocks), ``full`` (everything trains),
``lora`` (r=8 LoRA adapters on ``_common.LORA_TARGETS`` + head), all with ``optax.adam``.
Step records carry ``opt_state_bytes`` (Adam's state: what the optimizer keeps per run).
Weights are random (speed does not depend on their values).

Each (model, workload) runs in a fresh subprocess (for its own peak RSS) and prints one
JSON line. Compilation is done ahead of time through ``.lower(...).compile()`` of the very
function the step calls (so it is measured on its own, and XLA's cost analysis of that
executable gives the FLOPs); the timed calls then hit the compilation cache.

    python benchmarks/steps.py                       # everything, full size
    python benchmarks/steps.py --models clip --workloads eval head --rounds 3
    python benchmarks/steps.py --quick               # tiny configs: a smoke run
    python benchmarks/steps.py --peak                # only the f32 4096^2 jnp.dot GFLOP/s
    python benchmarks/steps.py --dtype bf16          # when make_step takes a compute dtype
    python benchmarks/steps.py --remat               # blocks recomputed in the backward pass
    python benchmarks/steps.py --platform gpu --batch-size 128   # on an accelerator
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # _common, and eqxtl from this checkout

import _common as C  # noqa: E402


def _tiny_resnet(resnet):
    base = resnet.RESNET50
    fields = {f.name for f in dataclasses.fields(base)}
    changes = {"embedding_size": 16, "hidden_sizes": (32, 64, 128, 256), "depths": (1, 1, 1, 1)}
    return dataclasses.replace(base, **{k: v for k, v in changes.items() if k in fields})


def config_of(model_name: str, quick: bool):
    """``(architecture, backbone config, image_size)`` of a benchmarked model."""
    from eqxtl.models import clip

    if model_name in ("clip", "clip_l14"):
        arch = clip.CLIP_VISION
        # A plain CLIPVisionModel (no visual projection), as the references build it.
        base = clip.CLIP_VIT_L14 if model_name == "clip_l14" else clip.CLIP_VIT_B32
        config = dataclasses.replace(base, projection_dim=None, image_size=C.IMAGE)
        if quick:
            config = dataclasses.replace(
                config,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=C.QUICK_IMAGE,
                patch_size=8,
            )
        image = config.image_size
    elif model_name == "resnet50":
        from eqxtl.models import resnet

        arch = resnet.RESNET
        config = _tiny_resnet(resnet) if quick else resnet.RESNET50
        image = C.QUICK_IMAGE if quick else C.IMAGE
    elif model_name == "vit_b16":
        from eqxtl.models import vit

        arch = vit.VIT
        config = vit.ViTConfig(**C.vit_family_hf_kwargs(model_name, quick))
        image = config.image_size
    elif model_name == "dinov2_s14":
        from eqxtl.models import dinov2

        arch = dinov2.DINOV2
        config = dinov2.Dinov2Config(**C.vit_family_hf_kwargs(model_name, quick))
        image = config.image_size
    else:
        raise ValueError(model_name)
    return arch, config, image


def build(model_name: str, quick: bool):
    """``(classifier, state, image_size)`` with random weights, in inference mode."""
    import equinox as eqx
    import jax

    import eqxtl

    arch, config, image = config_of(model_name, quick)
    backbone, state = eqx.nn.make_with_state(arch.build)(config, jax.random.key(0))
    backbone = eqx.nn.inference_mode(backbone, True)
    model = eqxtl.Classifier(backbone, C.NUM_CLASSES, key=jax.random.key(1))
    return model, state, image


def make_batch(batch: int, image: int):
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    return {
        "image": jnp.asarray(rng.normal(size=(batch, 3, image, image)).astype(np.float32)),
        "label": jnp.asarray(rng.integers(0, C.NUM_CLASSES, batch).astype(np.int32)),
    }


def lora_model(model, model_name: str):
    """``model`` with r=8 LoRA adapters on the benchmark's targets (alpha = r)."""
    import re

    import jax

    import eqxtl

    names = "|".join(re.escape(t) for t in C.LORA_TARGETS[model_name])
    return eqxtl.lora(model, rf".*\.({names})", rank=C.LORA_RANK, key=jax.random.key(3))


def spec_for(model, workload: str):
    import eqxtl

    if workload == "lora":
        return eqxtl.lora_spec(model, "head")
    if workload == "head":
        return eqxtl.trainable(model, "head")
    if workload == "last2":
        return eqxtl.trainable(model, "head", *eqxtl.last_blocks(model, 2))
    if workload == "full":
        return eqxtl.everything(model)
    raise ValueError(workload)


def unrolled(model):
    """``model`` with its blocks unrolled, for FLOP counts: XLA's cost analysis counts a
    scanned loop's body once."""
    import eqxtl

    try:
        return eqxtl.with_scan(model, False)
    except eqxtl.EqxtlError:  # nothing to unroll (ResNet)
        return model


def run_one(model_name: str, workload: str, args) -> None:
    import equinox as eqx
    import jax
    import optax

    import eqxtl

    batch_size = C.batch_size(args)
    base = {"framework": "eqxtl", "model": model_name, "workload": workload}
    base |= {"batch": batch_size, "dtype": args.dtype}
    # bf16: activations and matmuls in bfloat16, float32 master weights (task_loss)
    compute_dtype = {"f32": None, "bf16": jax.numpy.bfloat16}[args.dtype]
    loss_fn = eqxtl.task_loss(compute_dtype=compute_dtype)

    model, state, image = build(model_name, args.quick)
    batch = make_batch(batch_size, image)
    extra = {"quick": args.quick} if args.quick else {}
    if args.remat:
        model = eqxtl.with_remat(model)
        extra["remat"] = True
    if args.variant in ("scan", "unrolled"):
        model = eqxtl.with_scan(model, args.variant == "scan")
    if args.variant:
        extra["variant"] = args.variant

    if workload == "eval":
        eval_step = eqxtl.make_eval_step(loss_fn)
        inner = getattr(eval_step, "compiled", eval_step)
        compile_s = flops = None
        if hasattr(inner, "lower"):
            # Same cache as the calls below, so compilation is timed on its own.
            start = time.perf_counter()
            inner.lower(model, state, batch).compile()
            compile_s = time.perf_counter() - start
            flops = C.cost_flops(inner.lower(unrolled(model), state, batch).compile())
        else:
            # make_eval_step exposes no compiled function: cost analysis through a separate
            # jax.jit (its own compile); compile_s from the first call below.
            flops, _ = C.jit_cost_flops(eval_step, unrolled(model), state, batch)
            extra["flops_via"] = "jax.jit closure"
        timing = C.measure(
            lambda: eval_step(model, state, batch),
            C.block,
            rounds=args.rounds,
            steps=args.steps,
            warmup=args.warmup,
        )
        if compile_s is None:
            compile_s = timing["first_call_s"] - timing["sec_per_step"]
    else:
        if workload == "lora":
            model = lora_model(model, model_name)
        spec = spec_for(model, workload)
        if args.variant == "int8-base":
            model = eqxtl.quantize(model, spec, "int8")
            spec = spec_for(model, workload)
        optimizer = optax.adam(1e-3)
        opt_state = optimizer.init(eqx.filter(model, spec))
        extra["opt_state_bytes"] = sum(
            x.nbytes for x in jax.tree.leaves(opt_state) if eqx.is_array(x)
        )
        step = eqxtl.make_step(loss_fn, optimizer, spec)
        key = jax.random.key(2)
        extra["trainable_params"] = eqxtl.count(model, spec)
        flat = unrolled(model)  # its own spec and optimizer state (a static field differs)
        flat_spec = spec_for(flat, workload)
        shapes = jax.eval_shape(optimizer.init, eqx.filter(flat, flat_spec))
        flat_step = eqxtl.make_step(loss_fn, optimizer, flat_spec)
        flops = C.cost_flops(flat_step.lower(flat, state, shapes, batch, key).compile())
        del flat
        # --form packed: fit's step form (blocks kept stacked between steps, where they
        # can be; it consumes the model's trainable leaves, as a donating step would)
        packed = step.pack(model, opt_state) if args.form == "packed" else None
        extra["form"] = args.form
        extra["packed"] = packed is not None and packed.layout is not None
        # step.lower: the compilation the first call then reuses (same donation choice)
        start = time.perf_counter()
        step.lower(packed or model, state, opt_state, batch, key).compile()
        compile_s = time.perf_counter() - start
        carry = [model, state, opt_state] if packed is None else [packed, state]
        del model, opt_state, packed

        def call():
            if len(carry) == 2:
                p, s, metrics = step.packed(*carry, batch, key)
                carry[:] = [p, s]
                return p, s, metrics
            m, s, o, metrics = step(*carry, batch, key)
            carry[:] = [m, s, o]
            return m, s, o, metrics

        timing = C.measure(call, C.block, rounds=args.rounds, steps=args.steps, warmup=args.warmup)
        if compile_s is None:
            compile_s = timing["first_call_s"] - timing["sec_per_step"]
    extra |= C.jax_device()
    device_mb = C.jax_peak_device_mb()
    if device_mb is not None:  # in one process over several workloads: the peak so far
        extra["peak_device_mb"] = device_mb
    record = C.result(
        "eqxtl",
        model_name,
        workload,
        batch_size,
        timing,
        compile_s=compile_s,
        flops=flops,
        dtype=args.dtype,
        **extra,
    )
    C.emit(record)


def run_peak(quick: bool) -> None:
    import jax

    n = 1024 if quick else 4096
    peak = C.peak_gflops(n=n)
    C.emit(
        {
            "framework": "jax",
            "kind": "peak",
            "what": f"f32 jnp.dot {n}x{n}",
            "jax": jax.__version__,
            **C.jax_device(),
            **{k: round(v, 2) for k, v in peak.items()},
            "peak_rss_mb": round(C.peak_rss_mb(), 1),
        }
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(parser)
    parser.add_argument("--dtype", default="f32", choices=("f32", "bf16"))
    parser.add_argument("--peak", action="store_true", help="only measure the jnp.dot peak")
    parser.add_argument(
        "--platform",
        default="auto",
        help="JAX platform (cpu, gpu/cuda, tpu); auto: JAX's default device",
    )
    parser.add_argument(
        "--remat",
        action="store_true",
        help="rematerialise each block in the backward pass (eqxtl.with_remat)",
    )
    parser.add_argument(
        "--form",
        choices=("packed", "model"),
        default="packed",
        help="packed: fit's step form (step.pack / step.packed); model: step(model, ...)",
    )
    parser.add_argument("--variant", choices=C.VARIANTS, default=None, help="see _common.VARIANTS")
    args = parser.parse_args(argv)
    if args.variant == "int8-base" and not set(args.workloads) <= {"lora", "head", "last2"}:
        parser.error("--variant int8-base needs a frozen base: workloads lora, head, last2")
    if args.platform != "auto":
        os.environ["JAX_PLATFORMS"] = args.platform  # before jax is imported (lazily)
    if args.peak:
        run_peak(args.quick)
        return
    C.dispatch(
        os.path.abspath(__file__),
        args,
        lambda m, w: run_one(m, w, args),
        extra=["--dtype", args.dtype, "--platform", args.platform, "--form", args.form]
        + (["--remat"] if args.remat else [])
        + (["--variant", args.variant] if args.variant else []),
    )


if __name__ == "__main__":
    main()
