"""Loading benchmark: ``eqxtl.from_pretrained`` vs ``safetensors.numpy.load_file``.

A CLIP ViT-B/32 vision tower (with its visual projection: ~88 M parameters, ~350 MB in
float32) is built from a random init and written with ``eqxtl.save_pretrained`` into a
temporary directory. Each loader then runs in fresh processes (``--rounds`` times each,
alternating), after the file has been read once so that both read from the page cache:

- ``safetensors``: ``safetensors.numpy.load_file(model.safetensors)``;
- ``eqxtl``: ``eqxtl.from_pretrained(directory)`` until every array is ready.

Imports happen before the clock starts. Each run prints a JSON line with its time, the
RSS before loading and the peak RSS; the summary line gives the median time ratio and the
peak-RSS ratios against the file size.

    python benchmarks/load.py [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # _common, and eqxtl from this checkout

import _common as C  # noqa: E402


def _rss_mb() -> float:
    """Current RSS in MiB (from /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def write_checkpoint(directory: str, quick: bool) -> None:
    import dataclasses

    import equinox as eqx
    import jax

    import eqxtl
    from eqxtl.models import clip

    config = clip.CLIP_VIT_B32
    if quick:
        config = dataclasses.replace(
            config,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=64,
        )
    model, state = eqx.nn.make_with_state(clip.CLIP_VISION.build)(config, jax.random.key(0))
    eqxtl.save_pretrained(model, state, directory)
    size = os.path.getsize(os.path.join(directory, "model.safetensors"))
    C.emit({"kind": "checkpoint_written", "file_mb": round(size / 2**20, 1)})


def load_child(loader: str, directory: str) -> None:
    path = os.path.join(directory, "model.safetensors")
    if loader == "safetensors":
        from safetensors.numpy import load_file

        before = _rss_mb()
        start = time.perf_counter()
        tensors = load_file(path)
        seconds = time.perf_counter() - start
        n = len(tensors)
    else:
        import jax

        import eqxtl

        before = _rss_mb()
        start = time.perf_counter()
        model, state = eqxtl.from_pretrained(directory)
        jax.block_until_ready((model, state))
        seconds = time.perf_counter() - start
        n = len(jax.tree.leaves(model))
    C.emit(
        {
            "kind": "load",
            "loader": loader,
            "seconds": round(seconds, 4),
            "rss_before_mb": round(before, 1),
            "peak_rss_mb": round(C.peak_rss_mb(), 1),
            "file_mb": round(os.path.getsize(path) / 2**20, 1),
            "arrays": n,
        }
    )


def summarize(records: list[dict]) -> dict:
    by = {"safetensors": [], "eqxtl": []}
    for r in records:
        if r.get("kind") == "load":
            by[r["loader"]].append(r)
    if not by["safetensors"] or not by["eqxtl"]:
        return {"kind": "load_summary", "error": "a loader produced no result"}
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in by.items()}
    peak = {k: max(r["peak_rss_mb"] for r in v) for k, v in by.items()}
    grow = {k: max(r["peak_rss_mb"] - r["rss_before_mb"] for r in v) for k, v in by.items()}
    file_mb = by["eqxtl"][0]["file_mb"]
    return {
        "kind": "load_summary",
        "file_mb": file_mb,
        "safetensors_s": round(med["safetensors"], 4),
        "eqxtl_s": round(med["eqxtl"], 4),
        "time_ratio": round(med["eqxtl"] / med["safetensors"], 3),
        "safetensors_peak_rss_mb": peak["safetensors"],
        "eqxtl_peak_rss_mb": peak["eqxtl"],
        "peak_rss_ratio": round(peak["eqxtl"] / peak["safetensors"], 3),
        "safetensors_peak_over_file": round(peak["safetensors"] / file_mb, 3),
        "eqxtl_peak_over_file": round(peak["eqxtl"] / file_mb, 3),
        "safetensors_growth_over_file": round(grow["safetensors"] / file_mb, 3),
        "eqxtl_growth_over_file": round(grow["eqxtl"] / file_mb, 3),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per loader")
    parser.add_argument("--quick", action="store_true", help="a small CLIP (smoke run)")
    parser.add_argument("--child", nargs=2, metavar=("LOADER", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--write", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        load_child(*args.child)
        return
    if args.write:
        write_checkpoint(args.write, args.quick)
        return
    with tempfile.TemporaryDirectory(prefix="eqxtl-load-bench-") as directory:
        # Written by a child, so that this process stays small and JAX-free.
        writer = [sys.executable, __file__, "--write", directory]
        C.run_children([writer + (["--quick"] if args.quick else [])])
        path = os.path.join(directory, "model.safetensors")
        if not os.path.exists(path):
            C.emit({"kind": "load_summary", "error": "writing the checkpoint failed"})
            sys.exit(1)
        with open(path, "rb") as f:  # into the page cache: both loaders read from memory
            while f.read(1 << 24):
                pass
        commands = []
        for _ in range(args.rounds):
            for loader in ("safetensors", "eqxtl"):
                commands.append([sys.executable, __file__, "--child", loader, directory])
        records = C.run_children(commands, on_line=C.emit)
    C.emit(summarize(records))


if __name__ == "__main__":
    main()
