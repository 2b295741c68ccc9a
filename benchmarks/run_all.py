"""Run eqxtl and the references side by side, save the JSON lines, print the summary.

One run, so that the ratios compare like with like on a noisy machine: for each model and
workload, eqxtl, PyTorch and Flax run back to back, each in a fresh process (its own peak
RSS). The f32 ``jnp.dot`` peak is measured at the start and the end of the run. Then
``load.py`` (``from_pretrained`` vs ``safetensors.numpy.load_file``).

Every record goes to ``benchmarks/results/latest.jsonl`` as it arrives; the summary is a
markdown table, the eqxtl / reference ratios and the bars of issue 6, each marked met or
not met.

    python benchmarks/run_all.py                      # everything, full size (~25 min, 2 cores)
    python benchmarks/run_all.py --quick              # tiny configs, smoke run
    python benchmarks/run_all.py --frameworks eqxtl torch --models clip
    python benchmarks/run_all.py --summarize benchmarks/results/latest.jsonl
    python benchmarks/run_all.py --frameworks eqxtl torch torch-compile --device gpu \
        --batch-size 128 --dtype bf16 --process-per framework   # what accelerator.sh runs

``--dtype bf16`` adds bfloat16 runs of eqxtl and of the PyTorch frameworks (autocast).
``--process-per framework`` runs each (framework, dtype) in one process over every model
and workload (startup and device initialisation paid once; peak RSS is then per process);
``--deadline-s`` stops starting new runs when the time is spent (each is recorded as
skipped).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common as C  # noqa: E402

FRAMEWORKS = ("eqxtl", "torch", "torch-compile", "flax")
DEFAULT_FRAMEWORKS = ("eqxtl", "torch", "flax")
DEFAULT_OUT = os.path.join(HERE, "results", "latest.jsonl")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", HERE, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", HERE, "status", "--porcelain", "--", "../eqxtl"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _command(framework: str, args, model, workload, dtype: str = "f32") -> list[str]:
    """The child command for one framework and dtype; ``model`` and ``workload`` are a name
    each, or lists (``--process-per framework``: one process runs them all)."""
    models = [model] if isinstance(model, str) else list(model)
    workloads = [workload] if isinstance(workload, str) else list(workload)
    script = {"eqxtl": "steps.py", "flax": "flax_reference.sh"}.get(framework, "torch_reference.py")
    argv = C.child_argv(os.path.join(HERE, script), args, models[0], workloads[0])
    argv[argv.index("--models") + 1 : argv.index("--workloads") + 2] = [
        *models,
        "--workloads",
        *workloads,
    ]
    if len(models) * len(workloads) > 1:
        argv.append("--in-process")
    if framework == "eqxtl":
        argv += ["--dtype", dtype, "--platform", _jax_platform(args.device)]
        return [sys.executable, *argv, *(["--variant", args.variant] if args.variant else [])]
    if framework.startswith("torch"):
        argv += ["--dtype", dtype, "--device", _torch_device(args.device)]
        if framework == "torch-compile":
            argv += ["--compile", "--compile-backend", args.compile_backend]
        return [sys.executable, *argv]
    return ["bash", *argv]


def _jax_platform(device: str) -> str:
    return {"gpu": "cuda", "cuda": "cuda"}.get(device, device)


def _torch_device(device: str) -> str:
    return {"gpu": "cuda"}.get(device, device)


def _dtypes(framework: str, args) -> list[str]:
    return ["f32", "bf16"] if args.dtype == "bf16" and framework != "flax" else ["f32"]


def step_commands(args, frameworks: list[str]) -> list[list[str]]:
    """The child processes of the step benchmarks, in running order."""

    def runs(framework: str, model: str, workload: str) -> bool:
        if framework == "flax" and model not in C.FLAX_MODELS:
            return False
        # issue 12: LoRA for eqxtl and PEFT + PyTorch, where defined
        return workload != "lora" or (framework != "flax" and model in C.LORA_TARGETS)

    def models_of(framework: str) -> list[str]:
        return [m for m in args.models if any(runs(framework, m, w) for w in args.workloads)]

    if args.process_per == "framework":
        # In the order given (accelerator.py puts the slow-compiling torch-compile last, so
        # that a spent budget cuts the least).
        return [
            _command(f, args, models_of(f), args.workloads, dtype)
            for f in frameworks
            for dtype in _dtypes(f, args)
            if models_of(f)
        ]
    return [
        _command(f, args, model, workload, dtype)
        for model in args.models
        for workload in args.workloads
        for dtype in ("f32", "bf16")
        for f in frameworks
        if dtype in _dtypes(f, args) and runs(f, model, workload)
    ]


def run(args) -> list[dict]:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    out = open(args.out, "a" if args.append else "w")
    records: list[dict] = []

    def keep(record: dict) -> None:
        records.append(record)
        out.write(json.dumps(record) + "\n")
        out.flush()
        print(json.dumps(record), flush=True)

    keep(
        {
            "kind": "run",
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": platform.node(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "commit": _git_commit(),
            "versions": {
                p: _version(p)
                for p in ("jax", "jaxlib", "equinox", "optax", "torch", "transformers")
            },
            "args": {k: v for k, v in vars(args).items() if k != "summarize"},
        }
    )
    quick = ["--quick"] if args.quick else []
    peak_cmd = [sys.executable, os.path.join(HERE, "steps.py"), "--peak", *quick]
    peak_cmd += ["--platform", _jax_platform(args.device)]
    if not args.no_peak:
        C.run_children([peak_cmd], on_line=lambda r: keep({**r, "when": "start"}))
    deadline = None if args.deadline_s is None else time.monotonic() + args.deadline_s

    def run_in_time(commands: list[list[str]]) -> None:
        for cmd in commands:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left < 1:
                keep({"command": " ".join(cmd[1:]), "skipped": "time budget spent"})
                continue
            C.run_children([cmd], on_line=keep, timeout=left)

    frameworks = list(args.frameworks)
    if "flax" in frameworks:
        # Builds the Flax venv the first time (a few minutes), and checks that it works.
        env = {"JAX_PIN": _version("jax") or ""}
        got = C.run_children(
            [["bash", os.path.join(HERE, "flax_reference.sh"), "--peak", *quick]],
            env=env,
            on_line=keep,
        )
        if not any(r.get("kind") == "peak" for r in got):
            why = next((r.get("stderr_tail") for r in got if "error" in r), "no output")
            keep({"kind": "unavailable", "framework": "flax", "reason": why})
            frameworks.remove("flax")

    run_in_time(step_commands(args, frameworks))

    if not args.no_peak:
        C.run_children([peak_cmd], on_line=lambda r: keep({**r, "when": "end"}))
    if not args.no_load:
        rounds = ["--rounds", str(max(args.rounds, 2))]
        C.run_children(
            [[sys.executable, os.path.join(HERE, "load.py"), *rounds, *quick]], on_line=keep
        )
    out.close()
    return records


# --------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------


def _fmt(x, digits=3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def summarize(records: list[dict]) -> str:
    steps: dict[tuple, dict] = {}
    for r in records:
        if "workload" in r and "sec_per_step" in r:
            key = (r["framework"], r["model"], C.workload_label(r), r.get("dtype", "f32"))
            steps[key] = r  # the last one wins
    peaks = [r for r in records if r.get("kind") == "peak" and r.get("framework") == "jax"]
    load = next((r for r in reversed(records) if r.get("kind") == "load_summary"), None)
    run_info = next((r for r in records if r.get("kind") == "run"), {})
    models = list(dict.fromkeys(k[1] for k in steps))
    workloads = [w for w in C.WORKLOADS if any(k[2] == w for k in steps)]

    def sec(fw, m, w, dtype="f32"):
        r = steps.get((fw, m, w, dtype))
        return None if r is None else r["sec_per_step"]

    def field(fw, m, w, name, dtype="f32"):
        r = steps.get((fw, m, w, dtype))
        return None if r is None else r.get(name)

    has_bf16 = any(k[3] == "bf16" for k in steps)
    lines = []
    if run_info:
        v = run_info.get("versions", {})
        lines.append(
            f"Run {run_info.get('started')} on {run_info.get('cpus')} CPUs, commit "
            f"{run_info.get('commit')}; jax {v.get('jax')}, equinox {v.get('equinox')}, "
            f"torch {v.get('torch')}, transformers {v.get('transformers')} "
            f"(Flax side: see its records). Batch "
            f"{next(iter(steps.values()))['batch'] if steps else '?'}, seconds per step, "
            "median of rounds."
        )
        lines.append("")
    head = (
        "| model | workload | eqxtl | torch | flax | eqxtl/torch | eqxtl/flax "
        "| eqxtl GFLOP/s | eqxtl compile s | RSS MB eqxtl / torch / flax |"
    )
    sep = "|---|---|---|---|---|---|---|---|---|---|"
    if has_bf16:
        head += " eqxtl bf16 |"
        sep += "---|"
    lines += [head, sep]
    for m in models:
        for w in workloads:
            e, t, f = sec("eqxtl", m, w), sec("torch", m, w), sec("flax", m, w)
            rss = " / ".join(
                _fmt(field(fw, m, w, "peak_rss_mb"), 4) for fw in ("eqxtl", "torch", "flax")
            )
            row = (
                f"| {m} | {w} | {_fmt(e)} | {_fmt(t)} | {_fmt(f)} | {_fmt(_ratio(e, t))} "
                f"| {_fmt(_ratio(e, f))} | {_fmt(field('eqxtl', m, w, 'gflops_per_s'))} "
                f"| {_fmt(field('eqxtl', m, w, 'compile_s'))} | {rss} |"
            )
            if has_bf16:
                skipped = steps.get(("eqxtl", m, w, "bf16")) is None
                row += f" {'skipped' if skipped else _fmt(sec('eqxtl', m, w, 'bf16'))} |"
            lines.append(row)
    lines.append("")
    if peaks:
        desc = ", ".join(
            f"{p.get('when', '?')}: median {p['gflops_median']:.0f}, best {p['gflops_best']:.0f}"
            for p in peaks
        )
        lines.append(f"f32 jnp.dot peak (GFLOP/s): {desc}.")
    peak = max((p["gflops_best"] for p in peaks), default=None)

    bars = []

    def bar(name, value, limit, ok_if_le=True, unit="×"):
        if value is None:
            bars.append(f"- [ ] {name}: not measured")
            return
        ok = value <= limit if ok_if_le else value >= limit
        mark = "met" if ok else "NOT met"
        op = "≤" if ok_if_le else "≥"
        bars.append(
            f"- [{'x' if ok else ' '}] {name}: {value:.3g}{unit} ({op} {limit:g}{unit}) — {mark}"
        )

    for m in models:
        bar(
            f"{m}: head-only step / eqxtl eval forward",
            _ratio(sec("eqxtl", m, "head"), sec("eqxtl", m, "eval")),
            1.05,
        )
        bar(
            f"{m}: head-only step / Flax guide head-only",
            _ratio(sec("eqxtl", m, "head"), sec("flax", m, "head")),
            1.0,
        )
        bar(
            f"{m}: full fine-tune / PyTorch full",
            _ratio(sec("eqxtl", m, "full"), sec("torch", m, "full")),
            1.0,
        )
        gf = field("eqxtl", m, "eval", "gflops_per_s")
        bar(
            f"{m}: eval forward GFLOP/s / jnp.dot peak",
            None if gf is None or not peak else gf / peak,
            0.8,
            ok_if_le=False,
        )
        bar(
            f"{m}: peak RSS head-only / eval",
            _ratio(
                field("eqxtl", m, "head", "peak_rss_mb"), field("eqxtl", m, "eval", "peak_rss_mb")
            ),
            1.1,
        )
        if ("eqxtl", m, "lora", "f32") in steps:  # issue 12
            bar(
                f"{m}: LoRA step / eqxtl full fine-tune step",
                _ratio(sec("eqxtl", m, "lora"), sec("eqxtl", m, "full")),
                0.75,
            )
            bar(
                f"{m}: LoRA step / PEFT + PyTorch LoRA step",
                _ratio(sec("eqxtl", m, "lora"), sec("torch", m, "lora")),
                1.0,
            )
            bar(
                f"{m}: LoRA optimizer state / full fine-tune's",
                _ratio(
                    field("eqxtl", m, "lora", "opt_state_bytes"),
                    field("eqxtl", m, "full", "opt_state_bytes"),
                ),
                0.02,
            )
            bar(
                f"{m}: peak RSS LoRA / full fine-tune",
                _ratio(
                    field("eqxtl", m, "lora", "peak_rss_mb"),
                    field("eqxtl", m, "full", "peak_rss_mb"),
                ),
                0.8,
            )
    if load and "time_ratio" in load:
        bar("from_pretrained / safetensors.numpy.load_file (time)", load["time_ratio"], 2.0)
    lines.append("")
    lines.append("Bars (issues 6 and 12):")
    lines += bars
    if load and "time_ratio" in load:
        lines.append("")
        lines.append(
            f"Loading a {load['file_mb']:.0f} MB CLIP-B/32 file: from_pretrained "
            f"{load['eqxtl_s']:.2f} s vs load_file {load['safetensors_s']:.2f} s "
            f"({load['time_ratio']:.2f}×); peak RSS {load['eqxtl_peak_rss_mb']:.0f} vs "
            f"{load['safetensors_peak_rss_mb']:.0f} MB ({load['peak_rss_ratio']:.2f}×), i.e. "
            f"{load['eqxtl_peak_over_file']:.2f}× vs {load['safetensors_peak_over_file']:.2f}× "
            f"the file size (growth while loading: {load['eqxtl_growth_over_file']:.2f}× vs "
            f"{load['safetensors_growth_over_file']:.2f}×)."
        )
    problems = [r for r in records if "error" in r or r.get("kind") == "unavailable"]
    problems += [r for r in records if "skipped" in r]
    if problems:
        lines.append("")
        lines.append("Not measured:")
        for r in problems:
            what = (
                r.get("command")
                or f"{r.get('framework')} {r.get('model', '')} {r.get('workload', '')}"
            )
            why = r.get("skipped") or r.get("reason") or r.get("error")
            tail = (r.get("stderr_tail") or "").strip().splitlines()[-1:] or [""]
            lines.append(f"- {what}: {why} {tail[0]}".rstrip())
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(C.MODELS), choices=C.ALL_MODELS)
    parser.add_argument("--workloads", nargs="+", default=list(C.WORKLOADS), choices=C.WORKLOADS)
    parser.add_argument(
        "--frameworks", nargs="+", default=list(DEFAULT_FRAMEWORKS), choices=FRAMEWORKS
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny configs: a smoke run")
    parser.add_argument(
        "--dtype",
        default="f32",
        choices=("f32", "bf16"),
        help="bf16: add bf16 runs of eqxtl and the PyTorch frameworks",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 (4 --quick)")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "gpu", "auto"),
        help="where eqxtl and PyTorch run (auto: JAX's default device, CUDA when torch has it)",
    )
    parser.add_argument("--compile-backend", default="inductor", help="for torch-compile")
    parser.add_argument("--process-per", choices=("workload", "framework"), default="workload")
    parser.add_argument("--deadline-s", type=float, default=None, help="total time budget")
    parser.add_argument("--no-load", action="store_true", help="skip load.py")
    parser.add_argument("--no-peak", action="store_true", help="skip the jnp.dot peak runs")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON-lines file to write")
    parser.add_argument("--append", action="store_true", help="add to --out, not replace it")
    parser.add_argument(
        "--variant", choices=C.VARIANTS, default=None, help="eqxtl's runs only (steps.py)"
    )
    parser.add_argument("--summarize", metavar="JSONL", help="only summarise an earlier run")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.summarize:
        with open(args.summarize) as f:
            records = [json.loads(line) for line in f if line.strip()]
    else:
        records = run(args)
    print()
    print(summarize(records), flush=True)


if __name__ == "__main__":
    main()
