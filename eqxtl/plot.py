"""History plots (needs the ``plot`` extra: matplotlib)."""

from __future__ import annotations

import os
from pathlib import Path


def plot_history(history: list[dict], path: str | os.PathLike) -> Path:
    """Train/test loss and accuracy against step, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [h["step"] for h in history]
    for split, style in (("train", "-o"), ("test", "-s")):
        for ax, what in ((ax_loss, "loss"), (ax_acc, "accuracy")):
            pts = [
                (s, h[f"{split}_{what}"])
                for s, h in zip(steps, history, strict=True)
                if f"{split}_{what}" in h
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=split, markersize=3)
    for ax, what in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("step")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


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
