"""Feature caching for frozen backbones (linear probes): run the backbone once, train the head
on its pooled features for as many epochs as you like.

``extract_features`` computes the features of every example (in memory, or in a ``.npy`` on
disk that is reused when the same backbone, preprocessing and data come back);
``FeatureLoader`` batches them in exactly the order, padding and masking of the image
``Loader`` with the same seed, so a head trained on cached features follows the same path as
one trained live. ``fit`` does all this by itself when nothing in the backbone trains.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np

from .._util import checks
from ..errors import DataError
from ..models._arch import Preprocessing
from .loader import Loader, SourceBatches
from .sources import fingerprint


@dataclasses.dataclass(frozen=True)
class Features:
    """Pooled features of a dataset: ``features`` ``(N, D)``, ``labels`` ``(N,)`` int32 and
    ``valid`` ``(N,)`` bool (False for examples that could not be decoded)."""

    features: np.ndarray
    labels: np.ndarray
    valid: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def extract_features(
    backbone,
    state: eqx.nn.State,
    data,
    *,
    preprocessing: Preprocessing | None = None,
    batch_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
    num_workers: int | None = None,
    progress: bool = False,
    mesh=None,
) -> Features:
    """Features ``(N, D)`` of every example of ``data`` under ``backbone`` (inference mode).

    **Arguments:**

    - `backbone`: an eqxtl backbone or a ``Classifier`` (its backbone is used).
    - `data`: a source (``TFDSSource``, ``ImageFolder``, ``ArraySource``...) or any
      ``SourceBatches`` (``Loader``, ``GrainLoader``, ``ProcessShard``): its source and
      preprocessing are used, its order, augmentation and process split are not (every
      example's features are computed).
    - `cache_dir`: keep the features on disk under this directory, keyed by a fingerprint
      of the backbone's weights, the preprocessing and the data (image contents, or file
      sizes and modification times; labels; class names): a later call with the same key
      memory-maps them instead of recomputing (for datasets that do not fit in memory); a
      changed image, label or class list recomputes.
    - `mesh`: a ``jax.sharding.Mesh`` from ``eqxtl.make_mesh`` (one process): each batch is
      split over its ``"data"`` and ``"fsdp"`` axes (`batch_size` a multiple of their
      size); backbone arrays not yet on the mesh are replicated on it (``eqxtl.shard`` it
      first to split the large ones).
    """
    from ..models.registry import preprocessing_for

    batch_size = checks.count(batch_size, "extract_features(batch_size=...)", DataError)
    backbone = getattr(backbone, "backbone", backbone)
    if isinstance(data, SourceBatches):
        source = data.source
        preprocessing = preprocessing or data.preprocessing
    else:
        source = data
    preprocessing = preprocessing or preprocessing_for(backbone)
    loader = Loader(source, preprocessing, batch_size, num_workers=num_workers)
    class_names = list(getattr(source, "class_names", []) or [])

    if cache_dir is None:
        return _compute(backbone, state, loader, class_names, None, progress, mesh)
    target = Path(cache_dir) / _fingerprint(backbone, state, preprocessing, source)
    if not (target / "meta.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-new-"))
        try:
            _compute(backbone, state, loader, class_names, tmp, progress, mesh)
            try:
                os.rename(tmp, target)
            except OSError:  # another process finished the same cache first
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return Features(
        np.load(target / "features.npy", mmap_mode="r"),
        np.load(target / "labels.npy"),
        np.load(target / "valid.npy"),
        json.loads((target / "meta.json").read_text())["class_names"],
    )


@eqx.filter_jit
def pooled_batch(backbone, state, images):
    """Pooled features ``(B, D)`` of a batch ``(B, C, H, W)``; one module-level function, so
    that every extraction of the same backbone and batch shape (train, then test; each
    phase; few-shot evaluations) reuses one compile."""
    from ..models.batching import batched

    return batched(backbone)(images, state)[0]


def _compute(backbone, state, loader: Loader, class_names, out_dir: Path | None, progress, mesh):
    backbone = eqx.nn.inference_mode(backbone, True)
    forward = pooled_batch
    put = lambda x: x  # noqa: E731
    if mesh is not None:
        backbone, state, put = _on_mesh(backbone, state, mesh)
    n = len(loader.source)
    features = labels = valid = None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(loader), unit="batch", desc="features", dynamic_ncols=True)
    start = 0
    for batch in loader.epoch(0):
        out = np.asarray(forward(backbone, state, put(batch["image"])))
        if features is None:
            shape, dtype = (n, *out.shape[1:]), out.dtype
            if out_dir is None:
                features = np.empty(shape, dtype)
            else:
                path = str(out_dir / "features.npy")
                features = np.lib.format.open_memmap(path, "w+", dtype, shape)
            labels, valid = np.empty(n, np.int32), np.empty(n, bool)
        k = min(loader.batch_size, n - start)
        features[start : start + k] = out[:k]
        labels[start : start + k] = batch["label"][:k]
        valid[start : start + k] = batch["mask"][:k]
        start += k
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if features is None:
        raise ValueError("Cannot extract features from empty data.")
    if out_dir is not None:
        features.flush()
        np.save(out_dir / "labels.npy", labels)
        np.save(out_dir / "valid.npy", valid)
        (out_dir / "meta.json").write_text(json.dumps({"class_names": class_names, "n": n}))
    return Features(features, labels, valid, class_names)


def _on_mesh(backbone, state, mesh):
    """``backbone`` and ``state`` with their arrays on ``mesh`` (replicated unless already
    there), and the function that splits a batch over its data axes."""
    from jax.sharding import NamedSharding, PartitionSpec

    axes = tuple(a for a in mesh.axis_names if a in ("data", "fsdp"))
    if not axes:
        raise DataError(
            f"extract_features(mesh=...) needs a mesh with a 'data' or 'fsdp' axis "
            f"(eqxtl.make_mesh()), got axes {tuple(mesh.axis_names)}."
        )
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(x):
        if not eqx.is_array(x) or getattr(getattr(x, "sharding", None), "mesh", None) == mesh:
            return x
        return jax.device_put(x, replicated)

    backbone, state = jax.tree.map(place, (backbone, state))
    split = NamedSharding(mesh, PartitionSpec(axes))
    return backbone, state, lambda x: jax.device_put(x, split)


def _fingerprint(backbone, state, preprocessing: Preprocessing, source) -> str:
    """Hash of everything the features depend on: weights and BatchNorm statistics, the
    config, the preprocessing, and the data's images, labels and class names
    (``eqxtl.data.fingerprint``)."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves((eqx.filter(backbone, eqx.is_array), state)):
        h.update(np.asarray(leaf).tobytes())
    h.update(repr(getattr(backbone, "config", type(backbone).__name__)).encode())
    h.update(repr(preprocessing).encode())
    h.update(f"{len(source)}:{fingerprint(source)}".encode())
    return h.hexdigest()[:32]


class FeatureLoader:
    """Batches of cached features with exactly the order, padding, mask and process part of
    ``loader`` (any ``SourceBatches``: ``Loader``, ``GrainLoader``, ``ProcessShard``):
    ``{"features": (b, D), "label": (b,), "mask": (b,)}`` (``b``: this process's part of
    the global batch). Itself a ``SourceBatches`` without augmentation."""

    def __init__(self, features: Features, loader: SourceBatches):
        if len(features) != len(loader.source):
            raise ValueError(
                f"{len(features)} cached features for a source of {len(loader.source)} "
                "examples: extract the features of this source."
            )
        self.features = features
        self.loader = loader
        self.source = loader.source
        self.preprocessing = loader.preprocessing
        self.augment = None
        self.batch_size = loader.batch_size
        self.part = tuple(loader.part)

    def __len__(self) -> int:
        return len(self.loader)

    def order(self, epoch: int) -> np.ndarray:
        return self.loader.order(epoch)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        order, big = self.order(epoch), self.batch_size
        index, count = self.part
        b = big // count
        for i in range(start_step, len(self)):
            chunk = order[i * big : (i + 1) * big]
            pad = np.full(big - len(chunk), chunk[0], dtype=chunk.dtype)
            take = np.concatenate([chunk, pad])
            mask = np.concatenate([self.features.valid[chunk], np.zeros(len(pad), bool)])
            mine = slice(index * b, (index + 1) * b)
            take, mask = take[mine], mask[mine]
            labels = np.where(mask, self.features.labels[take], 0).astype(np.int32)
            yield {
                "features": np.asarray(self.features.features[take]),
                "label": labels,
                "mask": mask,
            }


def backbone_frozen(model: Any, spec: Any) -> bool:
    """True when no leaf of ``model.backbone`` trains under ``spec``."""
    backbone_spec = getattr(spec, "backbone", None)
    if backbone_spec is None:
        return False
    return not any(bool(x) for x in jax.tree.leaves(backbone_spec))
