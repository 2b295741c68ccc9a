"""The accelerator benchmark (run by ``accelerator.sh``, which installs what it needs first).

CLIP ViT-B/32 and ResNet-50, float32 and bfloat16, batch 128: eqxtl against PyTorch eager
and ``torch.compile``, through ``run_all.py`` (one process per framework and dtype). Writes
``benchmarks/results/<device>.jsonl`` and prints a table with each step's time, its compile
time and the model FLOP utilisation: achieved FLOP/s over the device's dense peak.

Model FLOPs per step are PyTorch's ``FlopCounterMode`` count of the same step (matmuls and
convolutions: the usual MFU numerator), the same figure for all three frameworks; without
a PyTorch record, eqxtl's XLA cost analysis (which counts every op) stands in. Float32 runs
use TF32 tensor cores on both sides (XLA's default on GPUs; PyTorch is set to match), so
their MFU is against the TF32 peak; bfloat16 runs against the BF16 peak. A device that is
not in ``PEAK_TFLOPS`` gets achieved TFLOP/s only.

    python benchmarks/accelerator.py                 # on a GPU machine, in accelerator.sh's venv
    python benchmarks/accelerator.py --dry-run       # the plan, nothing run
    python benchmarks/accelerator.py --cpu-smoke --out /tmp/smoke.jsonl   # tiny, on CPU
    python benchmarks/accelerator.py --summarize benchmarks/results/nvidia-h100.jsonl
    python benchmarks/accelerator.py --extras-only   # issue 22's rows alone (a short lease)

With more than one GPU visible it then runs ``sharding.py --all-devices`` (multi-device: the
same full fine-tuning step on a data-parallel and on an FSDP mesh over every GPU; XLA's
per-device memory analysis of CLIP ViT-B/16 and ViT-L/14, and the step time of ViT-B/16),
appending its rows to the same file; with one GPU (or on the CPU) it prints why it skips it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run_all  # noqa: E402

# Dense (no structured sparsity) peak TFLOP/s from NVIDIA's datasheets: (float32 on CUDA
# cores, TF32 tensor cores, BF16 tensor cores); datasheets quote tensor-core figures with
# sparsity, twice these. First match on the device name wins (more specific names first).
PEAK_TFLOPS: list[tuple[str, tuple[float, float, float]]] = [
    (r"H200 NVL", (60.0, 417.5, 835.5)),
    (r"H200", (67.0, 494.7, 989.4)),
    (r"H100 NVL", (60.0, 417.5, 835.5)),
    (r"H100 PCIe", (51.2, 378.0, 756.0)),
    (r"H100", (66.9, 494.7, 989.4)),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"A100", (19.5, 156.0, 312.0)),
    (r"L40S", (91.6, 183.0, 362.0)),
    (r"\bL4\b", (30.3, 60.0, 121.0)),
    (r"\bA10\b", (31.2, 62.5, 125.0)),
]

GPU_PLAN = dict(
    models=["clip", "resnet50"],
    workloads=["eval", "full"],
    frameworks=["eqxtl", "torch", "torch-compile"],
    batch_size=128,
    rounds=3,
    steps=10,
    warmup=2,
    # Issue 22's rows, float32, after the main runs: CLIP ViT-L/14's full step scanned (the
    # default), unrolled (eqxtl.with_scan(model, False)) and PyTorch's; the CLIP-B/32 LoRA
    # step on a float32 base, on an int8 base (eqxtl.quantize) and PEFT's.
    extras=[
        # --extras-only: CLIP-B/32's full step first, the compile time L/14's is set against
        dict(models=["clip"], workloads=["full"], frameworks=["eqxtl"], only_alone=True),
        dict(models=["clip_l14"], workloads=["full"], frameworks=["eqxtl", "torch"]),
        dict(models=["clip_l14"], workloads=["full"], frameworks=["eqxtl"], variant="unrolled"),
        dict(models=["clip"], workloads=["lora"], frameworks=["eqxtl", "torch"]),
        dict(models=["clip"], workloads=["lora"], frameworks=["eqxtl"], variant="int8-base"),
    ],
)
# The smoke run (CI, < 1 min on 2 cores): the same processes, records and table, on a tiny
# CLIP's head-only train step (a full step's compile would double the time).
SMOKE_PLAN = dict(
    GPU_PLAN,
    models=["clip"],
    workloads=["head"],
    batch_size=2,
    rounds=1,
    steps=1,
    warmup=1,
    extras=[  # the variants' code paths, on the cheap head-only step
        dict(models=["clip_l14"], workloads=["head"], frameworks=["eqxtl"], variant="unrolled"),
        dict(models=["clip"], workloads=["head"], frameworks=["eqxtl"], variant="int8-base"),
    ],
)


def peak_tflops(device: str, dtype: str, tf32: bool = True) -> float | None:
    """The dense peak for ``dtype`` ("f32" or "bf16") on ``device`` (a CUDA device name),
    or ``None`` for a device not in ``PEAK_TFLOPS``."""
    for pattern, (fp32, tf32_peak, bf16) in PEAK_TFLOPS:
        if re.search(pattern, device):
            return bf16 if dtype == "bf16" else (tf32_peak if tf32 else fp32)
    return None


def _gpu_names() -> list[str] | None:
    """``nvidia-smi``'s GPU names, or ``None`` where it is missing or fails."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def gpu_name() -> str | None:
    """The first GPU's name from ``nvidia-smi`` (no framework is imported here: a JAX
    backend in this process would hold the GPU's memory while the children run)."""
    names = _gpu_names()
    return names[0] if names else None


def visible_gpus() -> int:
    """How many GPUs a child process would see: ``nvidia-smi``'s, narrowed by
    ``CUDA_VISIBLE_DEVICES`` when that is set."""
    n = len(_gpu_names() or [])
    narrowed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if narrowed is not None:
        n = min(n, len([d for d in narrowed.split(",") if d.strip()]))
    return n


def multi_device_plan(n: int, out: str, batch_size: int, cpu_smoke: bool = False):
    """``(command, None)`` for the multi-device run over ``n`` GPUs, or ``(None, why)``
    when it is skipped (one GPU or none, or the CPU smoke run)."""
    if cpu_smoke or n < 2:
        seen = "the CPU smoke run" if cpu_smoke else f"{n} GPU{'' if n == 1 else 's'} visible"
        return None, f"multi-device run (data and fsdp meshes) skipped: {seen}; it needs 2 or more"
    command = [
        sys.executable,
        os.path.join(HERE, "sharding.py"),
        "--all-devices",
        "--batch-size",
        str(batch_size),
        "--time-model",
        "clip-vit-base-patch16",
        "--time-batch",
        str(batch_size),
        "--steps",
        "10",
        "--out",
        out,
    ]
    return command, None


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def run_all_argv(args, plan: dict, extra: dict | None = None) -> list[str]:
    """``run_all.py`` arguments for this plan, or for one of its ``extras`` (float32 only,
    appended to the same records)."""
    if extra is None:
        argv = ["--models", *plan["models"], "--workloads", *args.workloads]
        argv += ["--frameworks", *plan["frameworks"], "--dtype", "bf16"]
    else:
        argv = ["--models", *extra["models"], "--workloads", *extra["workloads"]]
        argv += ["--frameworks", *extra["frameworks"], "--append", "--no-peak"]
        argv += ["--variant", extra["variant"]] if extra.get("variant") else []
    argv += ["--batch-size", str(args.batch_size or plan["batch_size"])]
    argv += ["--rounds", str(plan["rounds"]), "--steps", str(plan["steps"])]
    argv += ["--warmup", str(plan["warmup"]), "--process-per", "framework", "--no-load"]
    argv += ["--out", args.out, "--deadline-s", str(args.budget_s)]
    if args.cpu_smoke:
        # Tiny configs on CPU; torch.compile with the aot_eager backend: Dynamo's capture and
        # AOTAutograd's forward/backward graphs, without inductor's C++ code generation.
        argv += ["--quick", "--device", "cpu", "--compile-backend", "aot_eager"]
    else:
        argv += ["--device", "gpu", "--compile-backend", args.compile_backend]
    return argv


def _steps(records: list[dict]) -> dict[tuple, dict]:
    out = {}
    for r in records:
        if "sec_per_step" in r and "workload" in r:
            out[
                (r["framework"], r["model"], run_all.C.workload_label(r), r.get("dtype", "f32"))
            ] = r
    return out


def _f(x, digits: int = 3) -> str:
    if x is None:
        return "—"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"


def summarize(records: list[dict], device: str | None = None) -> str:
    """Markdown table: per model, workload and dtype, each framework's seconds per step,
    compile seconds, achieved TFLOP/s and MFU; eqxtl's ratio to each PyTorch mode."""
    steps = _steps(records)
    if device is None:
        device = next((r["device"] for r in steps.values() if r.get("device")), "unknown")
    fws = ("eqxtl", "torch", "torch-compile")
    lines = [f"Device: {device}; seconds per step (median), compile s, TFLOP/s, MFU."]
    peaks = {dt: peak_tflops(device, dt) for dt in ("f32", "bf16")}
    if all(p is None for p in peaks.values()):
        lines.append("No peak known for this device: achieved TFLOP/s only, no MFU.")
    else:
        lines.append(
            f"Dense peaks: TF32 {_f(peaks['f32'])}, BF16 {_f(peaks['bf16'])} TFLOP/s "
            "(float32 runs use TF32 tensor cores on both sides)."
        )
    head = "| model | workload | dtype | batch |"
    sep = "|---|---|---|---|"
    for fw in fws:
        head += f" {fw} s | {fw} compile s | {fw} TFLOP/s | {fw} MFU |"
        sep += "---|---|---|---|"
    head += " eqxtl/torch | eqxtl/torch-compile | peak device MB eqxtl / torch |"
    sep += "---|---|---|"
    lines += ["", head, sep]
    keys = sorted({k[1:] for k in steps}, key=lambda k: (k[0], k[1], k[2]))
    for model, workload, dtype in keys:
        plain = workload.split("+")[0]  # a variant (e.g. "lora+int8-base") vs the plain step
        ref = steps.get(("torch", model, plain, "f32")) or steps.get(
            ("torch-compile", model, plain, "f32")
        )
        eq = steps.get(("eqxtl", model, workload, dtype))
        row = f"| {model} | {workload} | {dtype} | {(eq or ref or {}).get('batch', '?')} |"
        for fw in fws:
            r = steps.get((fw, model, workload, dtype))
            if r is None:
                row += " — | — | — | — |"
                continue
            gflop = (ref or r).get("gflop_per_step")
            tflops = None if not gflop else gflop / r["sec_per_step"] / 1e3
            peak = peaks[dtype]
            mfu = None if tflops is None or peak is None else tflops / peak
            mfu_s = "—" if mfu is None else f"{100 * mfu:.1f}%"
            row += f" {_f(r['sec_per_step'])} | {_f(r.get('compile_s'))} | {_f(tflops)} |"
            row += f" {mfu_s} |"
        for fw in ("torch", "torch-compile"):
            r = steps.get((fw, model, plain, dtype))
            ratio = None if eq is None or r is None else eq["sec_per_step"] / r["sec_per_step"]
            row += f" {_f(ratio)} |"
        torch_same = steps.get(("torch", model, plain, dtype)) or {}
        peaks_mb = [(eq or {}).get("peak_device_mb"), torch_same.get("peak_device_mb")]
        lines.append(row + f" {' / '.join(_f(m, 4) for m in peaks_mb)} |")
    lines.append("")
    lines.append(
        "MFU numerator: PyTorch FlopCounterMode FLOPs of the same step (matmul/conv), the "
        "same for every framework; ratios < 1: eqxtl faster."
    )
    problems = [r for r in records if "error" in r or "skipped" in r]
    if problems:
        lines.append("")
        lines.append("Not measured:")
        for r in problems:
            why = r.get("skipped") or r.get("error")
            tail = (r.get("stderr_tail") or "").strip().splitlines()[-1:] or [""]
            lines.append(f"- {r.get('command')}: {why} {tail[0]}".rstrip())
    return "\n".join(lines)


def _shown(cmd: list[str]) -> str:
    return " ".join(os.path.relpath(c, HERE) if c.startswith("/") else c for c in cmd[1:])


def extras(args, plan: dict) -> list[dict]:
    """The plan's extras this run makes: ``only_alone`` ones with ``--extras-only`` alone
    (otherwise the main run has measured them already)."""
    return [e for e in plan["extras"] if args.extras_only or not e.get("only_alone")]


def run_extras(args, plan: dict, start: float) -> list[dict]:
    """The plan's ``extras``, appended to the main run's records, in what is left of the
    budget (a spent budget skips them and says so in the records)."""
    records: list[dict] = []
    for extra in extras(args, plan):
        argv = run_all_argv(args, plan, extra)
        left = args.budget_s - (time.monotonic() - start)
        argv[argv.index("--deadline-s") + 1] = str(max(left, 0.0))
        records += [r for r in run_all.run(run_all.parse_args(argv)) if r.get("kind") != "run"]
    return records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan only")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--out", default=None, help="JSON lines (default results/<device>)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 (2 smoke)")
    parser.add_argument("--workloads", nargs="+", default=None, choices=run_all.C.WORKLOADS)
    parser.add_argument("--budget-s", type=float, default=420.0, help="for all runs together")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--summarize", metavar="JSONL", help="only summarise an earlier run")
    parser.add_argument(
        "--extras-only", action="store_true", help="skip the main run: the plan's extras only"
    )
    args = parser.parse_args(argv)
    if args.summarize:
        with open(args.summarize) as f:
            print(summarize([json.loads(line) for line in f if line.strip()]))
        return
    plan = SMOKE_PLAN if args.cpu_smoke else GPU_PLAN
    args.workloads = args.workloads or plan["workloads"]
    device = "cpu" if args.cpu_smoke else (gpu_name() or "no GPU found")
    if args.out is None:
        args.out = os.path.join(HERE, "results", slug("cpu-smoke" if args.cpu_smoke else device))
        args.out += ".jsonl"
    forwarded = run_all_argv(args, plan)
    if args.dry_run:
        batch = args.batch_size or plan["batch_size"]
        size = "tiny configs, 32x32" if args.cpu_smoke else "full configs, 224x224"
        parsed = run_all.parse_args(forwarded)
        children = run_all.step_commands(parsed, parsed.frameworks)
        print(f"device: {device}")
        print(
            "runs: the plan's extras alone (--extras-only)"
            if args.extras_only
            else f"runs: {', '.join(plan['models'])} x {', '.join(args.workloads)} x f32, bf16 x "
            f"{', '.join(plan['frameworks'])}; batch {batch}, {size}; "
            f"{plan['rounds']} rounds of {plan['steps']} steps after {plan['warmup']} "
            f"warm-up (compile timed apart); {len(children)} processes, one per framework "
            f"and dtype; budget {args.budget_s:.0f} s"
        )
        if not args.extras_only:
            script = os.path.join(HERE, "run_all.py")
            print(f"command: {sys.executable} {script} {' '.join(forwarded)}")
            for cmd in children:
                print("  child: " + _shown(cmd))
        for extra in extras(args, plan):
            parsed = run_all.parse_args(run_all_argv(args, plan, extra))
            for cmd in run_all.step_commands(parsed, parsed.frameworks):
                print("  extra child: " + _shown(cmd))
        print(f"writes: {args.out}")
        multi, why = multi_device_plan(visible_gpus(), args.out, batch, args.cpu_smoke)
        print(why or "multi-device: " + " ".join(multi[1:]))
        return
    if not args.cpu_smoke and device == "no GPU found":
        raise SystemExit("accelerator.py: nvidia-smi finds no GPU (use --cpu-smoke on a CPU).")
    start = time.monotonic()
    records = [] if args.extras_only else run_all.run(run_all.parse_args(forwarded))
    records += run_extras(args, plan, start)
    print()
    print(summarize(records, None if args.cpu_smoke else device))
    batch = args.batch_size or plan["batch_size"]
    multi, why = multi_device_plan(visible_gpus(), args.out, batch, args.cpu_smoke)
    if multi is None:
        print(f"\n{why}")
    else:
        left = args.budget_s - (time.monotonic() - start)
        print(f"\nmulti-device: {' '.join(multi[1:])}", flush=True)
        try:
            subprocess.run(multi, timeout=max(left, 60.0), check=False)
        except subprocess.TimeoutExpired:
            print(f"multi-device run stopped: the budget of {args.budget_s:.0f} s ran out")
    print(f"\nTotal {time.monotonic() - start:.0f} s; records in {args.out}")


if __name__ == "__main__":
    main()
