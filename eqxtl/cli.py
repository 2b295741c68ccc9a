"""The ``eqxtl`` command: fine-tune, evaluate and use a model on image folders.

    eqxtl train --model resnet50 --data photos/train --val photos/val --train head=1e-3 \\
        --train "backbone.encoder.stages.3=1e-5" --epochs 3 --batch-size 32
    eqxtl train ... --push-to-hub user/pets-resnet50   # then publish best/ with a model card
    eqxtl eval --model runs/train-resnet50/best --data photos/test
    eqxtl predict --model runs/train-resnet50/best cat.jpg dog.png
    eqxtl summary resnet50 --train head
    eqxtl fetch resnet50 clip-vit-base-patch32

Image folders are ``DIR/<class name>/<image>`` (at least 2 classes; any image format PIL
reads). Arguments are parsed before JAX is imported (``--help`` is instant); rules are
checked against the model before any image is read. ``train`` resumes the run in ``--out``
(``--restart`` starts over) and says from which step; Ctrl-C saves it and exits with 130.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
from pathlib import Path

RUNS = Path("runs")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eqxtl", description=__doc__.split("\n\n")[0], formatter_class=_Formatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="fine-tune a model on an image folder")
    train.add_argument("--model", required=True, help="registry alias, hub repo id or folder")
    train.add_argument("--data", required=True, type=Path, help="DIR/<class>/<image>")
    train.add_argument("--val", type=Path, help="validation folder (same classes)")
    train.add_argument(
        "--train",
        action="append",
        required=True,
        metavar="RULE[=LR]",
        help="what trains (a path rule, e.g. head or backbone.encoder.layers.11), at LR "
        "(default --lr); repeat for more groups; everything else is frozen",
    )
    train.add_argument("--lr", type=float, default=1e-3, help="default learning rate")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--epochs", type=int, default=1)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--eval-every", type=int, help="evaluate every N steps")
    train.add_argument("--augment", action="store_true", help="random crops and flips")
    train.add_argument("--bn", choices=("auto", "frozen", "train"), default="auto")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", type=Path, help="run folder (default runs/<data>-<model>)")
    train.add_argument("--restart", action="store_true", help="start over (no resume)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument(
        "--tensorboard", action="store_true", help="event files in <out>/tensorboard"
    )
    train.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="after training, publish the best checkpoint (else the last) to the Hugging "
        "Face Hub repo user/name, with a model card (needs network and a write token)",
    )

    ev = sub.add_parser("eval", help="loss and accuracy of a fine-tuned model on a folder")
    ev.add_argument("--model", required=True, help="a folder written by eqxtl train")
    ev.add_argument("--data", required=True, type=Path)
    ev.add_argument("--batch-size", type=int, default=32)

    pr = sub.add_parser("predict", help="class of each image file")
    pr.add_argument("--model", required=True, help="a folder written by eqxtl train")
    pr.add_argument("files", nargs="+", type=Path, metavar="FILES")
    pr.add_argument("--batch-size", type=int, default=32)

    su = sub.add_parser(
        "summary", help="what trains, per module, in the model `train` builds (with its head)"
    )
    su.add_argument("model", metavar="MODEL")
    su.add_argument("--train", action="append", default=[], metavar="RULE")
    su.add_argument(
        "--classes", type=int, default=2, help="classes of the head (default %(default)s)"
    )

    fe = sub.add_parser("fetch", help="download models into weights/ (needs network)")
    fe.add_argument("names", nargs="+", metavar="NAME")
    fe.add_argument("--out", type=Path, default=Path("weights"))
    fe.add_argument("--revision")
    return parser


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _fail(message: str) -> None:
    print(f"eqxtl: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _image_folder_shape(path: Path, what: str, *, training: bool = True) -> None:
    """Cheap checks before JAX is imported: a folder with class subfolders (two or more to
    train on)."""
    if not path.is_dir():
        _fail(f"{what} {str(path)!r} is not a folder.")
    classes = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if not classes:
        _fail(
            f"{what} {str(path)!r} has no class subfolders: expected {path}/<class name>/<image> "
            "(one folder per class)."
        )
    if training and what == "--data" and len(classes) < 2:
        _fail(
            f"{what} {str(path)!r} has one class subfolder ({classes[0].name}): a classifier "
            "learns to tell classes apart, so it needs at least 2 (one folder per class)."
        )


# What the library's messages suggest in Python, in the command's own words.
_CLI_WORDS = (
    ("checkpoint=eqxtl.Checkpoint(out_dir, resume=False)", "--restart"),
    ("eqxtl.Checkpoint(out_dir, resume=False)", "--restart"),
    ("(e.g. starting from out_dir/best)", "(e.g. --model OUT/best)"),
    ("another out_dir", "another --out"),
    ("writable out_dir", "writable --out"),
    ("List them with eqxtl.paths(model).", "List them with `eqxtl summary MODEL`."),
    (
        "eqxtl.summary(model, spec) shows what trains",
        "`eqxtl summary MODEL --train RULE` shows what trains",
    ),
    (
        "Run the same call again to resume.",
        "Run the same command again (without --restart) to resume.",
    ),
    (
        "Lower the learning rate, check the data for NaN, or allow some skipped steps with "
        "runtime=eqxtl.Runtime(max_nonfinite=N).",
        "Lower the learning rate (--lr, --train RULE=LR) or check the data for NaN.",
    ),
    ("Phase(epochs=...)", "--epochs"),
    ("Loader(batch_size=...)", "--batch-size"),
    ("evaluate(batch_size=...)", "--batch-size"),
    ("predict(batch_size=...)", "--batch-size"),
    ("Runtime(eval_every=...) (or None)", "--eval-every"),
    ("Runtime(seed=...)", "--seed"),
)


def _cli_words(message: str) -> str:
    for python, cli in _CLI_WORDS:
        message = message.replace(python, cli)
    return message


def _rules(items: list[str], default_lr: float) -> list[tuple[str, float]]:
    out = []
    for item in items:
        rule, sep, lr = item.rpartition("=") if "=" in item else (item, "", "")
        if not sep:
            out.append((item, default_lr))
            continue
        try:
            value = float(lr)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            _fail(f"--train {item!r}: {lr!r} is not a learning rate (RULE=LR, e.g. head=1e-3).")
        out.append((rule, value))
    return out


def _check_numbers(args) -> None:
    """The numbers of ``train``, checked before JAX is imported."""
    if not (math.isfinite(args.lr) and args.lr > 0):
        _fail(f"--lr {args.lr}: a learning rate is a finite number > 0 (e.g. 1e-3).")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        _fail(f"--weight-decay {args.weight_decay}: must be a finite number >= 0.")
    counts = (
        ("--epochs", args.epochs, 1),
        ("--batch-size", args.batch_size, 1),
        ("--eval-every", args.eval_every, 1),
        ("--seed", args.seed, 0),
    )
    for flag, value, low in counts:
        if value is not None and value < low:
            _fail(f"{flag} must be an integer >= {low}, got {value}.")


def _check_hub(repo: str) -> None:
    """``--push-to-hub``, checked before training (not after an hour of it)."""
    from .io.hub import _REPO_ID, _offline

    if not _REPO_ID.match(repo):
        _fail(f"--push-to-hub {repo!r}: a Hub repo is 'user/name'.")
    if _offline():
        _fail(
            "--push-to-hub: HF_HUB_OFFLINE is set, so nothing can be published; unset it, or "
            "train without --push-to-hub (`eqxtl.push_to_hub` publishes the run's best/ later)."
        )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "train":
        _image_folder_shape(args.data, "--data")
        if args.val is not None:
            _image_folder_shape(args.val, "--val")
        _check_numbers(args)
        rules = _rules(args.train, args.lr)
        if args.push_to_hub is not None:
            _check_hub(args.push_to_hub)
    import eqxtl  # JAX from here on

    try:
        if args.command == "train":
            return _train(args, rules)
        if args.command == "eval":
            return _eval(args)
        if args.command == "predict":
            return _predict(args)
        if args.command == "summary":
            return _summary(args)
        return _fetch(args)
    except eqxtl.EqxtlError as e:
        _fail(_cli_words(str(e)))
    except KeyboardInterrupt as e:  # fit has saved `last` and says so; no traceback
        print(f"eqxtl: {_cli_words(str(e)) or 'interrupted.'}", file=sys.stderr)
        raise SystemExit(130) from None
    return 0


def _class_folders(path: Path) -> list[str]:
    return sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))


def _optimizer(lr: float, weight_decay: float):
    import optax

    return optax.adamw(lr, weight_decay=weight_decay) if weight_decay else optax.adam(lr)


def _train(args, rules) -> int:
    import eqxtl

    model, state = _classifier(args.model, len(_class_folders(args.data)), args.seed)
    # the rules are checked against the model before any image is read
    groups = [(rule, _optimizer(lr, args.weight_decay)) for rule, lr in rules]
    spec, optimizer = eqxtl.param_groups(model, [*groups, (".*", None)])
    train = _found(args.data, "--data")
    val = _found(args.val, "--val") if args.val is not None else None
    if val is not None and val.class_names != train.class_names:
        raise eqxtl.DataError(
            f"--val classes {val.class_names} differ from --data classes {train.class_names}."
        )
    present = [n for n in train.class_names if n not in train.empty_classes]
    if len(present) < 2:
        raise eqxtl.DataError(
            f"--data {str(args.data)!r} has images of {len(present)} class"
            f"{'' if len(present) == 1 else 'es'} ({', '.join(present) or 'none'}): a "
            "classifier needs images of at least 2 classes."
        )
    out = args.out or RUNS / f"{args.data.resolve().name}-{Path(args.model).name}"
    preprocessing = eqxtl.preprocessing_for(model)
    augment = eqxtl.Augment() if args.augment else None
    loaders = [
        None if data is None else eqxtl.Loader(data, preprocessing, args.batch_size, **options)
        for data, options in (
            (train, {"shuffle": True, "seed": args.seed, "augment": augment}),
            (val, {}),
        )
    ]
    with _resume_line(args.quiet):
        result = eqxtl.fit(
            model,
            state,
            train_data=loaders[0],
            test_data=loaders[1],
            phases=[eqxtl.Phase(spec, optimizer, epochs=args.epochs, bn=args.bn)],
            callbacks=[eqxtl.TensorBoard()] if args.tensorboard else [],
            checkpoint=eqxtl.Checkpoint(out, resume=not args.restart),
            runtime=eqxtl.Runtime(
                seed=args.seed, eval_every=args.eval_every, progress=not args.quiet
            ),
        )
    summary = {"out": str(out), "best": str(out / "best"), "resumed_from": result.resumed_from}
    if args.push_to_hub is not None:
        summary["hub"] = _push(args, out)
    print(json.dumps({**summary, **result.final}))
    return 0


def _push(args, out: Path) -> str:
    """The run's best checkpoint (else its last), with the evaluation it was chosen on."""
    import eqxtl

    folder = out / "best" if (out / "best").exists() else out / "last"
    model, state = eqxtl.from_pretrained(folder)
    history = json.loads((folder / "meta.json").read_text()).get("history", [])
    evals = [h for h in history if any(k.startswith("test_") for k in h)]
    return eqxtl.push_to_hub(
        model,
        state,
        args.push_to_hub,
        base_model=_hub_id(args.model),
        metrics=evals[-1] if evals else None,
    )


def _hub_id(model: str) -> str | None:
    """The Hub repo ``--model`` names: an alias's repo, a repo id itself; ``None`` for a
    local folder or file."""
    from .models.registry import REGISTRY

    if model in REGISTRY:
        return REGISTRY[model][1].repo
    return None if Path(model).exists() else model


@contextlib.contextmanager
def _resume_line(quiet: bool):
    """``fit`` says where it resumes beside its progress bar; with ``--quiet`` (no bar) the
    same line comes through its logger."""
    if not quiet:
        yield
        return
    logger = logging.getLogger("eqxtl")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _classifier(name, num_classes: int, seed: int):
    """The model ``train`` fine-tunes: the checkpoint's ``Classifier`` when it has
    ``num_classes``, else its backbone with a new head; in float32 (a checkpoint stored in
    bfloat16 would train in bfloat16, which the spec builders refuse)."""
    import jax
    import jax.numpy as jnp

    import eqxtl

    model, state = eqxtl.from_pretrained(name, dtype=jnp.float32)
    if not isinstance(model, eqxtl.Classifier) or model.num_classes != num_classes:
        backbone = getattr(model, "backbone", model)
        model = eqxtl.Classifier(backbone, num_classes, key=jax.random.key(seed))
    return model, state


def _found(path: Path, what: str):
    """The ``ImageFolder`` at ``path``, with what was found printed (stderr) before any
    compilation: classes, images per class, skipped and ignored files."""
    import warnings

    import eqxtl

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same report is printed below, once
        folder = eqxtl.ImageFolder(path)
    print(f"{what}: {folder.report()}", file=sys.stderr, flush=True)
    return folder


def _load_classifier(path):
    import eqxtl

    model, state = eqxtl.from_pretrained(path)
    if not isinstance(model, eqxtl.Classifier):
        raise eqxtl.EqxtlError(
            f"{path} holds a backbone without a trained head: give a folder written by "
            "`eqxtl train` (its best/ or last/)."
        )
    return model, state


def _eval(args) -> int:
    import eqxtl

    _image_folder_shape(args.data, "--data", training=False)
    model, state = _load_classifier(args.model)
    # by name: a folder holding some of the model's classes is scored on those; a folder
    # the model does not know is a DataError naming it
    data = eqxtl.ImageFolder(args.data, class_names=model.class_names)
    if model.class_names is None and len(data.class_names) != model.num_classes:
        raise eqxtl.DataError(
            f"--data has {len(data.class_names)} class folders and the model "
            f"{model.num_classes} classes, without names to match them by: give --data one "
            f"folder per class, named so that sorted order is label order."
        )
    print(json.dumps(eqxtl.evaluate(model, state, data, batch_size=args.batch_size)))
    return 0


def _predict(args) -> int:
    import numpy as np
    from PIL import Image

    import eqxtl
    from eqxtl.data.images import as_rgb

    model, state = _load_classifier(args.model)
    images = []
    for path in args.files:
        try:
            with Image.open(path) as im:  # decoded as ImageFolder does (EXIF, 16 bits)
                images.append(as_rgb(im))
        except OSError as e:
            raise eqxtl.DataError(f"{path}: cannot read this image ({e}).") from None
    probs = eqxtl.predict(model, state, images, batch_size=args.batch_size)
    names = model.class_names or [str(i) for i in range(model.num_classes)]
    for path, p in zip(args.files, probs, strict=True):
        i = int(np.argmax(p))
        print(f"{path}\t{names[i]}\t{p[i]:.4f}")
    return 0


def _summary(args) -> int:
    import eqxtl

    if args.classes < 2:
        _fail(f"--classes {args.classes}: a classifier has at least 2 classes.")
    model, _ = _classifier(args.model, args.classes, 0)
    print(
        f"{type(model).__name__} with {model.num_classes} classes, as `eqxtl train` builds "
        "it (rules match paths such as head, backbone.encoder...):"
    )
    spec = eqxtl.trainable(model, *args.train) if args.train else eqxtl.everything(model)
    eqxtl.summary(model, spec)
    return 0


def _fetch(args) -> int:
    import eqxtl

    failed = []
    targets = {
        name: args.out / (Path(name).name if Path(name).exists() else name.replace("/", "--"))
        for name in args.names
    }
    by_target: dict[Path, str] = {}
    for name, target in targets.items():
        if target in by_target:  # the second would overwrite the first
            raise SystemExit(
                f"eqxtl fetch: {by_target[target]} and {name} would both be written to "
                f"{target}. Fetch them with separate --out folders."
            )
        by_target[target] = name
    for name, target in targets.items():
        try:
            model, state = eqxtl.from_pretrained(name, revision=args.revision)
            eqxtl.save_pretrained(model, state, target)
        except (eqxtl.EqxtlError, OSError) as e:
            print(f"{name}: failed: {e}", file=sys.stderr)
            failed.append(name)
            continue
        print(f"{name}: {eqxtl.count(model):,} parameters -> {target}")
    if failed:
        print(
            f"eqxtl: {len(failed)} of {len(args.names)} failed: {', '.join(failed)}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
