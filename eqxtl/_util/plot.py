"""History plots (needs the ``plot`` extra: matplotlib)."""

from __future__ import annotations

import os
from pathlib import Path


def plot_history(
    history: list[dict], path: str | os.PathLike, *, steps: list[dict] | None = None
) -> Path:
    """``fit``'s history as a PNG, written atomically: on the left the training loss of
    every step (``steps``: ``{"step", "loss"}`` records) and the train/test loss of each
    evaluation; on the right every other metric per evaluation (accuracy, MAE..., and
    those callbacks add, such as ``fewshot_5shot_accuracy``). Phase changes are marked with
    dashed vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    steps = steps or []
    if steps:
        xs = [s["step"] for s in steps]
        ax_loss.plot(xs, [s["loss"] for s in steps], "-", lw=0.8, alpha=0.5, label="train (step)")
    metrics = sorted(
        {
            k.split("_", 1)[1]
            for h in history
            for k in h
            if k.startswith(("train_", "test_")) and not k.endswith("_loss")
        }
    )
    added = sorted(  # by callbacks (FewShotEval)
        {
            k
            for h in history
            for k, v in h.items()
            if isinstance(v, float) and not k.startswith(("train_", "test_"))
            and k not in ("epoch", "images_per_sec")
        }
    )  # fmt: skip
    series = [(ax_loss, f"{split}_loss", style) for split, style in _SPLITS]
    series += [(ax_metric, f"{split}_{m}", style) for split, style in _SPLITS for m in metrics]
    series += [(ax_metric, key, "-^") for key in added]
    for ax, key, style in series:
        pts = [(h["step"], h[key]) for h in history if h.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=key, markersize=3)
    phase_starts = _phase_starts(history, steps)
    for ax, what in ((ax_loss, "loss"), (ax_metric, ", ".join(metrics + added) or "metric")):
        for step, phase in phase_starts:
            ax.axvline(step, color="grey", ls="--", lw=0.8)
            ax.text(step, 1.0, f" phase {phase}", transform=ax.get_xaxis_transform(),
                    va="top", fontsize=8, color="grey")  # fmt: skip
        ax.set_xlabel("step")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


_SPLITS = (("train", "-o"), ("test", "-s"))


def _phase_starts(history: list[dict], steps: list[dict]) -> list[tuple[int, int]]:
    """``(first step, phase)`` of each phase after the first."""
    seen: dict[int, int] = {}
    for record in [*steps, *history]:
        if "phase" in record:
            phase, step = record["phase"], record["step"]
            seen[phase] = min(seen.get(phase, step), step)
    return sorted((step - 1, phase) for phase, step in seen.items() if phase > 0)


def plot_wise_ft(records: list[dict], path: str | os.PathLike) -> Path:
    """Accuracy against the interpolation weight alpha (``eqxtl.wise_ft``'s records), one
    line per dataset, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    alphas = [r["alpha"] for r in records]
    for key in [k for k in records[0] if k.endswith("accuracy")]:
        label = key.removesuffix("accuracy").rstrip("_") or "accuracy"
        ax.plot(alphas, [r[key] for r in records], "-o", label=label, markersize=4)
    ax.set_xlabel("alpha (0 = zero-shot, 1 = fine-tuned)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
