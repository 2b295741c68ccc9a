"""Preprocessing one image into the array a checkpoint expects (``preprocess``), and its
training-time variant ``Augment`` (random resized crop, horizontal flip, then optionally a
policy such as RandAugment and random erasing: a pure function of ``(seed, epoch, index)``)."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .._util.checks import real
from ..errors import DataError
from ..models._arch import Preprocessing
from .augment import RandAugment, RandomErasing, TrivialAugment

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
    if im.mode == "F":  # 32-bit float (TIFF): convert("RGB") would clip it to 0..255
        a = np.asarray(im)
        if not (np.all(np.isfinite(a)) and a.min() >= 0 and a.max() <= 1):
            raise DataError(
                f"A float image with values in [{a.min()}, {a.max()}]: expected finite values "
                "in [0, 1]. Save it as 8 or 16 bits."
            )
        gray = np.round(a * 255).astype(np.uint8)
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
    """Training-time augmentation: random resized crop, horizontal flip, then ``policy``
    (``RandAugment`` or ``TrivialAugment``) on the uint8 crop, normalisation, and
    ``erasing`` (``RandomErasing``) on the normalised image: timm's training order.

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
    policy: RandAugment | TrivialAugment | None = None
    """``eqxtl.RandAugment()`` or ``eqxtl.TrivialAugment()``, applied after the flip."""
    erasing: RandomErasing | None = None
    """``eqxtl.RandomErasing()``, applied after normalisation."""

    def __post_init__(self):
        for what in ("scale", "ratio"):
            pair = getattr(self, what)
            if not (isinstance(pair, tuple | list) and len(pair) == 2):
                raise DataError(f"Augment({what}=...) must be a pair (lo, hi), got {pair!r}.")
            pair = tuple(real(v, f"Augment({what}=...)", DataError) for v in pair)
            object.__setattr__(self, what, pair)
        real(self.flip, "Augment(flip=...) (a probability)", DataError, low=0, high=1)
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise DataError(f"Augment.scale must satisfy 0 < lo <= hi <= 1, got {self.scale}.")
        if not 0 < self.ratio[0] <= self.ratio[1] < math.inf:
            raise DataError(f"Augment.ratio must satisfy 0 < lo <= hi, got {self.ratio}.")
        if not 0 <= self.flip <= 1:
            raise DataError(f"Augment.flip is a probability, got {self.flip}.")
        if self.policy is not None and not isinstance(self.policy, RandAugment | TrivialAugment):
            raise DataError(
                "Augment(policy=...) takes eqxtl.RandAugment(...) or eqxtl.TrivialAugment(...), "
                f"got {self.policy!r}."
            )
        if self.erasing is not None and not isinstance(self.erasing, RandomErasing):
            raise DataError(
                f"Augment(erasing=...) takes eqxtl.RandomErasing(...), got {self.erasing!r}."
            )

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
        if self.policy is not None:
            out = self.policy(out, p, rng)
        x = normalise(out, p)
        return x if self.erasing is None else self.erasing(x, rng)
