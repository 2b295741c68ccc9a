"""Shared helpers for the benchmark scripts: timing, memory, JSON lines, FLOP counts.

Timing protocol (every framework): the compile (or first call) is measured on its own,
then one untimed warm-up call, then ``rounds`` rounds of ``steps`` calls each; a round ends
by waiting for the device (``block_until_ready`` / returning a Python float), and
``sec_per_step`` is the median over rounds of ``round_time / steps``.

Peak RSS is the process's ``ru_maxrss``: to get one figure per workload, each workload runs
in a fresh subprocess (``run_children``).

This module imports no framework at module level, so the PyTorch reference and the Flax
reference (which runs in its own virtual environment) can use it too.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

WORKLOADS = ("eval", "head", "last2", "full", "lora")
"""eval forward, head-only step, head + last-two-blocks step, full fine-tune step, and a
LoRA step (r=8 adapters + head; ``LORA_TARGETS``), all with Adam."""
MODELS = ("clip", "resnet50", "vit_b16", "dinov2_s14")
"""What the step scripts run by default."""
ALL_MODELS = (*MODELS, "clip_l14")
"""What they can run: also CLIP ViT-L/14's vision tower (the accelerator's scanned row)."""
FLAX_MODELS = ("clip", "resnet50")
"""The models benchmarks/flax_reference.py builds."""
LORA_RANK = 8
LORA_TARGETS = {
    # PEFT's ViT guide: query and value of every block
    "clip": ("q_proj", "v_proj"),
    "clip_l14": ("q_proj", "v_proj"),
    # every convolution inside the residual blocks (1x1 and 3x3)
    "resnet50": ("layer.0.convolution", "layer.1.convolution", "layer.2.convolution"),
}
"""Module-name suffixes (PEFT's ``target_modules`` matching: ``name.endswith(suffix)``);
the ``lora`` workload runs for these models only, and not in the Flax reference."""
BATCH = 32
IMAGE = 224
NUM_CLASSES = 3
QUICK_BATCH = 4
QUICK_IMAGE = 32


# CLIP ViT-B/32's vision tower as ``transformers.CLIPVisionConfig`` keyword arguments (the
# references build their models from these), and the tiny variant of ``--quick`` runs.
# DINOv2-g/14 in transformers' terms (SwiGLU MLP); the giant benchmarks add image_size.
DINOV2_G14_HF = dict(
    hidden_size=1536,
    num_hidden_layers=40,
    num_attention_heads=24,
    mlp_ratio=4,
    use_swiglu_ffn=True,
    patch_size=14,
)
CLIP_B32_HF = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=IMAGE,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
CLIP_L14_HF = dict(  # openai/clip-vit-large-patch14's vision tower
    CLIP_B32_HF,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    patch_size=14,
)
CLIP_QUICK_HF = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=QUICK_IMAGE,
    patch_size=8,
)


# ViT-B/16 (google/vit-base-patch16-224-in21k: ViTModel with its pooler) and DINOv2-S/14
# (facebook/dinov2-small, positions for a 224 input) as transformers config keyword
# arguments, and their tiny ``--quick`` variants; eqxtl builds the same from these.
VIT_B16_HF = dict(image_size=IMAGE, patch_size=16)
VIT_QUICK_HF = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=QUICK_IMAGE,
    patch_size=8,
)
DINOV2_S14_HF = dict(
    hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=IMAGE, patch_size=14
)
DINOV2_QUICK_HF = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14
)


def vit_family_hf_kwargs(model_name: str, quick: bool) -> dict[str, Any]:
    """transformers config keyword arguments of the benchmarked ``vit_b16`` / ``dinov2_s14``."""
    if model_name == "vit_b16":
        return VIT_QUICK_HF if quick else VIT_B16_HF
    return DINOV2_QUICK_HF if quick else DINOV2_S14_HF


def clip_hf_kwargs(quick: bool, model_name: str = "clip") -> dict[str, Any]:
    """``CLIPVisionConfig`` keyword arguments for the benchmarked CLIP (``"clip"``: ViT-B/32,
    ``"clip_l14"``: ViT-L/14; tiny if ``quick``)."""
    full = CLIP_L14_HF if model_name == "clip_l14" else CLIP_B32_HF
    return {**full, **(CLIP_QUICK_HF if quick else {})}


VARIANTS = ("scan", "unrolled", "int8-base")
"""eqxtl-only variants of a step (``steps.py --variant``): ``scan`` / ``unrolled``: the
blocks under ``jax.lax.scan`` (the default; ``eqxtl.with_scan``, which also warns when
nothing can be stacked) / one copy per block (``eqxtl.with_scan(model, False)``);
``int8-base``: the frozen linear weights stored as int8 (``eqxtl.quantize``; the ``lora``
and ``head`` workloads)."""


def workload_label(record: dict[str, Any]) -> str:
    """A step record's workload with its variant, e.g. ``"lora+int8-base"``."""
    variant = record.get("variant")
    return f"{record['workload']}+{variant}" if variant else record["workload"]


def emit(record: dict[str, Any]) -> None:
    """Print one JSON line (flushed, so that a parent reading our stdout sees it at once)."""
    print(json.dumps(record), flush=True)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds)``; ``fn`` must itself wait for its results."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(
    call: Callable[[], Any],
    sync: Callable[[Any], Any],
    *,
    rounds: int,
    steps: int,
    warmup: int = 1,
) -> dict[str, Any]:
    """Time ``call`` (which advances its own state) after ``warmup`` untimed calls.

    ``sync(out)`` blocks until ``out`` is computed. Returns ``sec_per_step`` (median of the
    rounds), ``round_sec_per_step`` (each round) and ``first_call_s`` (the first warm-up,
    which includes compilation when the framework compiles lazily).
    """
    first = None
    for i in range(warmup):
        _, t = timed(lambda: sync(call()))
        if i == 0:
            first = t
    per_round = []
    for _ in range(rounds):
        start = time.perf_counter()
        out = None
        for _ in range(steps):
            out = call()
        sync(out)
        per_round.append((time.perf_counter() - start) / steps)
    return {
        "sec_per_step": statistics.median(per_round),
        "round_sec_per_step": per_round,
        "first_call_s": first,
    }


def result(
    framework: str,
    model: str,
    workload: str,
    batch: int,
    timing: dict[str, Any],
    *,
    compile_s: float | None,
    flops: float | None,
    **extra: Any,
) -> dict[str, Any]:
    """The JSON record every script prints for one workload."""
    sec = timing["sec_per_step"]
    return {
        "framework": framework,
        "model": model,
        "workload": workload,
        "batch": batch,
        "sec_per_step": round(sec, 5),
        "steps_per_s": round(1.0 / sec, 4),
        "images_per_s": round(batch / sec, 3),
        "compile_s": None if compile_s is None else round(compile_s, 3),
        "first_call_s": None
        if timing["first_call_s"] is None
        else round(timing["first_call_s"], 3),
        "gflops_per_s": None if not flops else round(flops / sec / 1e9, 2),
        "gflop_per_step": None if not flops else round(flops / 1e9, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "round_sec_per_step": [round(r, 5) for r in timing["round_sec_per_step"]],
        **extra,
    }


# --------------------------------------------------------------------------------------
# JAX helpers (imported lazily: torch_reference.py does not need JAX)
# --------------------------------------------------------------------------------------


def block(tree: Any) -> Any:
    """``jax.block_until_ready`` on every array of ``tree``; returns ``tree``."""
    import jax

    return jax.block_until_ready(tree)


def jax_device() -> dict[str, Any]:
    """``{"platform": "cpu"|"gpu"|..., "device": device kind}`` of JAX's default device."""
    import jax

    d = jax.devices()[0]
    return {"platform": d.platform, "device": d.device_kind}


def jax_peak_device_mb() -> float | None:
    """Peak accelerator memory in use by this process so far (MiB); ``None`` on CPU."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # backends without memory statistics
        return None
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else round(peak / 2**20, 1)


def peak_gflops(n: int = 4096, reps: int = 5) -> dict[str, float]:
    """GFLOP/s of an f32 ``n x n`` ``jnp.dot`` (the machine's matmul peak for XLA:CPU).

    Returns the median and the best of ``reps`` timed runs after one warm-up.
    """
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        dot(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    flops = 2.0 * n**3
    return {
        "gflops_median": flops / statistics.median(times) / 1e9,
        "gflops_best": flops / min(times) / 1e9,
    }


def cost_flops(compiled: Any) -> float | None:
    """FLOPs from XLA's cost analysis of a compiled executable.

    Accepts a ``jax.stages.Compiled``, an Equinox ``Compiled`` (from
    ``eqx.filter_jit(f).lower(...).compile()``, which wraps one in ``.compiled``), or
    anything with ``cost_analysis()``. jax 0.4 returned a list of dicts, jax >= 0.4.3x a
    dict; both are handled. ``None`` when XLA reports nothing.
    """
    inner = getattr(compiled, "compiled", compiled)
    try:
        analysis = inner.cost_analysis()
    except Exception:  # some backends raise instead of returning nothing
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis:
        return None
    flops = analysis.get("flops")
    return float(flops) if flops and flops > 0 else None


def jit_cost_flops(fn: Callable, *args: Any) -> tuple[float | None, float]:
    """``(flops, compile_seconds)`` of ``fn(*args)`` through plain ``jax.jit``.

    Works for any pytree arguments, Equinox modules included: the arguments are split into
    arrays (traced) and everything else (closed over as static), the route that works with
    jax 0.10 / equinox 0.13 when a wrapper's lowered object has no cost analysis.
    """
    import equinox as eqx
    import jax

    dynamic, static = eqx.partition(args, eqx.is_array)

    def closed(dynamic):
        out = fn(*eqx.combine(dynamic, static))
        return eqx.filter(out, eqx.is_array)

    start = time.perf_counter()
    compiled = jax.jit(closed).lower(dynamic).compile()
    return cost_flops(compiled), time.perf_counter() - start


# --------------------------------------------------------------------------------------
# Running each workload in its own process
# --------------------------------------------------------------------------------------


def run_children(
    commands: Iterable[list[str]],
    *,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    on_line: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Run each command in a fresh process, one at a time.

    Every JSON line a child prints is parsed, passed to ``on_line`` and collected; other
    lines go to our stderr. A child that fails or times out yields an ``{"error": ...}``
    record naming its command.
    """
    records = []
    for cmd in commands:
        cmd = list(cmd)
        try:
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                env={**os.environ, **(env or {})},
                timeout=timeout,
            )
            out, err, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err, rc = f"timed out after {timeout} s", "timeout"
        got_any = False
        for line in out.splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    print(line, file=sys.stderr)
                    continue
                got_any = True
                records.append(record)
                if on_line:
                    on_line(record)
            elif line:
                print(line, file=sys.stderr)
        short = " ".join(os.path.basename(c) if i < 2 else c for i, c in enumerate(cmd))
        if rc != 0:
            tail = "\n".join(err.strip().splitlines()[-15:])
            record = {"error": f"exit {rc}", "command": short, "stderr_tail": tail}
            records.append(record)
            if on_line:
                on_line(record)
            print(f"[{short}] failed ({rc}):\n{tail}", file=sys.stderr)
        elif not got_any:
            print(f"[{short}] printed no result", file=sys.stderr)
    return records


def batch_size(args) -> int:
    """``--batch-size`` if given, else ``QUICK_BATCH`` with ``--quick``, else ``BATCH``."""
    if getattr(args, "batch_size", None):
        return args.batch_size
    return QUICK_BATCH if args.quick else BATCH


def add_common_args(parser) -> None:
    """The options every benchmark script shares."""
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=ALL_MODELS)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"examples per step (default {BATCH}, {QUICK_BATCH} with --quick)",
    )
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds (median taken)")
    parser.add_argument("--steps", type=int, default=1, help="steps per timed round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls after compiling")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"tiny configs, batch {QUICK_BATCH}, {QUICK_IMAGE}x{QUICK_IMAGE}: a smoke run",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every workload in this process (no per-workload peak RSS)",
    )
    parser.add_argument(
        "--subprocesses",
        action="store_true",
        help="with --quick: still one process per workload (the default without --quick)",
    )
    parser.add_argument("--child", action="store_true", help=argparse_suppress())


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def child_argv(script: str, args, model: str, workload: str, extra: list[str] = ()) -> list[str]:
    """Arguments that make ``script`` run one (model, workload) in a child process."""
    argv = [script, "--child", "--models", model, "--workloads", workload]
    argv += ["--rounds", str(args.rounds), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.quick:
        argv.append("--quick")
    if getattr(args, "batch_size", None):
        argv += ["--batch-size", str(args.batch_size)]
    return argv + list(extra)


def dispatch(script: str, args, run_one: Callable[[str, str], None], extra=()) -> None:
    """Run every (model, workload) of ``args``: here (``--child``, ``--in-process``, or
    ``--quick`` without ``--subprocesses``) or each in a fresh child process of ``script``
    (default), forwarding the children's JSON lines."""
    pairs = [(m, w) for m in args.models for w in args.workloads]
    if args.child or args.in_process or (args.quick and not args.subprocesses):
        for model, workload in pairs:
            run_one(model, workload)
        return
    run_children(
        ([sys.executable, *child_argv(script, args, m, w, extra)] for m, w in pairs),
        on_line=lambda r: print(json.dumps(r), flush=True),
    )
