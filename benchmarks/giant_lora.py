"""The headline of issue 22: a LoRA step of DINOv2-g/14 (40 blocks, width 1536, SwiGLU MLP,
1.14 B parameters, random init) at batch 8, 224x224, on a CPU machine: eqxtl on an int8 base
beside PEFT's float32 LoRA step on transformers' ``Dinov2Model``.

Both sides: r=8 adapters (alpha 8) on the query and value projections of every block, a
linear 3-class head on the pooled class token, cross-entropy, AdamW over adapters + head.
eqxtl builds the backbone with ``eqxtl.from_config(config, quantize="int8")``: NumPy init,
each linear weight stored as int8 as soon as it is drawn, so the float32 model never exists
(side ``eqxtl-f32``: the same step on a float32 base; ``eqxtl-nf4``: on an NF4 base). The
40 blocks run under one
``jax.lax.scan`` (``eqxtl.with_scan``) and are recomputed in the backward pass
(``eqxtl.with_remat``), without which the activations alone would not fit this machine
(``eqxtl.memory_report`` of the unrolled step; benchmarks/README.md). PEFT keeps the float32
base: side ``peft`` as it comes, side ``peft-ckpt`` with transformers' gradient
checkpointing (``gradient_checkpointing_enable``), what a PEFT user turns on for a giant.

Each side runs in a fresh process (its own peak RSS, ``getrusage`` ``ru_maxrss``; the
eqxtl child prints what it knows before its first step too, so a kill still leaves the
build's RSS and XLA's memory analysis in the record) and appends one JSON line to
``benchmarks/results/giant_lora.jsonl``: seconds per step (the median of the steps after
the first, which compiles / warms up), peak RSS, the machine (AVX flags, load average
before and after, versions) and, for eqxtl, XLA's memory analysis of the compiled step
(``eqxtl.memory_report``).

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python benchmarks/giant_lora.py \
        [--side eqxtl eqxtl-f32 peft peft-ckpt] [--steps 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import _common as C  # the scripts run from benchmarks/ (python benchmarks/NAME.py)

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE)]  # eqxtl from this checkout
RESULTS = os.path.join(_HERE, "results", "giant_lora.jsonl")
SIDES = ("eqxtl", "eqxtl-nf4", "eqxtl-f32", "peft", "peft-ckpt")
BATCH, IMAGE, CLASSES, RANK = 8, 224, 3, 8
MIN_AVAILABLE_GB_FOR_PEFT = 14.0


def _peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    return round(kib / 1024, 1)


def _available_gb() -> float:
    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
    return round(kib / 2**20, 1)


def _machine() -> dict:
    flags = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(
            (ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Model name" in ln), ""
        )
        flags = next((ln for ln in out.splitlines() if ln.startswith("Flags")), "")
    except OSError:
        model = platform.processor()
    avx = sorted({f for f in flags.split() if f.startswith(("avx", "amx", "fma"))})
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "avx_flags": avx,
        "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
    }


def _steps_timing(call, steps: int) -> dict:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return {
        "first_step_s": round(times[0], 2),
        "step_times_s": [round(t, 2) for t in times],
        "sec_per_step": round(statistics.median(times[1:]), 2) if len(times) > 1 else None,
    }


def run_eqxtl(steps: int, base: str, unrolled: bool = False) -> dict:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import eqxtl
    from eqxtl.models import dinov2

    config = dataclasses.replace(dinov2.DINOV2_G14, image_size=IMAGE)
    start = time.perf_counter()
    # int8 / nf4: each weight is drawn and stored small before the next, never the f32 model
    quantize = None if base == "f32" else base
    backbone, state = eqxtl.from_config(config, quantize=quantize)
    rss_built = _rss_mb()
    model = eqxtl.Classifier(backbone, CLASSES, key=jax.random.key(1))
    del backbone
    model = eqxtl.lora(model, r".*\.(query|value)", rank=RANK, key=jax.random.key(3))
    model = eqxtl.with_remat(eqxtl.with_scan(model, not unrolled))
    spec = eqxtl.lora_spec(model, "head")
    parameters = eqxtl.count(model)  # a quantized weight: the weights it stands for
    trained = sum(x.size for x in jax.tree.leaves(eqx.filter(model, spec)))
    build_s = time.perf_counter() - start
    trainable, frozen = eqx.partition(model, spec)
    frozen_mb = sum(x.nbytes for x in jax.tree.leaves(frozen)) / 2**20
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.normal(size=(BATCH, 3, IMAGE, IMAGE)).astype(np.float32)),
        "label": jnp.asarray(rng.integers(0, CLASSES, BATCH).astype(np.int32)),
    }
    optimizer = optax.adamw(1e-3)
    opt_state = optimizer.init(trainable)
    step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec)
    key = jax.random.key(2)
    start = time.perf_counter()
    report = eqxtl.memory_report(step, model, state, opt_state, batch, key)
    compile_s = time.perf_counter() - start
    xla = {
        f"xla_{f}_mb": round(getattr(report, f) / 2**20, 1)
        for f in ("argument", "output", "alias", "temp", "peak")
    }
    known = {
        "parameters": int(parameters),
        "trained_parameters": int(trained),
        "build_s": round(build_s, 1),
        "build": f"from_config(quantize={quantize}) + lora; "
        + ("with_remat, unrolled" if unrolled else "with_scan + with_remat"),
        "rss_after_build_mb": rss_built,
        "frozen_base_mb": round(frozen_mb, 1),
        "compile_s": round(compile_s, 1),
        **xla,
    }
    print(json.dumps({"partial": known, "peak_rss_mb": _peak_mb()}), flush=True)
    del trainable, frozen
    carry = [model, state, opt_state]
    del model, opt_state

    def call():
        new_model, new_state, new_opt, metrics = step(*carry, batch, key)
        carry[:] = [new_model, new_state, new_opt]
        jax.block_until_ready(metrics)

    rss_before = _rss_mb()
    timing = _steps_timing(call, steps)
    return {
        **known,
        "rss_before_steps_mb": rss_before,
        **timing,
        "versions": {
            "jax": jax.__version__,
            "equinox": eqx.__version__,
            "optax": optax.__version__,
        },
    }


def run_peft(steps: int, checkpointing: bool = False) -> dict:
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    start = time.perf_counter()
    config = transformers.Dinov2Config(**C.DINOV2_G14_HF, image_size=IMAGE)
    backbone = transformers.Dinov2Model(config)
    if checkpointing:
        # non-reentrant: with the reentrant default, frozen inputs would leave the adapters
        # inside each checkpointed block without gradients
        backbone.gradient_checkpointing_enable({"use_reentrant": False})
    parameters = sum(p.numel() for p in backbone.parameters())
    lora_config = peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["q_proj", "v_proj"])
    backbone = peft.get_peft_model(backbone, lora_config)
    head = torch.nn.Linear(config.hidden_size, CLASSES)
    build_s = time.perf_counter() - start
    params = [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters())
    trained = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=g)
    backbone.train()
    got_grads = []

    def call():
        optimizer.zero_grad(set_to_none=True)
        pooled = backbone(pixel_values=images).pooler_output  # the normed class token
        loss = torch.nn.functional.cross_entropy(head(pooled), labels)
        loss.backward()
        got_grads.append(all(p.grad is not None for p in params))
        optimizer.step()

    rss_before = _rss_mb()
    timing = _steps_timing(call, steps)
    return {
        "parameters": int(parameters + sum(p.numel() for p in head.parameters())),
        "trained_parameters": int(trained),
        "build_s": round(build_s, 1),
        "rss_before_steps_mb": rss_before,
        "torch_threads": torch.get_num_threads(),
        "gradient_checkpointing": checkpointing,
        "every_trained_parameter_got_a_gradient": all(got_grads),
        **timing,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
    }


def child(side: str, steps: int, unrolled: bool = False) -> dict:
    base = {
        "benchmark": "giant_lora",
        "side": side,
        "model": "dinov2-giant (DINOv2-g/14, SwiGLU), random init",
        "base": {"eqxtl": "int8", "eqxtl-nf4": "nf4"}.get(side, "float32"),
        "lora": "q,v r=8 alpha=8 + linear head on CLS, AdamW, cross-entropy",
        "batch": BATCH,
        "image": IMAGE,
        "steps": steps,
        "loadavg_before": list(os.getloadavg()),
        "available_gb_before": _available_gb(),
        **_machine(),
    }
    if side.startswith("eqxtl"):
        base_kind = {"eqxtl": "int8", "eqxtl-nf4": "nf4", "eqxtl-f32": "f32"}[side]
        out = run_eqxtl(steps, base_kind, unrolled)
    else:
        out = run_peft(steps, checkpointing=side == "peft-ckpt")
    return {**base, **out, "peak_rss_mb": _peak_mb(), "loadavg_after": list(os.getloadavg())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--steps", type=int, default=3, help="the first compiles / warms up")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument(
        "--unrolled", action="store_true", help="eqxtl sides: with_remat only, no with_scan"
    )
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first one compiles / warms up")
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.unrolled)), flush=True)
        return
    for side in args.side:  # one fresh process each: its own peak RSS
        available = _available_gb()
        if side != "eqxtl" and available < MIN_AVAILABLE_GB_FOR_PEFT:
            record = {
                "benchmark": "giant_lora",
                "side": side,
                "not_run": f"only {available} GB available (< {MIN_AVAILABLE_GB_FOR_PEFT} GB): "
                "the float32 step would risk the shared machine",
                "loadavg_before": list(os.getloadavg()),
                **_machine(),
            }
        else:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", side]
            out = subprocess.run(
                [*cmd, "--steps", str(args.steps), *(["--unrolled"] if args.unrolled else [])],
                capture_output=True,
                text=True,
                check=False,
            )
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            if out.returncode != 0 or not lines or "partial" in json.loads(lines[-1]):
                oom = out.returncode in (-9, 137) or "MemoryError" in out.stderr
                record = {
                    "benchmark": "giant_lora",
                    "side": side,
                    "failed": "out of memory" if oom else f"exit {out.returncode}",
                    "stderr_tail": out.stderr[-1500:],
                    **(json.loads(lines[-1]) if lines else {}),
                    "loadavg_after": list(os.getloadavg()),
                    **_machine(),
                }
            else:
                record = json.loads(lines[-1])
        print(json.dumps(record), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
