"""Fine-tune a pretrained backbone on rock-paper-scissors (TensorFlow Datasets).

The defaults reproduce the Flax transfer-learning guide's run: the CLIP ViT-B/32 vision
backbone frozen, a zero-initialised linear head trained with Adam 1e-3, label smoothing 0.1,
batch 32, one epoch, evaluation every 20 steps.

    python examples/finetune_rps.py
    python examples/finetune_rps.py --model resnet50 --train head
    python examples/finetune_rps.py --train head=1e-3 backbone.encoder.layers.11=1e-5
    python examples/finetune_rps.py --weights weights/clip-vit-base-patch32 --data-dir ~/tfds
    python examples/finetune_rps.py --lora 8            # LoRA on q,v of every block + head
    python examples/finetune_rps.py --lora 8 --lora-targets ".*_proj" ".*fc1" --lr 1e-3
    python examples/finetune_rps.py --head zero-shot --train .* --lr 1e-5 --wise-ft 0.5

``--head zero-shot`` starts from CLIP's zero-shot classifier (the dataset's class names in
OpenAI's 80 ImageNet prompt templates; needs a full CLIP checkpoint with its tokenizer
files) and prints its accuracy before training; ``--wise-ft A [A ...]`` then evaluates the
weight interpolations ``(1 - A) * zero-shot + A * fine-tuned`` (WiSE-FT) and plots the
sweep.

``--train`` takes filter rules (full-match regexes on parameter paths, see
``eqxtl.paths``), each optionally with its own learning rate (``RULE=LR``); everything the
rules do not match stays frozen. ``--lora RANK`` adds LoRA adapters (to ``--lora-targets``,
by default CLIP's ``q_proj``/``v_proj``, ResNet's block convolutions, EfficientNet-Lite's
1x1 convolutions) that train at ``--lr`` besides the ``--train`` rules; the run then also
writes the adapter as a Hugging Face PEFT folder and the merged model.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import equinox as eqx
import jax
import optax

import eqxtl
from eqxtl.models.registry import architecture_of

DATASET = "rock_paper_scissors"
# Default LoRA targets per architecture (what PEFT guides adapt / the 1x1 convolutions).
LORA_TARGETS = {
    "clip_vision": [r".*\.(q_proj|v_proj)"],
    "resnet": [r".*\.layer\.\d+\.convolution"],
    "efficientnet_lite": [r".*\.(_expand_conv|_project_conv|_conv_head)"],
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default="clip-vit-base-patch32",
        help="registry alias, Hugging Face repo id or local path (default: %(default)s)",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        help="local checkpoint (directory with config.json + model.safetensors, or a "
        ".safetensors/.pth file) to use instead of downloading --model; defaults to "
        "weights/<model> when that exists",
    )
    parser.add_argument(
        "--train",
        nargs="+",
        default=["head"],
        metavar="RULE[=LR]",
        help="what trains: path rules, each with an optional learning rate (default: %(default)s)",
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="default learning rate")
    parser.add_argument("--lora", type=int, metavar="RANK", help="add LoRA adapters of this rank")
    parser.add_argument(
        "--lora-targets",
        nargs="+",
        metavar="RULE",
        help="layers that get adapters (path rules; default: per architecture, see above)",
    )
    parser.add_argument("--dora", action="store_true", help="DoRA instead of plain LoRA")
    parser.add_argument(
        "--head",
        choices=["linear", "zero-shot"],
        default="linear",
        help="a zero-initialised linear head, or CLIP's zero-shot head (default: %(default)s)",
    )
    parser.add_argument(
        "--wise-ft",
        type=float,
        nargs="+",
        metavar="ALPHA",
        help="after training, evaluate (1-ALPHA)*zero-shot + ALPHA*fine-tuned (--head zero-shot)",
    )
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", default=DATASET, help="TFDS name (default: %(default)s)")
    parser.add_argument("--data-dir", type=Path, help="TFDS data directory")
    parser.add_argument("--out", type=Path, default=Path("runs/rps"), help="output directory")
    parser.add_argument("--no-resume", action="store_true", help="ignore --out/last")
    return parser.parse_args(argv)


def parse_rules(items: list[str], default_lr: float) -> list[tuple[str, float]]:
    """``["head", "backbone.x=1e-5"]`` -> ``[("head", default_lr), ("backbone.x", 1e-5)]``."""
    rules = []
    for item in items:
        rule, sep, lr = item.rpartition("=")
        if not sep:
            rules.append((item, default_lr))
            continue
        try:
            rules.append((rule, float(lr)))
        except ValueError:
            raise SystemExit(
                f"--train {item!r}: '=' must be followed by a learning rate."
            ) from None
    return rules


def load_backbone(args, towers: str = "vision"):
    local = args.weights
    fetched = Path("weights") / args.model.replace("/", "--")  # see weights/fetch.py
    if local is None and fetched.exists():
        local = fetched
    source = str(local) if local is not None else args.model
    try:
        if towers == "both":
            clip, _ = eqxtl.from_pretrained(source, towers="both")
            return clip, eqxtl.Tokenizer.from_pretrained(source)
        return eqxtl.from_pretrained(source)
    except eqxtl.CheckpointError as e:
        raise SystemExit(f"error: --head zero-shot needs a full CLIP checkpoint: {e}") from None
    except eqxtl.SourceError as e:
        why = ""
        if "refs/pr/" in str(e):
            why = (
                "(The alias reads a pull-request branch (refs/pr/N) of the Hub repository: "
                "that is where the repository keeps its model.safetensors (its main branch has "
                "none), which loads without running pickled code.)\n"
            )
        raise SystemExit(
            f"error: cannot load the backbone: {e}\n{why}"
            "Use --weights PATH for a local checkpoint (e.g. one written by "
            f"`eqxtl fetch {args.model}` on a machine with network), or --model for "
            "another alias / repo id."
        ) from None


def main(argv=None) -> eqxtl.FitResult:
    args = parse_args(argv)
    rules = parse_rules(args.train, args.lr)
    if args.wise_ft and args.head != "zero-shot":
        raise SystemExit(
            "error: --wise-ft interpolates from the zero-shot head: add --head zero-shot"
        )
    if args.head == "zero-shot":
        clip, tokenizer = load_backbone(args, towers="both")
    else:
        backbone, state = load_backbone(args)
    try:
        train = eqxtl.TFDSSource(args.dataset, "train", data_dir=args.data_dir)
        test = eqxtl.TFDSSource(args.dataset, "test", data_dir=args.data_dir)
    except eqxtl.DataError as e:
        raise SystemExit(f"error: {e}\nUse --data-dir DIR where the dataset is prepared.") from None

    if args.head == "zero-shot":
        model = eqxtl.zero_shot_head(clip, train.class_names, tokenizer=tokenizer)
        state = eqx.nn.State(model)
        zero_shot = eqxtl.evaluate(model, state, test, batch_size=args.batch_size)
        print(f"zero-shot test accuracy {zero_shot['accuracy']:.4f} ({train.class_names})")
    else:
        model = eqxtl.Classifier(backbone, len(train.class_names), zero_init=True)
    groups = [(rule, optax.adam(lr)) for rule, lr in rules]
    if args.lora is not None:
        targets = args.lora_targets or LORA_TARGETS[architecture_of(model.backbone).name]
        try:
            model = eqxtl.lora(
                model, targets, rank=args.lora, dora=args.dora, key=jax.random.key(args.seed)
            )
        except eqxtl.EqxtlError as e:
            raise SystemExit(f"error: --lora: {e}") from None
        groups = [(eqxtl.ADAPTER_RULE, optax.adam(args.lr)), *groups]
    try:
        spec, optimizer = eqxtl.param_groups(model, [*groups, (".*", None)])
    except eqxtl.RuleError as e:
        raise SystemExit(f"error: --train: {e}") from None
    eqxtl.summary(model, spec)

    preprocessing = eqxtl.preprocessing_for(model)
    train_batches = eqxtl.Loader(
        train, preprocessing, args.batch_size, shuffle=True, seed=args.seed
    )
    steps = max(1, round(args.epochs * len(train_batches)))
    result = eqxtl.fit(
        model,
        state,
        train_data=train_batches,
        test_data=eqxtl.Loader(test, preprocessing, args.batch_size),
        phases=[eqxtl.Phase(spec, optimizer, steps=steps)],
        task=eqxtl.Classification(label_smoothing=args.label_smoothing),
        checkpoint=eqxtl.Checkpoint(args.out, resume=not args.no_resume),
        runtime=eqxtl.Runtime(seed=args.seed, eval_every=args.eval_every),
    )
    final = result.final
    if args.lora is not None:
        # PEFT's adapter folder (for the transformers model of the same base), and the
        # merged plain model that from_pretrained / transformers read like any checkpoint
        eqxtl.save_adapter(result.model, args.out / "adapter", modules_to_save=["head"])
        eqxtl.save_pretrained(eqxtl.merge_lora(result.model), result.state, args.out / "merged")
        print(f"adapter (PEFT): {args.out / 'adapter'}, merged model: {args.out / 'merged'}")
    print(
        f"test accuracy {final.get('test_accuracy', float('nan')):.4f} "
        f"(loss {final.get('test_loss', float('nan')):.4f}) after {result.step} steps\n"
        f"checkpoints: {args.out / 'best'} and {args.out / 'last'}\n"
        f"history: {args.out / 'history.json'}, plot: {args.out / 'history.png'}"
    )
    if args.wise_ft:
        sweep = eqxtl.wise_ft(
            model if args.lora is None else eqxtl.merge_lora(model),
            result.model if args.lora is None else eqxtl.merge_lora(result.model),
            args.wise_ft,
            test,
            batch_size=args.batch_size,
            plot=args.out / "wise_ft.png" if importlib.util.find_spec("matplotlib") else None,
        )
        for record in sweep:
            print(f"WiSE-FT alpha {record['alpha']:g}: test accuracy {record['accuracy']:.4f}")
    return result


if __name__ == "__main__":
    main()
