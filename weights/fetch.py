"""Download pretrained backbones once (needs network) and save them under ``weights/``.

The saved directory (``config.json`` + ``model.safetensors``) then loads offline with
``eqxtl.from_pretrained("weights/<name>")``; ``examples/finetune_rps.py --model <name>``
picks it up automatically.

    python weights/fetch.py clip-vit-base-patch32 resnet50
    python weights/fetch.py microsoft/resnet-18 --out weights
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import eqxtl


def local_name(model: str) -> str:
    """Directory name under ``weights/`` for an alias, a repo id or a local path."""
    return Path(model).name if Path(model).exists() else model.replace("/", "--")


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "models",
        nargs="+",
        help=f"registry aliases ({', '.join(sorted(eqxtl.REGISTRY))}) or hub repo ids",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--revision", help="hub branch, tag or commit")
    args = parser.parse_args(argv)
    saved = []
    for name in args.models:
        target = args.out / local_name(name)
        try:
            model, state = eqxtl.from_pretrained(name, revision=args.revision)
        except (eqxtl.SourceError, eqxtl.CheckpointError) as e:
            sys.exit(f"error: {name}: {e}")
        eqxtl.save_pretrained(model, state, target)
        print(f"{name}: {eqxtl.count(model):,} parameters -> {target}")
        saved.append(target)
    return saved


if __name__ == "__main__":
    main()
