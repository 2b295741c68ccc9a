"""Known architectures and checkpoint aliases: one line per architecture.

Everything else in eqxtl asks an ``Architecture`` (``models/_arch.py``) and never names one:
this file is the only list of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import equinox as eqx
import jax.tree_util as jtu

from .._util.pytree_paths import keypath_to_str
from ..errors import SourceError
from . import clip, clip_text, dinov2, efficientnet, mixer, resnet, siglip, vit
from ._arch import Alias, Architecture, Preprocessing

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        clip.CLIP_VISION,
        resnet.RESNET,
        efficientnet.EFFICIENTNET_LITE,
        vit.VIT,
        dinov2.DINOV2,
        siglip.SIGLIP_VISION,
        mixer.MIXER,
        clip_text.CLIP_MODEL,
    )
}

REGISTRY: dict[str, tuple[Architecture, Alias]] = {
    alias: (arch, entry) for arch in ARCHITECTURES.values() for alias, entry in arch.aliases.items()
}
"""Alias -> (architecture, published checkpoint)."""


def weight_files() -> tuple[str, ...]:
    """The weight file names of every layout (``Layout.files``), safetensors first, then
    ``.bin``, then the rest: what the loader looks for in a folder or a hub repo, in order."""
    names = dict.fromkeys(f for a in ARCHITECTURES.values() for lay in a.layouts for f in lay.files)
    rank = {".safetensors": 0, ".bin": 1}
    return tuple(sorted(names, key=lambda f: rank.get(f[f.rfind(".") :], 2)))


def config_files() -> tuple[str, ...]:
    """The config file names any layout reads beside the weights (``Layout.config_files``)."""
    names = (f for a in ARCHITECTURES.values() for lay in a.layouts for f in lay.config_files)
    return tuple(dict.fromkeys(names))


def lookup_alias(name: str) -> tuple[Architecture, Alias]:
    """The architecture and checkpoint of an alias; ``SourceError`` listing the known ones."""
    if name not in REGISTRY:
        import difflib

        near = difflib.get_close_matches(name, list(REGISTRY), n=3, cutoff=0.6)
        near += [a for a in REGISTRY if a.replace("-", "_") == name.replace("-", "_")]
        guess = f" Did you mean {near[0]!r}?" if near else ""
        known = [f"{a} (offline)" if REGISTRY[a][1].local else a for a in sorted(REGISTRY)]
        raise SourceError(
            f"{name!r} is not a known alias.{guess} The known aliases ('(offline)': packaged "
            f"with eqxtl, the others download from the Hugging Face hub): {known}."
        )
    return REGISTRY[name]


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


def is_backbone(x: Any) -> bool:
    config = getattr(x, "config", None)
    return isinstance(x, eqx.Module) and any(
        isinstance(config, a.config_cls) for a in ARCHITECTURES.values()
    )


def backbones_in(model: Any) -> Iterator[tuple[str, Any, Architecture]]:
    """``(path prefix, backbone, architecture)`` of every backbone inside ``model`` (the
    prefix is ``""`` for a bare backbone, ``"backbone."`` in a ``Classifier``)."""
    for kp, node in jtu.tree_flatten_with_path(model, is_leaf=is_backbone)[0]:
        if is_backbone(node):
            path = keypath_to_str(kp)
            yield (path + "." if path else ""), node, architecture_of(node)


def preprocessing_for(model) -> Preprocessing:
    """The eval preprocessing matching ``model``'s checkpoint (a backbone or Classifier):
    what the checkpoint's own files stated (timm ``pretrained_cfg``, open_clip
    ``preprocess_cfg``) or the architecture's default, at the model's input size. A
    Classifier trained by ``fit`` uses its training preprocessing."""
    if getattr(model, "preprocessing", None) is not None:
        return model.preprocessing
    found = list(backbones_in(model))
    if not found:
        raise TypeError(f"{type(model).__name__} holds no eqxtl backbone.")
    _, backbone, arch = found[0]
    stated = getattr(backbone, "preprocessing", None)
    if stated is not None:
        return stated
    return arch.preprocessing(backbone.config)
