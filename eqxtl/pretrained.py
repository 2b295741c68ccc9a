"""``from_pretrained`` and ``save_pretrained``: the public way in and out of checkpoints."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import equinox as eqx
import numpy as np

from . import checkpoint, hub, labels
from .models._arch import Architecture
from .models.heads import Classifier
from .models.registry import ARCHITECTURES, REGISTRY, architecture_of


class _SafetensorsFile(Mapping):
    """Read-on-demand view of a .safetensors file: shapes without loading, one tensor at a
    time, so that peak memory stays near one copy of the weights."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="numpy")
        self._keys = dict.fromkeys(self._file.keys())

    def __getitem__(self, key: str) -> np.ndarray:
        return self._file.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())


class _Renamed(Mapping):
    """``canonical name -> tensor`` over a source mapping, without touching the tensors."""

    def __init__(self, source: Mapping, names: dict[str, str]):
        self._source, self._names = source, names

    def __getitem__(self, key: str) -> np.ndarray:
        return self._source[self._names[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __contains__(self, key) -> bool:
        return key in self._names

    def __len__(self) -> int:
        return len(self._names)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        src = self._source
        get = src.shape if hasattr(src, "shape") else lambda k: tuple(src[k].shape)
        return {name: get(orig) for name, orig in self._names.items()}


def _read(path: Path) -> Mapping[str, np.ndarray]:
    if path.suffix == ".safetensors":
        try:
            return _SafetensorsFile(path)
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise checkpoint.CheckpointError(
                f"{path} is not a valid safetensors file: {e}"
            ) from None
    from ._torch_pickle import load_torch_file

    return load_torch_file(path)


def _pick_architecture(hf_config: dict | None, shapes: Iterable[str], name: str | None):
    if name is not None:
        if name not in ARCHITECTURES:
            raise ValueError(f"Unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}.")
        return ARCHITECTURES[name]
    if hf_config is not None:
        model_type = hf_config.get("model_type")
        for arch in ARCHITECTURES.values():
            if model_type in arch.model_types:
                return arch
    keys = {k: () for k in shapes}
    for arch in ARCHITECTURES.values():
        if arch.detect(keys):
            return arch
    sample = sorted(keys)[:8]
    raise checkpoint.CheckpointError(
        f"Cannot tell the architecture of this checkpoint (first keys: {sample}). "
        f"Known: {sorted(ARCHITECTURES)}; pass architecture= to choose one."
    )


def _resolve(source, revision, cache_dir) -> tuple[hub.Resolved, Any, str | None]:
    """-> (files, registry config or None, architecture name or None)."""
    key = str(source)
    if key in REGISTRY:
        entry = REGISTRY[key]
        if entry.local is not None:
            return hub.resolve_local(entry.local()), entry.config, entry.architecture
        files = hub.resolve_hub(
            entry.repo,
            revision=revision or entry.revision,
            filenames=entry.filenames,
            cache_dir=cache_dir,
        )
        return files, entry.config, entry.architecture
    if hub.looks_local(source):
        return hub.resolve_local(source), None, None
    return hub.resolve_hub(key, revision=revision, cache_dir=cache_dir), None, None


def from_pretrained(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    config: Any = None,
    architecture: str | None = None,
    ignore: Iterable[str] = (),
    keep_head: bool | None = None,
    dtype=None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[eqx.Module, eqx.nn.State]:
    """Load a pretrained backbone by name, in inference mode.

    **Arguments:**

    - `source`: a registry alias (``"clip-vit-base-patch32"``, ``"resnet50"``,
      ``"efficientnet-lite0"``; see ``eqxtl.REGISTRY``), a Hugging Face repo id
      (``"microsoft/resnet-50"``), a local directory with config.json + model.safetensors,
      or a single ``.safetensors`` / ``.pth`` / ``.bin`` file (architecture and config are
      then inferred from the tensor names and shapes). PyTorch files are read without
      torch and without running any code they contain.
    - `revision`: hub branch, tag or commit.
    - `config`: override the config (a ``CLIPVisionConfig``, ``ResNetConfig``...).
    - `architecture`: force one of ``eqxtl.ARCHITECTURES`` instead of detecting it.
    - `ignore`: regexes (full match on original or canonical key, or a module prefix) of
      checkpoint keys to leave out.
    - `keep_head`: return ``Classifier(backbone, head=<pretrained head>)`` so that the
      checkpoint's own predictions (e.g. ImageNet classes) can be checked. Default: only
      for a folder that ``save_pretrained`` wrote from a ``Classifier``, which comes back
      whole (head, class names, training preprocessing).
    - `dtype`: cast floating weights (default: as stored).

    **Returns:** ``(model, state)``: ``model(x, state) -> (features, state)`` for one image
    ``x`` of shape ``(C, H, W)``; ``state`` holds BatchNorm statistics (empty otherwise).

    Strict: any missing, unexpected or misshaped key raises one ``CheckpointError`` that
    lists them.
    """
    files, registry_config, arch_name = _resolve(source, revision, cache_dir)
    tensors = _read(files.weights)
    hf_config = json.loads(files.config.read_text()) if files.config is not None else None
    arch = _pick_architecture(hf_config, tensors.keys(), architecture or arch_name)

    names = checkpoint.canonical_names(arch, tensors.keys(), ignore, files.description)
    canonical = _Renamed(tensors, names)
    shapes = canonical.shapes()
    if config is None:
        if hf_config is not None:
            config = arch.reconcile(arch.config_from_hf(hf_config), shapes)
        elif registry_config is not None:
            config = arch.reconcile(registry_config, shapes)
        else:
            config = arch.infer_config(shapes)

    head_names = {n: k for n, k in names.items() if n.startswith("head.")}
    backbone_tensors = _Renamed(tensors, {n: k for n, k in names.items() if n not in head_names})
    source_name = files.description
    backbone, state = checkpoint.fill(
        checkpoint.skeleton(arch, config), backbone_tensors, source=source_name, dtype=dtype
    )
    if keep_head is None:
        keep_head = labels.written_by_eqxtl(hf_config)
    if not keep_head:
        return backbone, state
    if not head_names:
        raise checkpoint.CheckpointError(
            f"keep_head=True but {source_name} has no classification head "
            f"(no classifier / fc weights)."
        )
    weight = tensors[head_names["head.weight"]]
    head_skeleton = eqx.filter_eval_shape(
        eqx.nn.Linear,
        weight.shape[1],
        weight.shape[0],
        use_bias="head.bias" in head_names,
        key=_key0(),
    )
    head_tensors = _Renamed(tensors, {n[len("head.") :]: k for n, k in head_names.items()})
    head, _ = checkpoint.fill(head_skeleton, head_tensors, source=source_name, dtype=dtype)
    info = (
        labels.training_info(hf_config, source_name) if labels.written_by_eqxtl(hf_config) else {}
    )
    return Classifier(backbone, head=head, **info), state


def from_config(
    model: str | Any,
    *,
    architecture: str | None = None,
    seed: int = 0,
    dtype=np.float32,
) -> tuple[eqx.Module, eqx.nn.State]:
    """A randomly initialised backbone (for training from scratch), in inference mode.

    ``model``: a registry alias (``"efficientnet-lite0"``, ``"resnet50"``, ...) or a config
    (``ResNetConfig(...)``, ``CLIPVisionConfig(...)``...). Nothing is downloaded.

    Initialisation (drawn with NumPy from ``seed``, so building a large model costs no
    compilation): convolution and linear weights He-normal over their fan-in, biases zero,
    normalisation scales one, BatchNorm running statistics mean 0 / variance 1, class and
    position embeddings N(0, 0.02).
    """
    if isinstance(model, str):
        if model not in REGISTRY:
            raise hub.SourceError(
                f"{model!r} is not a registry alias; known: {sorted(REGISTRY)}. Pass a config "
                "(e.g. eqxtl.models.resnet.RESNET50) to build another one."
            )
        entry = REGISTRY[model]
        arch, config = ARCHITECTURES[entry.architecture], entry.config
    else:
        config = model
        matches = [a for a in ARCHITECTURES.values() if isinstance(config, a.config_cls)]
        if architecture is not None:
            matches = [ARCHITECTURES[architecture]]
        if len(matches) != 1:
            raise TypeError(f"{type(config).__name__} is not the config of a known architecture.")
        arch = matches[0]
    skeleton = checkpoint.skeleton(arch, config)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, leaf in checkpoint.array_shapes(skeleton).items():
        tensors[name] = _initial_value(name, leaf.shape, rng).astype(dtype)
    return checkpoint.fill(skeleton, tensors, source="random init")


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


def _key0():
    import jax

    return jax.random.key(0)


def save_pretrained(model: eqx.Module, state: eqx.nn.State | None, path: str | os.PathLike):
    """Write ``model`` (a backbone or ``Classifier``) as ``model.safetensors`` +
    ``config.json`` in the transformers layout, atomically (a crash leaves the previous
    files intact, never half-written ones).

    ``from_pretrained(path)`` reads it back bit-identically; for CLIP and ResNet,
    transformers' own ``from_pretrained`` reads it too.
    """
    from safetensors.numpy import save_file

    backbone = model.backbone if isinstance(model, Classifier) else model
    arch: Architecture = architecture_of(backbone)
    with_head = isinstance(model, Classifier)
    tensors = {
        arch.hf_name(name, with_head): np.asarray(value)
        for name, value in checkpoint.state_dict(backbone, state).items()
    }
    num_labels = None
    if with_head:
        num_labels = model.num_classes
        for name, value in checkpoint.state_dict(model.head).items():
            tensors[arch.hf_name(f"head.{name}", True)] = np.asarray(value)
    for name in [n for n in tensors if n.endswith(".running_mean")]:
        # PyTorch's BatchNorm buffer; unused by eqxtl, written so that torch loaders find
        # every key they expect.
        tensors[name.removesuffix("running_mean") + "num_batches_tracked"] = np.zeros((), np.int64)
    config = arch.config_to_hf(backbone.config, num_labels)
    if with_head:
        config.update(labels.head_config(model))

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path, prefix=".saving-") as tmp:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        Path(tmp, "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for name in ("model.safetensors", "config.json"):
            os.replace(os.path.join(tmp, name), path / name)
    return path
