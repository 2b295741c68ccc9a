"""Models out of Python: a fine-tuned model exported as a StableHLO program (``jax.export``)
that runs without eqxtl, with the facts a server needs beside it."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from ..models.batching import batched
from ..models.heads import Classifier
from ..models.registry import architecture_of, preprocessing_for

FORMATS = ("stablehlo",)
PROGRAM_FILE = "model.stablehlo"
METADATA_FILE = "metadata.json"


def export(
    model: eqx.Module,
    state: eqx.nn.State | None,
    path: str | os.PathLike,
    *,
    format: str = "stablehlo",
) -> Path:
    """Write ``model`` (a backbone or ``Classifier``, in inference mode) as a folder that
    serves it without eqxtl:

    - ``model.stablehlo``: the bytes of ``jax.export.Exported.serialize()``: the forward pass
      with the weights and BatchNorm statistics inside, for a batch of any size. Run it with
      ``jax.export.deserialize(data).call(images)``: ``images`` float32 ``(N, 3, H, W)``,
      already preprocessed; the output is float32 ``(N, num_classes)`` logits for a
      ``Classifier``, ``(N, D)`` features for a backbone.
    - ``metadata.json``: the input layout and size, the preprocessing that turns uint8
      ``(H, W, 3)`` images into that input (``eqxtl.preprocess`` does it), the output, the
      class names (a classifier trained by ``fit`` and given ``with_training_info``), and
      the versions that wrote it.

    The folder is written atomically (an existing file at ``path`` is an error, other
    files in an existing folder are kept).

    **Arguments:**

    - `model`, `state`: as ``from_pretrained`` or ``fit`` return them.
    - `path`: the folder to write.
    - `format`: ``"stablehlo"``.

    **Returns:** ``Path(path)``.
    """
    from .._util.atomic import atomic_directory

    if format not in FORMATS:
        raise ValueError(f"export: format must be one of {list(FORMATS)}, got {format!r}.")
    backbone = model.backbone if isinstance(model, Classifier) else model
    arch = architecture_of(backbone)  # a TypeError for anything that is not an eqxtl model
    if arch.towers != "vision":
        raise TypeError(
            f"export: {type(model).__name__} is an image-text model; export its image tower "
            "(model.vision_model) or a Classifier on it (eqxtl.zero_shot_head)."
        )
    pre = preprocessing_for(model)
    exported = _stablehlo(eqx.nn.inference_mode(model, True), state, pre.crop)
    metadata = _metadata(model, arch.name, pre, exported)
    with atomic_directory(path, replacing=[PROGRAM_FILE, METADATA_FILE]) as tmp:
        Path(tmp, PROGRAM_FILE).write_bytes(exported.serialize())
        Path(tmp, METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    return Path(path)


def _stablehlo(model, state, size: int) -> jax.export.Exported:
    """The forward pass over a symbolic batch ``(N, 3, size, size)``."""
    (n,) = jax.export.symbolic_shape("N")

    def forward(images):
        return batched(model)(images, state)[0]

    spec = jax.ShapeDtypeStruct((n, 3, size, size), jnp.float32)
    return jax.export.export(jax.jit(forward))(spec)


def _metadata(model, architecture: str, pre, exported: jax.export.Exported) -> dict[str, Any]:
    from importlib.metadata import version

    out_shape = exported.out_avals[0].shape
    names = getattr(model, "class_names", None)
    return {
        "format": "stablehlo",
        "program": PROGRAM_FILE,
        "run": "jax.export.deserialize(bytearray(open(program, 'rb').read())).call(images)",
        "input": {
            "name": "images",
            "shape": ["N", 3, pre.crop, pre.crop],
            "dtype": "float32",
            "layout": "NCHW, RGB, preprocessed as 'preprocessing' says",
        },
        "output": {
            "name": "logits" if isinstance(model, Classifier) else "features",
            "shape": ["N", int(out_shape[-1])],
            "dtype": "float32",
        },
        "preprocessing": dataclasses.asdict(pre),
        "class_names": None if names is None else list(names),
        "architecture": architecture,
        "versions": {"eqxtl": version("eqxtl"), "jax": jax.__version__},
    }
