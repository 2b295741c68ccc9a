"""Images from sources into fixed-shape batches.

Three pieces, each with one job:

- **Sources** hold examples: ``len(source)``, ``source[i] -> (image uint8 (H, W, 3), label)``
  and ``source.class_names``. ``TFDSSource`` (TFDS ArrayRecord, no TensorFlow needed),
  ``ImageFolder`` (``root/class_name/*.jpg``), ``ArraySource`` (numpy arrays), ``Subset`` and
  ``split``.
- **Preprocessing** turns one image into the float32 ``(3, crop, crop)`` array a checkpoint
  expects (``preprocess``): resize the shortest side, center crop, scale, normalise.
  ``Augment`` is the training-time variant (random resized crop, horizontal flip), a pure
  function of ``(seed, epoch, index)``.
- **Loader** yields batches ``{"image": float32 (B, 3, S, S), "label": int32 (B,),
  "mask": bool (B,)}`` of one fixed shape: the last partial batch is padded and masked, so
  a jitted step never recompiles. The order is a pure function of ``(seed, epoch)``, so a
  resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageOps

from .errors import CorruptImageError, DataError
from .models._arch import Preprocessing as Preprocessing

# ---------------------------------------------------------------- preprocessing


_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def as_rgb(image: Any) -> np.ndarray:
    """Any reasonable image as a uint8 ``(H, W, 3)`` RGB array.

    Accepts PIL images (any mode; EXIF orientation applied, 16-bit modes scaled to 8 bits),
    numpy arrays ``(H, W)`` (grayscale), ``(H, W, 1)``, ``(H, W, 3)`` (RGB) or ``(H, W, 4)``
    (RGBA: alpha dropped), with uint8 or other integer values in ``0..255`` or float values
    in ``[0, 1]`` (rounded to uint8: resizing works on 8-bit images, as in PIL-based
    reference preprocessors). Anything else raises ``DataError``.
    """
    if isinstance(image, Image.Image):
        return _pil_rgb(image)
    a = np.asarray(image)
    if a.dtype == object or a.ndim not in (2, 3):
        raise DataError(
            f"Expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got "
            f"shape {a.shape} (dtype {a.dtype}). Pass one image at a time, channels last."
        )
    if a.size == 0:
        raise DataError(f"Got an empty image of shape {a.shape}.")
    if a.ndim == 3 and a.shape[-1] not in (1, 3, 4):
        hint = ""
        if a.shape[0] in (1, 3, 4):
            hint = " It looks channels-first; pass np.transpose(image, (1, 2, 0))."
        raise DataError(f"Expected 1, 3 or 4 channels in the last axis; got shape {a.shape}.{hint}")
    a = _to_uint8(a)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.shape[-1] == 1:
        return np.repeat(a, 3, axis=-1)
    return np.ascontiguousarray(a[..., :3])


def _to_uint8(a: np.ndarray) -> np.ndarray:
    problem = _pixel_problem(a)
    if problem is not None:
        raise DataError(problem)
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.integer):
        return a.astype(np.uint8)
    return np.round(a * 255).astype(np.uint8)


def _pixel_problem(a: np.ndarray) -> str | None:
    """Why the pixel values of ``a`` cannot be read as an image (``None`` when they can)."""
    if a.dtype == np.uint8 or a.dtype == bool or a.size == 0:
        return None
    if np.issubdtype(a.dtype, np.integer):
        if a.min() < 0 or a.max() > 255:
            return (
                f"Integer images must hold values in 0..255; got {a.dtype} in "
                f"[{a.min()}, {a.max()}]. Rescale to uint8 first."
            )
        return None
    if np.issubdtype(a.dtype, np.floating):
        finite = np.isfinite(a)
        if not finite.all():
            return (
                f"The image holds {a.size - np.count_nonzero(finite)} NaN or infinite "
                f"pixel values ({a.dtype}); pass finite values in [0, 1] (or uint8 0..255)."
            )
        if a.min() < 0 or a.max() > 1:
            return (
                f"Float images must hold values in [0, 1]; got {a.dtype} in "
                f"[{a.min()}, {a.max()}]. Pass uint8 0..255 (or divide by 255)."
            )
        return None
    return f"Unsupported image dtype {a.dtype}; pass uint8 (H, W, 3)."


_ORIENTATION = 0x0112  # the EXIF tag


def _pil_rgb(im: Image.Image) -> np.ndarray:
    """A PIL image as uint8 ``(H, W, 3)``: EXIF orientation applied (photos from phones
    store it there), 16-bit modes scaled by ``255 / 65535`` (``convert("RGB")`` would clip
    every value above 255 to white)."""
    if im.getexif().get(_ORIENTATION, 1) != 1:
        im = ImageOps.exif_transpose(im)  # (a copy: only when there is something to undo)
    if im.mode.startswith("I;16") or (im.mode == "I" and np.asarray(im).max() > 255):
        a = np.asarray(im)
        if a.min() < 0 or a.max() > 65535:
            raise DataError(
                f"A {im.mode} image with values in [{a.min()}, {a.max()}]: not 8 or 16 bits."
            )
        gray = np.round(a.astype(np.float32) * (255 / 65535)).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=-1)
    return np.asarray(im.convert("RGB"))


def resize_shortest_size(height: int, width: int, size: int) -> tuple[int, int]:
    """``(new_height, new_width)`` with the shortest side ``size`` and the aspect ratio kept,
    rounding the long side down (as transformers' ``get_resize_output_image_size``)."""
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if height <= width else (new_long, new_short)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The central ``(size, size)`` window of ``image (H, W, C)``; a side shorter than
    ``size`` is zero-padded first, the odd pixel before (as transformers' ``center_crop``)."""
    h, w = image.shape[:2]
    if h < size or w < size:
        ph, pw = max(size - h, 0), max(size - w, 0)
        image = np.pad(image, ((ph - ph // 2, ph // 2), (pw - pw // 2, pw // 2), (0, 0)))
        h, w = image.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return image[top : top + size, left : left + size]


def normalise(image: np.ndarray, p: Preprocessing) -> np.ndarray:
    """uint8 ``(S, S, 3)`` → float32 ``(3, S, S)``: ``(x * scale - mean) / std``."""
    lut = _lookup_table(p)
    out = np.empty((3, *image.shape[:2]), np.float32)
    for c in range(3):
        np.take(lut[c], image[..., c], out=out[c])
    return out


@functools.lru_cache(maxsize=16)
def _lookup_table(p: Preprocessing) -> np.ndarray:
    """``(3, 256)`` float32: the normalised value of every uint8 level per channel (a table
    lookup is ~4x faster than the arithmetic on each pixel, and gives the same floats)."""
    levels = np.arange(256, dtype=np.float32)[None, :] * np.float32(p.scale)
    mean, std = (np.asarray(v, np.float32)[:, None] for v in (p.mean, p.std))
    return (levels - mean) / std


def preprocess(image: Any, p: Preprocessing) -> np.ndarray:
    """One image → float32 ``(3, p.crop, p.crop)``, ready for the model.

    ``image``: see ``as_rgb`` (uint8 ``(H, W, 3)`` RGB is the usual case). Steps: PIL resize
    of the shortest side to ``p.resize`` with ``p.interpolation``, center crop ``p.crop``
    (zero-padded if smaller), ``* p.scale``, ``(x - mean) / std``, channels first. With
    ``p.squash``: a resize of both sides to ``p.crop`` instead of the resize and crop.
    """
    rgb = as_rgb(image)
    if p.squash:
        pil = Image.fromarray(rgb).resize((p.crop, p.crop), _RESAMPLE[p.interpolation])
        return normalise(np.asarray(pil), p)
    h, w = resize_shortest_size(*rgb.shape[:2], p.resize)
    pil = Image.fromarray(rgb).resize((w, h), _RESAMPLE[p.interpolation])
    return normalise(center_crop(np.asarray(pil), p.crop), p)


# ---------------------------------------------------------------- augmentation


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training-time augmentation: random resized crop, then horizontal flip.

    The crop takes a window of ``scale`` × the image area with aspect ratio in ``ratio``
    (log-uniform), resized straight to ``(crop, crop)`` with the preprocessing's filter
    (torchvision's ``RandomResizedCrop``). The default ``scale=(0.35, 1.0)`` is milder than
    ImageNet-from-scratch training's ``(0.08, 1.0)``: fine-tuning a pretrained backbone for a
    few epochs on a small dataset benefits from views that still show the object.

    Randomness comes from the ``np.random.Generator`` passed in; the ``Loader`` seeds it from
    ``(seed, epoch, index)`` so a resumed run repeats exactly the same views.
    """

    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    """Probability of a horizontal flip."""

    def __post_init__(self):
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise DataError(f"Augment.scale must satisfy 0 < lo <= hi <= 1, got {self.scale}.")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise DataError(f"Augment.ratio must satisfy 0 < lo <= hi, got {self.ratio}.")
        if not 0 <= self.flip <= 1:
            raise DataError(f"Augment.flip is a probability, got {self.flip}.")

    def window(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, ...]:
        """A random crop box ``(left, top, right, bottom)`` inside ``(height, width)``."""
        area = height * width
        log_ratio = np.log(self.ratio)
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = float(np.exp(rng.uniform(*log_ratio)))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return left, top, left + w, top + h
        # Fallback (extreme aspect ratios): the largest central window within `ratio`.
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
        return left, top, left + w, top + h

    def __call__(self, image: Any, p: Preprocessing, rng: np.random.Generator) -> np.ndarray:
        """One image → float32 ``(3, p.crop, p.crop)``, a random view of it."""
        rgb = as_rgb(image)
        box = self.window(*rgb.shape[:2], rng)
        size = (p.crop, p.crop)
        pil = Image.fromarray(rgb).resize(size, _RESAMPLE[p.interpolation], box=box)
        out = np.asarray(pil)
        if rng.uniform() < self.flip:
            out = out[:, ::-1]
        return normalise(out, p)


# ---------------------------------------------------------------- sources


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
        class_names = list(class_names)
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
    may be a ``Loader`` (its source is checked).
    """
    data = source.source if isinstance(source, Loader) else source
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


def check_same_classes(train: Source, other: Source, what: str = "test data") -> None:
    """Raise ``DataError`` unless ``other`` has exactly ``train``'s class names, in the
    same order (label ``i`` must mean the same class in both). Either may be a ``Loader``.
    """
    a = list(getattr(train, "class_names", None) or [])
    b = list(getattr(other, "class_names", None) or [])
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
    if not 0 < fraction < 1:
        raise DataError(f"split fraction must be in (0, 1), got {fraction}.")
    rng = np.random.default_rng(seed)
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


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


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
            self.class_names = [str(n) for n in class_names]
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
                f'Reading TFDS datasets needs tensorflow-datasets: pip install "eqxtl[tfds]" ({e}).'
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
        f'  pip install "eqxtl[tfds-prepare]"\n'
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


# ---------------------------------------------------------------- batching


class Loader:
    """Fixed-shape batches from a source, decoded and preprocessed in background threads.

    ``loader.epoch(e)`` yields ``len(loader)`` dicts ``{"image": float32 (B, 3, S, S),
    "label": int32 (B,), "mask": bool (B,)}``. A last partial batch is filled with copies of
    its first example (label 0) with ``mask`` False (or dropped with ``drop_last``). With
    ``shuffle`` the order is ``np.random.default_rng((seed, epoch)).permutation(N)`` and
    ``augment`` draws from ``default_rng((seed, epoch, index))``: ``epoch(e, start_step=k)``
    yields exactly the batches ``k, k+1, ...`` of ``epoch(e)``.

    **Arguments:**

    - `num_workers`: threads decoding and preprocessing (PIL releases the GIL); ``0`` works in
      the calling thread. Default ``min(8, os.cpu_count())``.
    - `prefetch`: how many batches are prepared ahead of the consumer.
    """

    def __init__(
        self,
        source: Source,
        preprocessing: Preprocessing,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        augment: Augment | None = None,
        num_workers: int | None = None,
        drop_last: bool = False,
        prefetch: int = 2,
    ):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}.")
        if seed < 0:
            raise DataError(f"seed must be >= 0 (it seeds numpy Generators), got {seed}.")
        self.source = source
        self.preprocessing = preprocessing
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.augment = augment
        self.num_workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
        self.drop_last = drop_last
        self.prefetch = max(1, int(prefetch))
        names = getattr(source, "class_names", None)
        self._num_labels = len(names) if names else np.iinfo(np.int32).max

    @property
    def class_names(self) -> list[str]:
        return list(self.source.class_names)

    def __len__(self) -> int:
        """Batches per epoch."""
        n, b = len(self.source), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def order(self, epoch: int) -> np.ndarray:
        """Source indices in the order epoch ``epoch`` visits them."""
        n = len(self.source)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng((self.seed, epoch)).permutation(n)

    def example(self, index: int, epoch: int = 0) -> tuple[np.ndarray, int]:
        """Source example ``index`` preprocessed (augmented, if any) as in epoch ``epoch``:
        ``(float32 (3, S, S), label)``."""
        image, label = self.source[int(index)]
        if self.augment is None:
            return preprocess(image, self.preprocessing), label
        rng = np.random.default_rng((self.seed, epoch, int(index)))
        return self.augment(image, self.preprocessing, rng), label

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yield the batches of epoch ``epoch`` from batch ``start_step`` on."""
        if start_step < 0:
            raise DataError(f"start_step must be >= 0, got {start_step}.")
        order = self.order(epoch)
        chunks = [
            order[i * self.batch_size : (i + 1) * self.batch_size]
            for i in range(start_step, len(self))
        ]
        if self.num_workers == 0:
            for chunk in chunks:
                batch = self._new_batch()
                for j, index in enumerate(chunk):
                    self._fill(batch, j, index, epoch)
                yield self._finish(batch, len(chunk))
            return
        pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="eqxtl-loader")
        pending: collections.deque[tuple[dict, int, list[Future]]] = collections.deque()
        try:
            for chunk in chunks:  # fill the prefetch window, then keep it full
                pending.append(self._submit(pool, chunk, epoch))
                if len(pending) > self.prefetch:
                    yield self._wait(pending.popleft())
            while pending:
                yield self._wait(pending.popleft())
        finally:  # also on early exit (generator close): drop queued work, free threads
            pool.shutdown(wait=False, cancel_futures=True)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.epoch(0)

    def _new_batch(self) -> dict[str, np.ndarray]:
        s, b = self.preprocessing.crop, self.batch_size
        return {
            "image": np.empty((b, 3, s, s), np.float32),
            "label": np.zeros((b,), np.int32),
            "mask": np.zeros((b,), bool),
        }

    def _fill(self, batch: dict, j: int, index: int, epoch: int) -> None:
        try:
            image, label = self.example(index, epoch)
        except CorruptImageError as e:
            warnings.warn(f"{e}; this example is masked out.", stacklevel=2)
            batch["image"][j] = 0.0
            return
        if not 0 <= label < self._num_labels:
            raise DataError(
                f"Label {label} of example {index} of {self.source!r} is outside "
                f"[0, {self._num_labels}) (the source's class_names). Fix the labels."
            )
        batch["image"][j] = image
        batch["label"][j] = label
        batch["mask"][j] = True

    def _submit(self, pool, chunk, epoch) -> tuple[dict, int, list[Future]]:
        batch = self._new_batch()
        futures = [pool.submit(self._fill, batch, j, i, epoch) for j, i in enumerate(chunk)]
        return batch, len(chunk), futures

    def _wait(self, item: tuple[dict, int, list[Future]]) -> dict[str, np.ndarray]:
        batch, n, futures = item
        for f in futures:
            f.result()  # re-raises a worker's error here
        return self._finish(batch, n)

    def _finish(self, batch: dict, n: int) -> dict[str, np.ndarray]:
        if n < self.batch_size:  # pad: copies of the first example, masked out
            batch["image"][n:] = batch["image"][0]
            batch["label"][n:] = 0
            batch["mask"][n:] = False
        return batch
