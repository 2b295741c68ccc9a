"""Known architectures and checkpoint aliases.

An alias names a real published checkpoint: which architecture and config, where the
safetensors live (repo, revision, file), and the preprocessing it was trained with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..data import CLIP_PREPROCESSING, IMAGENET_PREPROCESSING, LITE0_PREPROCESSING, Preprocessing
from . import clip, efficientnet, resnet
from ._arch import Architecture

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a for a in (clip.CLIP_VISION, resnet.RESNET, efficientnet.EFFICIENTNET_LITE)
}
_PREPROCESSING = {
    clip.CLIP_VISION.name: CLIP_PREPROCESSING,
    resnet.RESNET.name: IMAGENET_PREPROCESSING,
    efficientnet.EFFICIENTNET_LITE.name: LITE0_PREPROCESSING,
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One published checkpoint."""

    architecture: str
    config: Any
    repo: str | None = None
    revision: str | None = None
    filenames: tuple[str, ...] = ("model.safetensors",)
    local: Callable[[], Path] | None = None
    """Returns the path of a copy installed with a package (checked before the hub)."""


_HF_FILES = ("model.safetensors", "pytorch_model.bin")

REGISTRY: dict[str, Entry] = {
    # openai/clip-vit-base-patch32 keeps model.safetensors on a PR branch, not on main.
    "clip-vit-base-patch32": Entry(
        "clip_vision", clip.CLIP_VIT_B32, "openai/clip-vit-base-patch32", "refs/pr/32"
    ),
    "clip-vit-base-patch16": Entry(
        "clip_vision", clip.CLIP_VIT_B16, "openai/clip-vit-base-patch16", None, _HF_FILES
    ),
    "clip-vit-large-patch14": Entry(
        "clip_vision", clip.CLIP_VIT_L14, "openai/clip-vit-large-patch14", None, _HF_FILES
    ),
    **{
        f"resnet{depth}": Entry(
            "resnet",
            getattr(resnet, f"RESNET{depth}"),
            f"microsoft/resnet-{depth}",
            None,
            _HF_FILES,
        )
        for depth in (18, 34, 50, 101, 152)
    },
    "efficientnet-lite0": Entry(
        "efficientnet_lite",
        efficientnet.EFFICIENTNET_LITE0,
        local=efficientnet.packaged_lite0_path,
    ),
}


def architecture_of(backbone) -> Architecture:
    """The ``Architecture`` a backbone module was built from (by its config type)."""
    config = getattr(backbone, "config", None)
    for arch in ARCHITECTURES.values():
        if isinstance(config, arch.config_cls):
            return arch
    raise TypeError(
        f"{type(backbone).__name__} is not an eqxtl backbone (no known config); "
        f"known architectures: {sorted(ARCHITECTURES)}."
    )


def preprocessing_for(model) -> Preprocessing:
    """The eval preprocessing matching ``model``'s checkpoint (a backbone or Classifier; a
    Classifier trained by ``fit`` uses its training preprocessing)."""
    if getattr(model, "preprocessing", None) is not None:
        return model.preprocessing
    backbone = getattr(model, "backbone", model)
    arch = architecture_of(backbone)
    p = _PREPROCESSING[arch.name]
    size = getattr(backbone.config, "image_size", None)
    if size is not None and size != p.crop:
        p = dataclasses.replace(p, resize=round(p.resize * size / p.crop), crop=size)
    return p
