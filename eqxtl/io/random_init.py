"""Randomly initialised backbones: ``from_config``, for training from scratch (and for
benchmarks of real sizes without downloads)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import equinox as eqx
import numpy as np

from ..models.registry import ARCHITECTURES, lookup_alias
from . import checkpoint


def from_config(
    model: str | Any,
    *,
    architecture: str | None = None,
    seed: int = 0,
    dtype=np.float32,
    quantize: str | None = None,
) -> tuple[eqx.Module, eqx.nn.State]:
    """A randomly initialised backbone (for training from scratch), in inference mode.

    ``model``: a registry alias (``"efficientnet-lite0"``, ``"resnet50"``, ...) or a config
    (``ResNetConfig(...)``, ``CLIPVisionConfig(...)``...). Nothing is downloaded. ``dtype``:
    of every floating-point leaf (e.g. ``jnp.bfloat16``). ``quantize="int8"`` / ``"nf4"``:
    as in ``from_pretrained``; each weight is drawn and stored quantized before the next is
    drawn.

    Initialisation (drawn with NumPy from ``seed``, so building a large model costs no
    compilation): convolution and linear weights He-normal over their fan-in, biases zero,
    normalisation scales one, BatchNorm running statistics mean 0 / variance 1, class and
    position embeddings N(0, 0.02).
    """
    if isinstance(model, str):
        arch, entry = lookup_alias(model)
        config = entry.config
    else:
        config = model
        matches = [a for a in ARCHITECTURES.values() if isinstance(config, a.config_cls)]
        if architecture is not None:
            matches = [ARCHITECTURES[architecture]]
        if len(matches) != 1:
            raise TypeError(f"{type(config).__name__} is not the config of a known architecture.")
        arch = matches[0]
    skeleton = checkpoint.skeleton(arch, config)
    tensors = _RandomInit(checkpoint.array_shapes(skeleton), np.random.default_rng(seed), dtype)
    return checkpoint.fill(skeleton, tensors, source="random init", quantize=quantize)


class _RandomInit(Mapping):
    """``{name: initial value}``, each value drawn when ``checkpoint.fill`` asks for it (in
    the skeleton's order: the stream of drawing them all first), so that one float tensor
    exists at a time, not the whole float model beside the filled one."""

    def __init__(self, shapes: dict, rng: np.random.Generator, dtype) -> None:
        self._shapes, self._rng, self._dtype = shapes, rng, dtype
        self._order = iter(shapes)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._shapes:
            raise KeyError(name)
        if next(self._order, None) != name:
            raise RuntimeError(f"from_config: tensor {name!r} asked for out of order")
        return _initial_value(name, self._shapes[name].shape, self._rng).astype(self._dtype)

    def __contains__(self, name: object) -> bool:
        return name in self._shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)


def _initial_value(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "running_var":
        return np.ones(shape)
    if leaf in ("running_mean", "bias") or (leaf == "weight" and len(shape) == 1):
        return np.ones(shape) if leaf == "weight" else np.zeros(shape)
    if len(shape) < 2 or "embedding" in name:
        return 0.02 * rng.standard_normal(shape)
    fan_in = int(np.prod(shape[1:]))
    return rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
