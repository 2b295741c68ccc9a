"""A Hugging Face ``datasets.Dataset`` as a source (``HFDataset``): random access to one
image column and one label column, class names from the ``ClassLabel`` feature."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import CorruptImageError, DataError
from .images import as_rgb
from .sources import _check_index, _hasher


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            "HFDataset needs the Hugging Face datasets library: in the eqxtl clone, "
            f'pip install -e ".[hf]" ({e}).'
        ) from e
    return datasets


class HFDataset:
    """One split of a Hugging Face ``datasets.Dataset`` (map-style, random access).

    >>> ds = datasets.load_dataset("beans", split="train")
    >>> train = eqxtl.HFDataset(ds)                     # columns "image" and "label"

    **Arguments:**

    - `dataset`: a ``datasets.Dataset`` (one split: ``load_dataset(name, split="train")``,
      or ``dataset_dict["train"]``). A streaming ``IterableDataset`` is refused: training
      needs random access and a known length (every batch is a pure function of
      ``(seed, epoch, step)``, so that a resumed run reads the batches it missed);
      materialise the part you need first, e.g.
      ``datasets.Dataset.from_list(list(stream.take(n)), features=stream.features)``.
    - `image`: the column of images: an ``Image`` feature (decoded to PIL images; EXIF
      orientation and 16-bit modes handled as ``as_rgb`` does), or arrays ``(H, W)`` /
      ``(H, W, C)`` (``Array2D``/``Array3D`` or nested lists of numbers) with values in
      ``0..255`` (integers) or ``[0, 1]`` (floats). A string column of file paths is refused
      with the cast that makes it an image column.
    - `label`: the column of integer class labels. A ``ClassLabel`` feature gives the class
      names; a plain integer column needs `class_names`; a string column is refused with the
      call that encodes it (``dataset.class_encode_column(label)``).
    - `class_names`: one name per class, for a plain integer label column.

    Labels are read once here (``labels``, checked to lie in ``0..len(class_names)-1``: a
    ``-1``, how ``ClassLabel`` marks a missing label, is a ``DataError``); images are decoded
    when read. An example without an image (``None``) or whose image cannot be decoded
    raises ``CorruptImageError``, which the ``Loader`` masks out with a warning.
    ``fingerprint()`` (for the feature cache) hashes the dataset's own fingerprint, which
    ``datasets`` derives from its contents or files and every transformation applied.
    """

    def __init__(
        self,
        dataset: Any,
        image: str = "image",
        label: str = "label",
        *,
        class_names: Sequence[str] | None = None,
    ):
        datasets = _datasets()
        _check_map_style(dataset, datasets)
        features = dict(dataset.features)
        for role, column in (("image", image), ("label", label)):
            if column not in features:
                raise DataError(
                    f"HFDataset({role}={column!r}): the dataset has no column {column!r}; its "
                    f"columns are {_columns(features)}. Pass {role}= one of them."
                )
        kind = _image_kind(features, image, datasets)
        self.labels, self.class_names = _labels(dataset, label, features, class_names, datasets)
        images = dataset.select_columns([image])
        if kind == "undecoded":  # Image(decode=False): bytes and paths; decode here
            images = images.cast_column(image, datasets.Image(decode=True))
        self._images = images.with_format("numpy" if kind == "array" else None)
        self.dataset = dataset
        self.image, self.label = image, label

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        index = _check_index(index, len(self))
        try:
            value = self._images[index][self.image]
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for bad image bytes
            raise CorruptImageError(
                f"Cannot decode the {self.image!r} image of example {index} of {self!r}: {e}"
            ) from e
        if value is None:
            raise CorruptImageError(f"Example {index} of {self!r} has no image (None)")
        try:
            rgb = as_rgb(value)
        except DataError as e:
            raise DataError(f"Example {index} of {self!r}, column {self.image!r}: {e}") from e
        return rgb, int(self.labels[index])

    def __repr__(self) -> str:
        return (
            f"HFDataset({len(self)} examples, image={self.image!r}, label={self.label!r}, "
            f"{len(self.class_names)} classes)"
        )

    def fingerprint(self) -> str:
        """Hash of the dataset's fingerprint (``datasets`` derives it from the data, or its
        files and their modification times, and every transformation), the columns, the
        labels and the class names."""
        h = _hasher(self.class_names, self.labels)
        # a dataset that cannot be hashed gets a random fingerprint: a cache miss, never a
        # stale hit
        h.update(repr((self.image, self.label, self.dataset._fingerprint)).encode())
        return h.hexdigest()


def _columns(features: dict) -> str:
    return ", ".join(f"{name!r} ({_kind_name(f)})" for name, f in features.items())


def _kind_name(feature) -> str:
    return repr(feature) if len(repr(feature)) <= 40 else type(feature).__name__


def _check_map_style(dataset, datasets) -> None:
    if isinstance(dataset, datasets.Dataset):
        return
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise DataError(
            f"HFDataset takes one split, got a {type(dataset).__name__} with splits "
            f"{list(dataset)}: pass dataset[{next(iter(dataset), 'train')!r}] (or "
            "load_dataset(..., split=...))."
        )
    if isinstance(dataset, datasets.IterableDataset):
        raise DataError(
            "HFDataset needs a map-style datasets.Dataset (random access, a known length: "
            "batches are a pure function of (seed, epoch, step)); this is a streaming "
            "IterableDataset. Load it without streaming=True, or materialise the examples you "
            "need: datasets.Dataset.from_list(list(stream.take(n)), features=stream.features)."
        )
    raise DataError(
        f"HFDataset takes a datasets.Dataset, got {type(dataset).__name__}; for numpy arrays "
        "use eqxtl.ArraySource(images, labels), for a folder eqxtl.ImageFolder(root)."
    )


_NUMERIC = ("int", "uint", "float", "bool")


def _image_kind(features: dict, column: str, datasets) -> str:
    """``"image"`` (decoded PIL), ``"undecoded"`` (an ``Image(decode=False)``) or
    ``"array"`` (numbers nested 2 or 3 deep); ``DataError`` for anything else."""
    feature = features[column]
    if isinstance(feature, datasets.Image):
        return "image" if feature.decode else "undecoded"
    shape = getattr(feature, "shape", None)  # Array2D / Array3D
    if shape is not None and len(shape) in (2, 3):
        return "array"
    depth, leaf = 0, feature
    while hasattr(leaf, "feature"):  # List / Sequence / LargeList
        leaf, depth = leaf.feature, depth + 1
    dtype = str(getattr(leaf, "dtype", ""))
    if depth in (2, 3) and dtype.startswith(_NUMERIC):
        return "array"
    hint = ""
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        hint = (
            f" If it holds image file paths, make it an image column: "
            f"dataset.cast_column({column!r}, datasets.Image())."
        )
    raise DataError(
        f"HFDataset(image={column!r}): column {column!r} holds {_kind_name(feature)}, not "
        f"images (an Image feature, or arrays (H, W) / (H, W, C)).{hint} The columns are "
        f"{_columns(features)}."
    )


def _labels(dataset, column: str, features: dict, class_names, datasets):
    """``(labels int64 (N,), class_names)``, checked against each other."""
    feature = features[column]
    if isinstance(feature, datasets.ClassLabel):
        if class_names is not None and list(class_names) != list(feature.names):
            raise DataError(
                f"HFDataset(class_names=...) {list(class_names)} differ from the names of the "
                f"ClassLabel column {column!r}, {feature.names}: leave class_names out, or "
                f"relabel the column (dataset.cast_column({column!r}, "
                "datasets.ClassLabel(names=[...])))."
            )
        class_names = list(feature.names)
    elif not (isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))):
        encode = ""
        if isinstance(feature, datasets.Value) and "string" in feature.dtype:
            encode = f" Encode the strings as classes: dataset.class_encode_column({column!r})."
        raise DataError(
            f"HFDataset(label={column!r}): column {column!r} holds {_kind_name(feature)}, not "
            f"integer class labels.{encode} The columns are {_columns(features)}."
        )
    elif class_names is None:
        raise DataError(
            f"HFDataset(label={column!r}): column {column!r} is a plain integer column, "
            "without class names: pass class_names=[...] (one per class), or make it a "
            f"ClassLabel: dataset.cast_column({column!r}, datasets.ClassLabel(names=[...]))."
        )
    class_names = [str(n) for n in class_names]
    labels = np.asarray(dataset.select_columns([column]).with_format("numpy")[column])
    if not np.issubdtype(labels.dtype, np.integer):  # None (no label) reads as NaN
        missing = [i for i, v in enumerate(labels.tolist()) if v is None or v != v]
        raise DataError(
            f"HFDataset(label={column!r}): {len(missing)} examples have no label (the first: "
            f"example {missing[0] if len(missing) else '?'}): drop them first, "
            f"dataset.filter(lambda x: x[{column!r}] is not None)."
        )
    bad = np.flatnonzero((labels < 0) | (labels >= len(class_names)))
    if len(bad):
        i = int(bad[0])
        why = " (-1: ClassLabel's mark for a missing label, e.g. an unlabelled test split)"
        raise DataError(
            f"HFDataset(label={column!r}): label {labels[i]} of example {i} is outside "
            f"0..{len(class_names) - 1} ({len(class_names)} classes; {len(bad)} such labels)"
            f"{why if labels[i] == -1 else ''}. Drop or fix those examples."
        )
    return labels.astype(np.int64), class_names
