"""LoRA on a quantized base: CLIP ViT-B/32 (random init of the real config), r=8 adapters on
q_proj and v_proj plus a 3-class head, batch 32, 224x224, ``optax.adam``; the frozen base
stored as float32 (``f32``), as int8 (``int8``: ``eqxtl.quantize(model, spec)``), as 4-bit
NormalFloat (``nf4``: its linear weights; the patch embedding stays float32) or as bfloat16
(``bf16``).

Each base runs in a fresh subprocess (its own peak RSS) and prints one JSON line: seconds
per step, peak RSS, the bytes of the base's weights, and XLA's ``memory_analysis()`` of the
compiled step (arguments, outputs, temporaries: independent of what else the machine runs).

    python benchmarks/quantized.py                    # f32, int8, nf4 and bf16 bases
    python benchmarks/quantized.py --bases f32 int8 --quick
    python benchmarks/quantized.py --bases f32 int8 --build load --remat   # QLoRA's way
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # _common, steps, and eqxtl from this checkout

import _common as C  # noqa: E402

BASES = ("f32", "int8", "nf4", "bf16")


def _memory(compiled) -> dict[str, float]:
    """XLA's memory analysis of a compiled step, in MiB."""
    m = getattr(compiled, "compiled", compiled).memory_analysis()
    fields = ("argument", "output", "alias", "temp", "generated_code")
    return {f"xla_{f}_mb": round(getattr(m, f"{f}_size_in_bytes") / 2**20, 1) for f in fields}


def _rss_mb() -> float:
    """Resident set size now (Linux), in MiB."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    return round(kib / 1024, 1)


def run_one(base: str, args) -> dict:
    import equinox as eqx
    import jax
    import optax
    import steps

    import eqxtl

    if args.build == "quantize":
        model, state, image = steps.build("clip", args.quick)
    else:  # NumPy init; int8: each weight stored as int8 as it is drawn (no float model)
        _, config, image = steps.config_of("clip", args.quick)
        quantized = base if base in ("int8", "nf4") else None
        dtype = jax.numpy.bfloat16 if base == "bf16" else jax.numpy.float32
        backbone, state = eqxtl.from_config(config, quantize=quantized, dtype=dtype)
        model = eqxtl.Classifier(backbone, C.NUM_CLASSES, key=jax.random.key(1))
        del backbone
    model = steps.lora_model(model, "clip")
    if args.remat:
        model = eqxtl.with_remat(eqxtl.with_scan(model))
    spec = eqxtl.lora_spec(model, "head")
    if base != "f32" and args.build == "quantize":
        model = eqxtl.quantize(model, spec, {"bf16": "bfloat16"}.get(base, base))
        gc.collect()  # the float32 base is gone: only the quantized one is referenced
        spec = eqxtl.lora_spec(model, "head")
    frozen_bytes = sum(x.nbytes for x in jax.tree.leaves(eqx.partition(model, spec)[1]))
    batch = steps.make_batch(C.batch_size(args), image)
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(eqx.filter(model, spec))
    step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec)
    key = jax.random.key(2)
    start = time.perf_counter()  # step.lower: the compilation the first call then reuses
    compiled = step.lower(model, state, opt_state, batch, key).compile()
    compile_s = time.perf_counter() - start
    carry = [model, state, opt_state]

    def call():
        m, s, o, metrics = step(*carry, batch, key)
        carry[:] = [m, s, o]
        return metrics

    before = _rss_mb()  # the base, the compiled step and what the allocator kept so far
    timing = C.measure(call, C.block, rounds=args.rounds, steps=args.steps, warmup=1)
    return C.result(
        "eqxtl",
        "clip",
        "lora",
        C.batch_size(args),
        timing,
        compile_s=compile_s,
        flops=None,  # XLA's cost analysis counts a scanned loop's body once: steps.py counts
        base=base,
        build=args.build,
        remat=args.remat,
        rss_before_steps_mb=before,
        peak_rss_growth_in_steps_mb=round(C.peak_rss_mb() - before, 1),
        frozen_mb=round(frozen_bytes / 2**20, 1),
        quick=args.quick,
        **_memory(compiled),
        **C.jax_device(),
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bases", nargs="+", default=list(BASES), choices=BASES)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny config: a smoke run")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 (4 --quick)")
    parser.add_argument(
        "--build",
        choices=("quantize", "load"),
        default="quantize",
        help="quantize: build float32, then eqxtl.quantize; load: from_config(quantize=...)",
    )
    parser.add_argument("--remat", action="store_true", help="with_scan + with_remat (both bases)")
    parser.add_argument("--child", choices=BASES, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        C.emit(run_one(args.child, args))
        return
    records = []
    for base in args.bases:  # one fresh process each: its own peak RSS
        argv = [a for a in sys.argv[1:] if a not in args.bases and a != "--bases"]
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", base]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode != 0 or not lines:
            print(f"{base}: failed ({out.returncode})\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        records.append(json.loads(lines[-1]))
        print(lines[-1], flush=True)
    by_base = {r["base"]: r for r in records}
    if "f32" in by_base:
        ref = by_base["f32"]
        for r in records[1:] if records[0] is ref else records:
            if r is ref:
                continue
            print(
                f"{r['base']} / f32: peak RSS {r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x, "
                f"XLA args+temp {(r['xla_argument_mb'] + r['xla_temp_mb']) / (ref['xla_argument_mb'] + ref['xla_temp_mb']):.2f}x, "  # noqa: E501
                f"s/step {r['sec_per_step'] / ref['sec_per_step']:.2f}x"
            )


if __name__ == "__main__":
    main()
