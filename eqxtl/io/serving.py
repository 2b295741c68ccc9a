"""Models out of Python: a fine-tuned model exported as a StableHLO program (``jax.export``)
or an ONNX graph (``jax2onnx``) that runs without eqxtl, with the facts a server needs
beside it."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp

from ..errors import AdapterError
from ..models.batching import batched
from ..models.heads import Classifier
from ..models.layers import has_adapters
from ..models.registry import architecture_of, preprocessing_for

PROGRAM_FILES = {"stablehlo": "model.stablehlo", "onnx": "model.onnx"}
FORMATS = tuple(PROGRAM_FILES)
METADATA_FILE = "metadata.json"
_RUN = {
    "stablehlo": "jax.export.deserialize(bytearray(open(program, 'rb').read())).call(images)",
    "onnx": "onnxruntime.InferenceSession(program).run(None, {'images': images})[0]",
}


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
    - or ``model.onnx`` (``format="onnx"``, through ``jax2onnx``: ``pip install
      "eqxtl[onnx]"``): the same forward pass as an ONNX graph (opset 23) with a symbolic
      batch dimension ``N``, input ``"images"``, output ``"logits"`` / ``"features"``; run it
      with ``onnxruntime.InferenceSession(path).run(None, {"images": images})[0]``. One
      file holds at most 2 GB (protobuf's limit): models above ~500 M float32 parameters
      export to StableHLO only.
    - ``metadata.json``: the input layout and size, the preprocessing that turns uint8
      ``(H, W, 3)`` images into that input (``eqxtl.preprocess`` does it), the output, the
      class names (a classifier trained by ``fit`` and given ``with_training_info``), and
      the versions that wrote it.

    The folder is written atomically (an existing file at ``path`` is an error, other
    files in an existing folder are kept, except a program of the other format). A model
    with LoRA/DoRA adapters is refused: export ``eqxtl.merge_lora(model)`` (the same
    outputs, without the adapters' extra matrix products).

    **Arguments:**

    - `model`, `state`: as ``from_pretrained`` or ``fit`` return them.
    - `path`: the folder to write.
    - `format`: ``"stablehlo"`` or ``"onnx"``.

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
    if has_adapters(model):
        raise AdapterError(
            "export: this model holds LoRA/DoRA adapters; export eqxtl.merge_lora(model) "
            "(a plain model with the same outputs)."
        )
    to_onnx = _jax2onnx() if format == "onnx" else None  # before any tracing
    pre = preprocessing_for(model)
    forward = _forward(eqx.nn.inference_mode(model, True), state)
    output = "logits" if isinstance(model, Classifier) else "features"
    if to_onnx is None:
        program = _stablehlo(forward, pre.crop)
        data, width = program.serialize(), int(program.out_avals[0].shape[-1])
    else:
        data, width = _onnx(to_onnx, forward, pre.crop, output)
    metadata = _metadata(model, arch.name, pre, format, output, width)
    name = PROGRAM_FILES[format]
    with atomic_directory(path, replacing=[*PROGRAM_FILES.values(), METADATA_FILE]) as tmp:
        Path(tmp, name).write_bytes(data)
        Path(tmp, METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    return Path(path)


def _forward(model, state):
    def forward(images):
        return batched(model)(images, state)[0]

    return forward


def _jax2onnx():
    try:
        from jax2onnx import to_onnx
    except ImportError as e:
        raise ImportError(
            "export(format='onnx') needs the jax2onnx converter: pip install \"eqxtl[onnx]\" "
            f'(in the eqxtl clone: pip install -e ".[onnx]"); {e}.'
        ) from e
    return to_onnx


def _stablehlo(forward, size: int) -> jax.export.Exported:
    """The forward pass over a symbolic batch ``(N, 3, size, size)``."""
    (n,) = jax.export.symbolic_shape("N")
    spec = jax.ShapeDtypeStruct((n, 3, size, size), jnp.float32)
    return jax.export.export(jax.jit(forward))(spec)


def _onnx(to_onnx, forward, size: int, output: str) -> tuple[bytes, int]:
    """The forward pass as ONNX bytes over a symbolic batch ``N``, and the output width."""
    import logging

    # onnx_ir logs a warning per shape constant it leaves untyped: noise, not a fault
    quiet = logging.getLogger("onnx_ir")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        proto = to_onnx(
            forward, [("N", 3, size, size)], input_names=["images"], output_names=[output]
        )
    finally:
        quiet.setLevel(level)
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    return proto.SerializeToString(), int(dims[-1].dim_value)


def _metadata(model, architecture: str, pre, format: str, output: str, width: int):
    from importlib.metadata import version

    names = getattr(model, "class_names", None)
    versions = {"eqxtl": version("eqxtl"), "jax": jax.__version__}
    if format == "onnx":
        versions["jax2onnx"] = version("jax2onnx")
    return {
        "format": format,
        "program": PROGRAM_FILES[format],
        "run": _RUN[format],
        "input": {
            "name": "images",
            "shape": ["N", 3, pre.crop, pre.crop],
            "dtype": "float32",
            "layout": "NCHW, RGB, preprocessed as 'preprocessing' says",
        },
        "output": {"name": output, "shape": ["N", width], "dtype": "float32"},
        "preprocessing": dataclasses.asdict(pre),
        "class_names": None if names is None else list(names),
        "architecture": architecture,
        "versions": versions,
    }
