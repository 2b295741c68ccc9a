"""Compile seconds and step seconds of CLIP's full fine-tuning step, unrolled vs scanned
(``eqxtl.with_scan``), for ViT-B/32 (12 layers) and ViT-L/14 (24 layers).

Issue 15's bar: L/14's full-step compile <= 2x B/32's, with the step time within 5% of the
unrolled step; issue 22's: <= 1.3x. Four storages (``--storages``): ``unrolled`` and
``scanned`` run ``step(model, ...)`` (blocks per block between steps) with
``with_scan(model, False / True)``; ``packed`` and ``packed-auto`` run ``fit``'s step form
(``step.pack`` / ``step.packed``: trained blocks stored stacked between steps), scanned or
with the default flags (``with_scan``'s size rule: unrolled at batch 2). Each (config,
storage) runs in a fresh process (its own peak RSS, no shared
compilation cache) and prints one JSON line; the summary gives the ratios. Compile time is
the ahead-of-time ``lower(...).compile()`` of the step's jitted function (``steps.py``'s
protocol); tracing is timed apart (``trace_s``: Python building the jaxpr, which also grows
with depth when unrolled).

    python benchmarks/compile.py                          # B/32 and L/14, batch 2, 224x224
    python benchmarks/compile.py --configs b32 --batch 4 --rounds 3
    python benchmarks/compile.py --workloads full last2   # last2: head + last 2 layers
    python benchmarks/compile.py --workloads grad --hidden 256   # no optimizer, narrow
    python benchmarks/compile.py --layers 6                 # both widths at one depth
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]

import _common as C  # noqa: E402

CONFIGS = ("b32", "l14")
STORAGES = ("unrolled", "scanned", "packed", "packed-auto")


def _config(name: str, image: int):
    from eqxtl.models import clip

    base = {"b32": clip.CLIP_VIT_B32, "l14": clip.CLIP_VIT_L14}[name]
    return dataclasses.replace(base, projection_dim=None, image_size=image)


def run_one(name: str, storage: str, workload: str, args) -> dict:
    import equinox as eqx
    import jax
    import optax
    from steps import make_batch, spec_for

    import eqxtl
    from eqxtl.models import clip
    from eqxtl.training.packed import Packed

    config = _config(name, args.image)
    if args.layers:
        config = dataclasses.replace(config, num_hidden_layers=args.layers)
    if args.hidden:
        config = dataclasses.replace(
            config,
            hidden_size=args.hidden,
            intermediate_size=4 * args.hidden,
            num_attention_heads=max(1, args.hidden // 64),
        )
    backbone, state = eqx.nn.make_with_state(clip.CLIP_VISION.build)(config, jax.random.key(0))
    model = eqxtl.Classifier(eqx.nn.inference_mode(backbone), C.NUM_CLASSES, key=jax.random.key(1))
    if storage != "packed-auto":  # the default flags: blocks scan by with_scan's size rule
        model = eqxtl.with_scan(model, storage != "unrolled")
    batch = make_batch(args.batch, config.image_size)
    loss_fn = eqxtl.task_loss()
    carry = [None]  # the step form after the timed steps (its layout: still stacked?)
    if workload == "grad":  # forward + backward of everything, no optimizer update
        grad = eqx.filter_jit(
            lambda m: eqx.filter_grad(lambda m: loss_fn(m, state, batch, None)[0])(m)
        )
        start = time.perf_counter()
        lowered = grad.lower(model)
        trace_s = time.perf_counter() - start
        start = time.perf_counter()
        lowered.compile()
        compile_s = time.perf_counter() - start

        def call():
            return grad(model)

    else:
        spec = spec_for(model, workload)
        optimizer = optax.adam(1e-4)
        opt_state = optimizer.init(eqx.filter(model, spec))
        step = eqxtl.make_step(loss_fn, optimizer, spec)
        key = jax.random.key(2)
        # fit's step form (training.packed; unpacked where it does not apply) or the
        # per-block one that step(model, ...) runs
        if storage.startswith("packed"):
            packed = step.pack(model, opt_state)
        else:
            packed = Packed(*eqx.partition(model, spec), opt_state, None, "per block")
        start = time.perf_counter()
        # what step.packed compiles (for packed-auto, unstacked where the blocks run unrolled)
        lowered = step.lower(packed, state, None, batch, key)
        trace_s = time.perf_counter() - start
        start = time.perf_counter()
        lowered.compile()
        compile_s = time.perf_counter() - start
        carry = [packed, state]

        def call():
            p, s, metrics = step.packed(*carry, batch, key)
            carry[:] = [p, s]
            return metrics

    timing = C.measure(call, C.block, rounds=args.rounds, steps=args.steps, warmup=1)
    return {
        "kind": "compile",
        "config": name,
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "tokens": config.num_positions,
        "scan": storage != "unrolled",
        "storage": storage,
        "packed": carry[0] is not None and carry[0].layout is not None,
        "workload": workload,
        "batch": args.batch,
        "trace_s": round(trace_s, 3),
        "compile_s": round(compile_s, 3),
        "sec_per_step": round(timing["sec_per_step"], 4),
        "round_sec_per_step": [round(r, 4) for r in timing["round_sec_per_step"]],
        "peak_rss_mb": round(C.peak_rss_mb(), 1),
    }


def lscpu() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    return {
        "cpu_model": fields.get("Model name", "").strip(),
        "cpus": os.cpu_count(),
        "avx512f": "avx512f" in flags,
        "avx2": "avx2" in flags,
        "amx": any(f.startswith("amx") for f in flags),
    }


def summarize(records: list[dict]) -> str:
    """A table per (config, workload, storage) and L/14's compile over B/32's per storage
    (records without ``storage``, from before it, count as scanned or unrolled)."""
    by = {}
    for r in records:
        if r.get("kind") == "compile":
            storage = r.get("storage", "scanned" if r["scan"] else "unrolled")
            by[(r["config"], storage, r["workload"])] = r
    lines = [
        "| config | workload | storage | compile s | trace s | step s | step / unrolled step |",
        "|---|---|---|---|---|---|---|",
    ]
    for (config, storage, workload), r in by.items():
        base = by.get((config, "unrolled", workload))
        ratio = "—" if base is None else f"{r['sec_per_step'] / base['sec_per_step']:.3f}"
        lines.append(
            f"| {config} ({r['layers']} layers) | {workload} | {storage} | {r['compile_s']:.2f} "
            f"| {r['trace_s']:.2f} | {r['sec_per_step']:.3g} | {ratio} |"
        )
    lines.append("")
    for workload in dict.fromkeys(k[2] for k in by):
        for storage in STORAGES:
            b, lg = by.get(("b32", storage, workload)), by.get(("l14", storage, workload))
            if b and lg:
                # the bar compares the real depths (24 and 12 blocks), not --layers runs
                bar = "same depth" if b["layers"] == lg["layers"] else "issue 22's bar: <= 1.3"
                lines.append(
                    f"{workload}, {storage}: L/14 compile / B/32 compile = "
                    f"{lg['compile_s'] / b['compile_s']:.2f} ({bar})"
                )
    return "\n".join(lines)


def _positive(text: str) -> int:
    """``--layers``: a whole number of blocks, at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of blocks >= 1, got {text!r}")
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument(
        "--workloads", nargs="+", default=["full"], choices=("full", "last2", "grad")
    )
    parser.add_argument("--hidden", type=int, default=None, help="narrower layers (fast)")
    parser.add_argument("--layers", type=_positive, default=None, help="this many blocks (depth)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--out", default=None, help="also append the JSON lines here")
    parser.add_argument(
        "--storages",
        nargs="+",
        default=list(STORAGES),
        choices=STORAGES,
        help="scanned / unrolled: step(model, ...) with with_scan(model, True / False); "
        "packed: fit's step form (blocks stored stacked) with with_scan(model, True); "
        "packed-auto: fit's step form with the default flags (with_scan's size rule)",
    )
    parser.add_argument("--child", nargs=3, metavar=("CONFIG", "STORAGE", "WORKLOAD"))
    args = parser.parse_args(argv)
    if args.child:
        name, storage, workload = args.child
        C.emit(run_one(name, storage, workload, args))
        return
    records = [{"kind": "machine", **lscpu()}]
    C.emit(records[0])
    common = ["--batch", str(args.batch), "--image", str(args.image)]
    common += ["--hidden", str(args.hidden)] if args.hidden else []
    common += ["--layers", str(args.layers)] if args.layers else []
    common += ["--rounds", str(args.rounds), "--steps", str(args.steps)]
    for workload in args.workloads:
        for name in args.configs:
            for storage in args.storages:
                cmd = [sys.executable, __file__, "--child", name, storage, workload, *common]
                records += C.run_children([cmd], on_line=C.emit)
    if args.out:
        with open(args.out, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    print()
    print(summarize(records))


if __name__ == "__main__":
    main()
