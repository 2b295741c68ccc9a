"""Sources hold examples: ``len(source)``, ``source[i] -> (image uint8 (H, W, 3), label)`` and
``source.class_names``. ``TFDSSource`` (TFDS ArrayRecord, no TensorFlow needed), ``ImageFolder``
(``root/class_name/*.jpg``), ``ArraySource`` (numpy arrays), ``Subset`` and ``split``; the
label checks every batch source runs before training."""

from __future__ import annotations

import collections
import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from .._util import checks
from .._util.checks import real
from ..errors import CorruptImageError, DataError
from .images import _pil_rgb, _pixel_problem


class Source(Protocol):
    """What a ``Loader`` reads: ``len``, ``source[i] -> (uint8 (H, W, 3) image, int label)``
    and ``class_names``. Sources whose labels are cheap to know also have ``labels``."""

    class_names: list[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]: ...


def _check_index(index: int, n: int) -> int:
    index = int(index)
    if index < 0:
        index += n
    if not 0 <= index < n:
        raise IndexError(f"index {index} out of range for {n} examples")
    return index


_MAX_INFERRED_CLASSES = 1 << 20


class ArraySource:
    """Examples from arrays: ``images`` uint8 ``(N, H, W, 3)`` / ``(N, H, W)`` (or a list of
    differently sized images) and integer ``labels (N,)`` in ``0..num_classes-1``.

    Without ``class_names`` the classes are ``"0" .. str(max label)``. Float images must
    hold finite values in ``[0, 1]``, other integer images values in ``0..255``: both are
    checked here, so that a NaN pixel is a ``DataError`` now, not a NaN loss later.
    """

    def __init__(self, images, labels, class_names: Sequence[str] | None = None):
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                f"labels must be a 1-D integer array, got {labels.dtype} of shape {labels.shape}."
            )
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels.")
        if isinstance(images, np.ndarray) and images.ndim not in (3, 4):
            raise DataError(f"images must be (N, H, W, 3) or (N, H, W); got shape {images.shape}.")
        if class_names is None:
            top = int(labels.max()) if len(labels) else -1
            if top >= _MAX_INFERRED_CLASSES:
                raise DataError(
                    f"Label {top} would make {top + 1} classes; labels must lie in "
                    "0..num_classes-1. Pass class_names= (one per class) or fix the labels."
                )
            class_names = [str(i) for i in range(top + 1)]
        class_names = _distinct(list(class_names), "ArraySource(class_names=...)")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
            bad = int(np.flatnonzero((labels < 0) | (labels >= len(class_names)))[0])
            raise DataError(
                f"labels must lie in 0..{len(class_names) - 1} ({len(class_names)} classes); "
                f"got [{labels.min()}, {labels.max()}] (label {labels[bad]} at index {bad})."
            )
        _check_pixels(images)
        self.images = images
        self.labels = labels.astype(np.int64)
        self.class_names = class_names

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        index = _check_index(index, len(self))
        return self.images[index], int(self.labels[index])

    def __repr__(self) -> str:
        return f"ArraySource({len(self)} examples, {len(self.class_names)} classes)"

    def fingerprint(self) -> str:
        """Hash of the pixels, labels and class names (see ``fingerprint``)."""
        h = _hasher(self.class_names, self.labels)
        images = [self.images] if isinstance(self.images, np.ndarray) else self.images
        for image in images:
            _hash_array(h, np.asarray(image))
        return h.hexdigest()


def _check_pixels(images, offset: int = 0) -> None:
    """``DataError`` naming the first image whose values ``as_rgb`` would refuse (an array
    of images is checked 64 MiB at a time, to bound the temporaries)."""
    if isinstance(images, np.ndarray):
        if images.dtype == np.uint8 or not len(images):
            return
        step = max(1, (64 << 20) // max(images[0].nbytes, 1))
        for start in range(0, len(images), step):
            if _pixel_problem(images[start : start + step]) is not None:
                _check_pixels(list(images[start : start + step]), offset=start)
        return
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            problem = _pixel_problem(np.asarray(image))
            if problem is not None:
                raise DataError(f"Image {offset + i}: {problem}")


def _distinct(names: list, what: str) -> list:
    """``names``, or ``DataError`` naming the first repeated one (two labels, one class)."""
    seen: set = set()
    for name in names:
        if name in seen:
            raise DataError(
                f"{what}: {name!r} appears twice. Give each class once, in label order "
                "(e.g. the training source's class_names)."
            )
        seen.add(name)
    return names


def _hasher(class_names: Sequence[str], labels: np.ndarray):
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(list(class_names)).encode())
    _hash_array(h, np.asarray(labels, np.int64))
    return h


def _hash_array(h, a: np.ndarray) -> None:
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).data)


def fingerprint(source: Source) -> str:
    """A hash of everything a source holds: its images, labels and class names.

    Sources that can say it cheaply have a ``fingerprint()`` method (``ArraySource``:
    hashes its arrays; ``ImageFolder``: file paths, sizes and modification times;
    ``Subset``: its indices and its source's fingerprint; ``TFDSSource``: the prepared
    files). Any other source is read example by example and hashed (give a custom source a
    ``fingerprint()`` method to avoid that). ``extract_features(cache_dir=...)`` keys its
    cache on this.
    """
    method = getattr(source, "fingerprint", None)
    if callable(method):
        return f"{type(source).__qualname__}:{method()}"
    h = _hasher(list(getattr(source, "class_names", []) or []), np.zeros(0, np.int64))
    for i in range(len(source)):
        image, label = source[i]
        _hash_array(h, np.asarray(image))
        h.update(f":{int(label)};".encode())
    return f"{type(source).__qualname__}:{h.hexdigest()}"


def check_labels(source: Source, num_classes: int) -> None:
    """Raise ``DataError`` unless ``source`` fits a model with ``num_classes`` outputs.

    It must not have more class names than ``num_classes``, and every label must lie in
    ``[0, num_classes)``. Labels are checked here when the source knows them cheaply (a
    ``labels`` array: ``ArraySource``, ``ImageFolder``, ``Subset`` of those); the ``Loader``
    checks each label it reads against the source's class names in any case. ``source``
    may be any ``SourceBatches`` (``Loader``, ``GrainLoader``, ...: its source is checked).
    """
    data = _read_by(source)
    names = list(getattr(data, "class_names", None) or [])
    if len(names) > num_classes:
        raise DataError(
            f"{data!r} has {len(names)} classes but the model predicts {num_classes}: build "
            f"the head with num_classes=len(source.class_names) ({len(names)})."
        )
    labels = getattr(data, "labels", None)
    if labels is None:
        return
    labels = np.asarray(labels)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        i = int(bad[0])
        raise DataError(
            f"Label {labels[i]} of example {i} of {data!r} is outside [0, {num_classes}) "
            f"({len(bad)} such labels); the model predicts {num_classes} classes. Fix the "
            "labels, or build the head with as many classes as the data has."
        )


def _read_by(data):
    """The source a ``SourceBatches`` reads, or ``data`` itself."""
    from .loader import SourceBatches  # (the loader module builds on this one)

    return data.source if isinstance(data, SourceBatches) else data


def check_same_classes(train: Source, other: Source, what: str = "test data") -> None:
    """Raise ``DataError`` unless ``other`` has exactly ``train``'s class names, in the
    same order (label ``i`` must mean the same class in both). Either may be a
    ``SourceBatches`` (``Loader``, ``GrainLoader``, ...).
    """
    a = list(getattr(_read_by(train), "class_names", None) or [])
    b = list(getattr(_read_by(other), "class_names", None) or [])
    if a == b:
        return
    missing = [n for n in a if n not in b]
    extra = [n for n in b if n not in a]
    if missing or extra:
        diff = "; ".join(
            part
            for part in (
                f"missing {missing}" if missing else "",
                f"not in the training data {extra}" if extra else "",
            )
            if part
        )
    else:
        diff = f"the same classes in another order: training {a}, {what} {b}"
    raise DataError(
        f"The {what} classes differ from the training data's ({diff}), so label i would "
        "mean another class in each. Give both the training class list, e.g. "
        "ImageFolder(val_root, class_names=train.class_names) or "
        "ArraySource(images, labels, class_names=train.class_names)."
    )


class Subset:
    """The examples of ``source`` at ``indices`` (in that order)."""

    def __init__(self, source: Source, indices: Sequence[int]):
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(source)
        if len(indices) and (indices.min() < -n or indices.max() >= n):
            raise DataError(f"Subset indices out of range for a source of {n} examples.")
        self.source = source
        self.indices = indices % max(n, 1)
        self.class_names = list(source.class_names)

    @property
    def labels(self) -> np.ndarray:
        """Labels ``(len,)``; available when the underlying source has ``labels``."""
        return np.asarray(self.source.labels)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.source[int(self.indices[_check_index(index, len(self))])]

    def __repr__(self) -> str:
        return f"Subset({len(self)} of {self.source!r})"

    def fingerprint(self) -> str:
        """Hash of the indices and of the underlying source's ``fingerprint``."""
        h = hashlib.blake2b(fingerprint(self.source).encode(), digest_size=16)
        _hash_array(h, self.indices)
        return h.hexdigest()


def split(source: Source, fraction: float, seed: int = 0) -> tuple[Subset, Subset]:
    """Split ``source`` into ``(train, test)`` with ``fraction`` of the examples in ``test``.

    Deterministic in ``seed``. Stratified (each class split in the same proportion, at least
    one test example per class with two or more examples) when the source has ``labels``
    (``ArraySource``, ``ImageFolder``, ``Subset`` of those); a plain random split otherwise.
    """
    fraction = real(
        fraction, "split(fraction=...)", DataError, low=0, high=1, low_open=True, high_open=True
    )
    rng = np.random.default_rng(checks.count(seed, "split(seed=...)", DataError, minimum=0))
    labels = getattr(source, "labels", None)
    if labels is None:
        perm = rng.permutation(len(source))
        n_test = max(1, round(fraction * len(source))) if len(source) > 1 else 0
        test = perm[:n_test]
    else:
        labels = np.asarray(labels)
        test = []
        for c in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == c))
            n_test = round(fraction * len(members))
            if len(members) >= 2:
                n_test = min(max(n_test, 1), len(members) - 1)
            test.append(members[:n_test])
        test = np.concatenate(test) if test else np.zeros(0, np.int64)
    is_test = np.zeros(len(source), bool)
    is_test[test] = True
    return Subset(source, np.flatnonzero(~is_test)), Subset(source, np.flatnonzero(is_test))


IMAGE_EXTENSIONS = (
    *(".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"),
    *(".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".jp2"),
)


class ImageFolder:
    """Images in ``root/<class_name>/**/<file>``; classes are the sorted names of the
    subdirectories of ``root``, or ``class_names`` when given.

    ``class_names`` maps folders to labels by name: pass the training source's list for a
    validation or test folder (``ImageFolder(val_root, class_names=train.class_names)``) so
    that label ``i`` means the same class in both, even when a folder is missing (an empty
    class, with a warning) or sorts differently. A folder not in the list is a
    ``DataError``.

    Hidden folders and files (names starting with ``.``: ``.ipynb_checkpoints``,
    ``.DS_Store``, macOS ``._*`` files) are left out silently. Files with an extension in
    ``IMAGE_EXTENSIONS`` (any case) are checked at construction with PIL's ``verify``
    (reads headers, cheap); those that fail are left out and listed in ``skipped`` as
    ``(path, reason)``; files of other types are listed in ``ignored``. ``report()`` says
    what was found; it is also a warning when files were skipped or ignored or a class is
    empty. A file that still fails to decode when read raises ``CorruptImageError``, which
    the ``Loader`` masks out with a warning. Reading applies the EXIF orientation and
    scales 16-bit images to 8 bits (see ``as_rgb``).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        class_names: Sequence[str] | None = None,
        verify: bool = True,
    ):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"ImageFolder root {str(root)!r} is not a directory.")
        self.root = root
        folders = sorted(
            d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
        )
        self.ignored: list[Path] = [
            f for f in sorted(root.iterdir()) if f.is_file() and not f.name.startswith(".")
        ]
        if class_names is None:
            self.class_names = folders
        else:
            self.class_names = _distinct(
                [str(n) for n in class_names], "ImageFolder(class_names=...)"
            )
            unknown = [f for f in folders if f not in self.class_names]
            if unknown:
                raise DataError(
                    f"ImageFolder {str(root)!r} has folders {unknown} that are not among "
                    f"the given class_names {self.class_names}: remove them, or use the "
                    "training data's class list."
                )
        self.paths: list[Path] = []
        labels: list[int] = []
        self.skipped: list[tuple[Path, str]] = []
        for label, name in enumerate(self.class_names):
            if not (root / name).is_dir():
                continue
            for path in sorted((root / name).rglob("*")):
                if any(part.startswith(".") for part in path.relative_to(root).parts):
                    continue
                if not path.is_file():
                    continue
                if path.suffix.lower() not in IMAGE_EXTENSIONS:
                    self.ignored.append(path)
                    continue
                reason = _verify(path) if verify else None
                if reason is not None:
                    self.skipped.append((path, reason))
                    continue
                self.paths.append(path)
                labels.append(label)
        self.labels = np.asarray(labels, np.int64)
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        self.empty_classes = [n for n, c in zip(self.class_names, counts, strict=True) if not c]
        if not self.paths:
            raise DataError(
                f"No readable images under {str(root)!r}: expected root/<class_name>/<image> "
                f"with extensions {', '.join(IMAGE_EXTENSIONS)}. {self.report()}"
            )
        if self.skipped or self.ignored or self.empty_classes:
            warnings.warn(self.report(), stacklevel=2)

    def report(self) -> str:
        """A one-paragraph summary: classes, images per class, empty classes, skipped
        (unreadable) and ignored (other types) files."""
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        per_class = ", ".join(f"{n}: {c}" for n, c in zip(self.class_names, counts, strict=True))
        lines = [
            f"ImageFolder {str(self.root)!r}: {len(self.paths)} images in "
            f"{len(self.class_names)} classes ({per_class or 'none'})."
        ]
        if self.empty_classes:
            lines.append(f"Empty classes (no images): {', '.join(self.empty_classes)}.")
        if self.skipped:
            shown = "; ".join(f"{p} ({why})" for p, why in self.skipped[:5])
            more = f" and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
            lines.append(f"Skipped {len(self.skipped)} unreadable files: {shown}{more}.")
        if self.ignored:
            kinds = collections.Counter(p.suffix.lower() or "(no extension)" for p in self.ignored)
            shown = ", ".join(f"{k}: {n}" for k, n in kinds.most_common())
            lines.append(
                f"Ignored {len(self.ignored)} files that are not images ({shown}); image "
                f"extensions are {', '.join(IMAGE_EXTENSIONS)}."
            )
        return " ".join(lines)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        index = _check_index(index, len(self))
        path = self.paths[index]
        try:
            with Image.open(path) as im:
                rgb = _pil_rgb(im)
        except (OSError, ValueError, SyntaxError) as e:
            raise CorruptImageError(f"Cannot decode {path}: {e}") from e
        return rgb, int(self.labels[index])

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r})"

    def fingerprint(self) -> str:
        """Hash of the class names, labels and each file's path, size and modification
        time (a file rewritten in place changes its mtime)."""
        h = _hasher(self.class_names, self.labels)
        for path in self.paths:
            st = path.stat()
            h.update(f"{path.relative_to(self.root)}:{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()


def _verify(path: Path) -> str | None:
    """``None`` if PIL can identify and verify ``path``, else the reason it cannot."""
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises many kinds for bad files
        return f"{type(e).__name__}: {e}"
    return None


class TFDSSource:
    """One split of a prepared TFDS dataset, read with ``tfds.data_source`` (ArrayRecord,
    random access; TensorFlow is not needed to read).

    Nothing is downloaded here: if the dataset is not prepared in ``data_dir`` (default
    ``~/tensorflow_datasets``) this raises ``DataError`` at once, saying how to prepare it.
    ``split`` takes TFDS slicing (``"train[:80%]"``; ignored under ``tfds.testing.mock_data``).
    ``class_names`` come from the builder's ``features[label_key].names``.
    """

    def __init__(
        self,
        name: str,
        split: str,
        data_dir: str | os.PathLike | None = None,
        *,
        image_key: str = "image",
        label_key: str = "label",
    ):
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise DataError(
                "Reading TFDS datasets needs tensorflow-datasets: in the eqxtl clone, "
                f'pip install -e ".[tfds]" ({e}).'
            ) from e
        self.name, self.split = name, split
        self.image_key, self.label_key = image_key, label_key
        self.data_dir = data_dir = None if data_dir is None else os.fspath(data_dir)
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except Exception as e:
            raise DataError(f"Cannot load the TFDS builder {name!r}: {e}") from e
        try:
            self._data = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:
            raise DataError(_tfds_error(name, split, data_dir, builder, e)) from e
        self.class_names = list(builder.info.features[label_key].names)
        self._prepared_dir = Path(builder.data_dir)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"TFDSSource({self.name!r}, {self.split!r})"

    def fingerprint(self) -> str:
        """Hash of the dataset name, split, keys, class names and the prepared files'
        names, sizes and modification times."""
        h = _hasher(self.class_names, np.zeros(0, np.int64))
        h.update(repr((self.name, self.split, self.image_key, self.label_key)).encode())
        if self._prepared_dir.is_dir():
            for path in sorted(self._prepared_dir.iterdir()):
                st = path.stat()
                h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        # One record at a time: `__getitems__` is broken under tfds.testing.mock_data.
        record = self._data[_check_index(index, len(self))]
        return np.asarray(record[self.image_key]), int(record[self.label_key])


def _tfds_error(name: str, split: str, data_dir: str | None, builder, error: Exception) -> str:
    dir_arg = "" if data_dir is None else f", data_dir={data_dir!r}"
    prepare = (
        f'  pip install -e ".[tfds-prepare]"   (in the eqxtl clone)\n'
        f'  python -c "import tensorflow_datasets as tfds; '
        f"tfds.data_source('{name}'{dir_arg})\"\n"
    )
    if not builder.is_prepared():
        return (
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir}.\n"
            f"Prepare it once (downloads; writing needs TensorFlow):\n{prepare}"
            f"or pass data_dir (--data-dir) pointing at a directory that already holds it."
        )
    return (
        f"Cannot open split {split!r} of TFDS dataset {name!r} in {builder.data_dir} "
        f"({type(error).__name__}: {error}).\n"
        f"Splits: {sorted(builder.info.splits)}. Random access needs the ArrayRecord format; "
        f"a dataset prepared as TFRecord must be prepared again with:\n{prepare}"
    )
