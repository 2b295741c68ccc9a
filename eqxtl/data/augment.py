"""Image policies of published fine-tuning recipes: ``RandAugment``, ``TrivialAugment`` (the
wide variant) and ``RandomErasing``, run in the loader workers through
``Augment(policy=..., erasing=...)``.

The ops and their magnitudes are timm's (``timm.data.auto_augment``: RandAugment) and
torchvision's (``TrivialAugmentWide``), with the same PIL calls: one op at a given magnitude
and sign gives the same pixels (tests/fixtures/timm_augment). Randomness comes from the numpy
``Generator`` the loader seeds from ``(seed, epoch, index)``: the draws follow the
references' distributions, not their random streams.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from .._util.checks import count, real
from ..errors import DataError

_AFFINE_FILTERS = ("nearest", "bilinear", "bicubic")  # all that PIL's transform/rotate take


def _affine(im, matrix, resample, fill):
    return im.transform(im.size, Image.Transform.AFFINE, matrix, resample, fillcolor=fill)


def _posterize(im, bits, resample, fill):
    # ImageOps.posterize refuses 0 bits since Pillow 12 (the reference then raises, at
    # PosterizeIncreasing magnitude 10 for one); older Pillow gave black, as this mask does.
    if bits >= 8:
        return im
    mask = ~(2 ** (8 - bits) - 1) & 255
    return im.point([i & mask for i in range(256)] * 3)


def _solarize_add(im, add, resample, fill):
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    return im.point(lut * 3)


def _enhance(kind):
    return lambda im, factor, resample, fill: kind(im).enhance(factor)


# name -> (PIL RGB image, argument, resampling filter, fill colour) -> PIL RGB image
_PRIMITIVES: dict[str, Callable[..., Image.Image]] = {
    "Identity": lambda im, v, r, f: im,
    "AutoContrast": lambda im, v, r, f: ImageOps.autocontrast(im),
    "Equalize": lambda im, v, r, f: ImageOps.equalize(im),
    "Invert": lambda im, v, r, f: ImageOps.invert(im),
    "Rotate": lambda im, v, r, f: im.rotate(v, resample=r, fillcolor=f),
    "Posterize": _posterize,
    "Solarize": lambda im, v, r, f: ImageOps.solarize(im, v),
    "SolarizeAdd": _solarize_add,
    "Color": _enhance(ImageEnhance.Color),
    "Contrast": _enhance(ImageEnhance.Contrast),
    "Brightness": _enhance(ImageEnhance.Brightness),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
    "Affine": _affine,
}


def _neg(v, negate):
    return -v if negate else v


def _increasing_enhance(m, negate):
    return max(0.1, 1.0 + _neg((m / 10.0) * 0.9, negate))


def _rel_shift(axis):
    def shift(m, negate):
        pct = _neg((m / 10.0) * 0.45, negate)
        return lambda size: (
            (1, 0, pct * size[0], 0, 1, 0) if axis == 0 else (1, 0, 0, 0, 1, pct * size[1])
        )

    return shift


# RandAugment: name -> (primitive, signed, (magnitude in [0, 10], negate) -> argument). The
# expressions are the reference's, operation for operation, so that the arguments are equal
# to the last bit (affine coefficients change nearest pixels).
_RA_OPS: dict[str, tuple[str, bool, Callable | None]] = {
    "AutoContrast": ("AutoContrast", False, None),
    "Equalize": ("Equalize", False, None),
    "Invert": ("Invert", False, None),
    "Rotate": ("Rotate", True, lambda m, n: _neg((m / 10.0) * 30.0, n)),
    "Posterize": ("Posterize", False, lambda m, n: int((m / 10.0) * 4)),
    "PosterizeIncreasing": ("Posterize", False, lambda m, n: 4 - int((m / 10.0) * 4)),
    "Solarize": ("Solarize", False, lambda m, n: min(256, int((m / 10.0) * 256))),
    "SolarizeIncreasing": ("Solarize", False, lambda m, n: 256 - min(256, int((m / 10.0) * 256))),
    "SolarizeAdd": ("SolarizeAdd", False, lambda m, n: min(128, int((m / 10.0) * 110))),
    "ShearX": ("Affine", True, lambda m, n: (1, _neg((m / 10.0) * 0.3, n), 0, 0, 1, 0)),
    "ShearY": ("Affine", True, lambda m, n: (1, 0, 0, _neg((m / 10.0) * 0.3, n), 1, 0)),
    "TranslateXRel": ("Affine", True, _rel_shift(0)),
    "TranslateYRel": ("Affine", True, _rel_shift(1)),
}
for _kind in ("Color", "Contrast", "Brightness", "Sharpness"):
    _RA_OPS[_kind] = (_kind, False, lambda m, n: (m / 10.0) * 1.8 + 0.1)
    _RA_OPS[_kind + "Increasing"] = (_kind, True, _increasing_enhance)

_RA_STANDARD = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel",
)  # fmt: skip
_RA_INCREASING = tuple(
    op + "Increasing"
    if op in ("Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness")
    else op
    for op in _RA_STANDARD
)


def _pil(image: Any, what: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] != 3:
        raise DataError(
            f"{what} takes a uint8 (H, W, 3) RGB image (or a PIL image); got {a.dtype} of "
            f"shape {a.shape}. Normalisation comes after the policy: see Augment."
        )
    return Image.fromarray(a)


def _fill(p) -> tuple[int, int, int]:
    """The uint8 colour that normalises to zero (the dataset mean), as the reference fills."""
    return tuple(int(min(255, max(0, round(m / p.scale)))) for m in p.mean)


def _affine_filter(p) -> Image.Resampling:
    name = p.interpolation if p.interpolation in _AFFINE_FILTERS else "bicubic"
    return Image.Resampling[name.upper()]


def _check_ops(ops, known, what: str) -> tuple[str, ...]:
    if isinstance(ops, str) or not ops:
        raise DataError(f"{what} must be a non-empty tuple of op names, got {ops!r}.")
    ops = tuple(ops)
    unknown = [op for op in ops if op not in known]
    if unknown:
        raise DataError(f"Unknown op(s) {unknown} in {what}; the ops are {sorted(known)}.")
    return ops


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """RandAugment with timm's ops and magnitudes (``rand_augment_transform``); the defaults
    are timm's ``'rand-m9-mstd0.5-inc1'``, the policy of its fine-tuning recipes.

    Each image gets ``num_ops`` ops drawn uniformly with replacement from ``ops``; each is
    applied with probability ``prob``, at a magnitude drawn from ``N(magnitude,
    magnitude_std)`` (uniform in ``[0, magnitude]`` when ``magnitude_std`` is ``math.inf``)
    clipped to ``[0, 10]``; geometric ops and the increasing enhancements flip their sign
    with probability 1/2. Affine ops resample with the preprocessing's filter (bicubic for
    lanczos, box and hamming, which PIL's affine cannot use) and fill with the dataset mean.

    **Arguments:**

    - `num_ops`: ops per image (timm's ``n``).
    - `magnitude`: in ``[0, 10]`` (``m``).
    - `magnitude_std`: magnitude noise (``mstd``); ``0``: a fixed magnitude.
    - `prob`: probability of applying each drawn op (``p``).
    - `increasing`: the default op set's increasing-severity variants (``inc1``): Posterize,
      Solarize and the enhancements grow stronger with the magnitude.
    - `ops`: the op names to draw from, instead of the default set (15 ops).
    """

    num_ops: int = 2
    magnitude: float = 9
    magnitude_std: float = 0.5
    prob: float = 0.5
    increasing: bool = True
    ops: tuple[str, ...] | None = None

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        set_("num_ops", count(self.num_ops, "RandAugment(num_ops=...)", DataError))
        set_(
            "magnitude",
            real(self.magnitude, "RandAugment(magnitude=...)", DataError, low=0, high=10),
        )
        std = self.magnitude_std
        if not (isinstance(std, int | float) and std == math.inf):
            std = real(std, "RandAugment(magnitude_std=...) (or math.inf)", DataError, low=0)
        set_("magnitude_std", float(std))
        set_(
            "prob",
            real(self.prob, "RandAugment(prob=...) (a probability)", DataError, low=0, high=1),
        )
        if self.ops is not None:
            set_("ops", _check_ops(self.ops, _RA_OPS, "RandAugment(ops=...)"))

    @property
    def op_names(self) -> tuple[str, ...]:
        """The ops drawn from."""
        if self.ops is not None:
            return self.ops
        return _RA_INCREASING if self.increasing else _RA_STANDARD

    def op(self, image: Any, name: str, magnitude: float, p, *, negate: bool = False) -> np.ndarray:
        """Op ``name`` at ``magnitude`` (``[0, 10]``; sign flipped with ``negate``, signed ops
        only) on
        ``image`` (uint8 ``(H, W, 3)`` or PIL) with the fill and filter of preprocessing
        ``p``: uint8 ``(H, W, 3)``."""
        if name not in _RA_OPS:
            raise DataError(f"Unknown RandAugment op {name!r}; the ops are {sorted(_RA_OPS)}.")
        real(magnitude, "RandAugment.op(magnitude=...)", DataError, low=0, high=10)
        return np.asarray(self._apply(_pil(image, "RandAugment"), name, magnitude, negate, p))

    def _apply(self, im, name, magnitude, negate, p):
        primitive, _, level = _RA_OPS[name]
        arg = None if level is None else level(magnitude, negate)
        if callable(arg):  # relative translations: pixels from the image size
            arg = arg(im.size)
        return _PRIMITIVES[primitive](im, arg, _affine_filter(p), _fill(p))

    def __call__(self, image: Any, p, rng: np.random.Generator) -> np.ndarray:
        """One image (uint8 ``(H, W, 3)`` or PIL) → uint8 ``(H, W, 3)``, ``p`` the
        ``Preprocessing`` (fill colour and filter), randomness from ``rng``."""
        im = _pil(image, "RandAugment")
        names = self.op_names
        for i in rng.integers(0, len(names), self.num_ops):
            name = names[int(i)]
            if self.prob < 1.0 and rng.random() > self.prob:
                continue
            m = self.magnitude
            if self.magnitude_std == math.inf:
                m = rng.uniform(0, m)
            elif self.magnitude_std > 0:
                m = rng.normal(m, self.magnitude_std)
            m = max(0.0, min(float(m), 10.0))
            negate = bool(_RA_OPS[name][1] and rng.random() > 0.5)
            im = self._apply(im, name, m, negate, p)
        return np.asarray(im)


def _bins(start: float, end: float, n: int) -> np.ndarray:
    """float32 ``linspace`` as the reference computes it (a float32 step, each value rounded
    once from both ends): numpy's differs in the last bit, and ``int()`` of a translation
    bin such as 15.999999 vs 16.0 is a different op."""
    f = np.float32
    step = np.float64((f(end) - f(start)) / f(n - 1))
    i = np.arange(n)
    return np.where(i < n // 2, f(start) + step * i, f(end) - step * (n - 1 - i)).astype(f)


def _ta_space(n: int) -> dict[str, tuple[np.ndarray | None, bool]]:
    """TrivialAugmentWide's ops: name -> (magnitude bins, signed)."""
    unit = _bins(0.0, 0.99, n)
    posterize = 8 - np.round(np.arange(n, dtype=np.float32) / np.float32((n - 1) / 6))
    return {
        "Identity": (None, False),
        "ShearX": (unit, True),
        "ShearY": (unit, True),
        "TranslateX": (_bins(0.0, 32.0, n), True),
        "TranslateY": (_bins(0.0, 32.0, n), True),
        "Rotate": (_bins(0.0, 135.0, n), True),
        "Brightness": (unit, True),
        "Color": (unit, True),
        "Contrast": (unit, True),
        "Sharpness": (unit, True),
        "Posterize": (posterize.astype(np.int64), False),
        "Solarize": (_bins(255.0, 0.0, n), False),
        "AutoContrast": (None, False),
        "Equalize": (None, False),
    }


def _ta_argument(name: str, v: float):
    """(primitive, argument) of TrivialAugmentWide's op ``name`` at signed magnitude ``v``:
    its affine matrices as the reference's inverse-affine helper computes them (shear about
    the corner, through degrees and back), so that the coefficients agree to the last bit."""
    if name == "ShearX":
        return "Affine", (1, math.tan(math.radians(math.degrees(math.atan(v)))), 0, 0, 1, 0)
    if name == "ShearY":
        s = math.radians(math.degrees(math.atan(v)))
        return "Affine", (1, 0, 0, math.sin(s) / math.cos(s), 1, 0)
    if name == "TranslateX":
        return "Affine", (1, 0, -int(v), 0, 1, 0)
    if name == "TranslateY":
        return "Affine", (1, 0, 0, 0, 1, -int(v))
    if name in ("Brightness", "Color", "Contrast", "Sharpness"):
        return name, 1.0 + v
    if name == "Posterize":
        return name, int(v)
    return name, v


@dataclasses.dataclass(frozen=True)
class TrivialAugment:
    """TrivialAugment, torchvision's ``TrivialAugmentWide``: per image one op drawn
    uniformly from 14 (Identity, ShearX/Y, TranslateX/Y, Rotate, Brightness, Color,
    Contrast, Sharpness, Posterize, Solarize, AutoContrast, Equalize), at one of
    ``num_bins`` magnitudes drawn uniformly (shear and enhancements up to 0.99, translation
    32 px, rotation 135 degrees, posterize 8 to 2 bits, solarize threshold 255 to 0), the
    sign of signed ops flipped with probability 1/2. Geometric ops fill with black.

    **Arguments:**

    - `num_bins`: magnitude bins (>= 2).
    - `interpolation`: filter of the geometric ops, ``"nearest"`` (the reference's),
      ``"bilinear"`` or ``"bicubic"``.
    """

    num_bins: int = 31
    interpolation: str = "nearest"

    def __post_init__(self):
        n = count(self.num_bins, "TrivialAugment(num_bins=...)", DataError, minimum=2)
        object.__setattr__(self, "num_bins", n)
        if self.interpolation not in _AFFINE_FILTERS:
            raise DataError(
                f"TrivialAugment(interpolation={self.interpolation!r}): use one of "
                f"{_AFFINE_FILTERS}."
            )

    @property
    def op_names(self) -> tuple[str, ...]:
        """The 14 ops drawn from."""
        return tuple(_ta_space(2))

    def magnitudes(self, name: str) -> np.ndarray | None:
        """The magnitude bins of op ``name`` (``None`` for the ops without a magnitude)."""
        return self._space(name)[0]

    def _space(self, name: str) -> tuple[np.ndarray | None, bool]:
        space = _ta_space(self.num_bins)
        if name not in space:
            raise DataError(f"Unknown TrivialAugment op {name!r}; the ops are {list(space)}.")
        return space[name]

    def op(self, image: Any, name: str, bin: int = 0, *, negate: bool = False) -> np.ndarray:
        """Op ``name`` at magnitude bin ``bin`` (``0 .. num_bins - 1``; ignored by the ops
        without a magnitude), sign flipped with ``negate`` (signed ops only), on ``image``
        (uint8 ``(H, W, 3)`` or PIL): uint8 ``(H, W, 3)``."""
        bins, signed = self._space(name)
        if bins is not None and not (
            isinstance(bin, int | np.integer) and 0 <= bin < self.num_bins
        ):
            raise DataError(f"TrivialAugment.op(bin={bin!r}) must be in 0..{self.num_bins - 1}.")
        v = 0.0 if bins is None else float(bins[bin])
        v = -v if negate and signed else v
        return np.asarray(self._apply(_pil(image, "TrivialAugment"), name, v))

    def _apply(self, im, name, v):
        primitive, arg = _ta_argument(name, v)
        resample = Image.Resampling[self.interpolation.upper()]
        return _PRIMITIVES[primitive](im, arg, resample, (0, 0, 0))

    def __call__(self, image: Any, p, rng: np.random.Generator) -> np.ndarray:
        """One image (uint8 ``(H, W, 3)`` or PIL) → uint8 ``(H, W, 3)``; ``p`` (the
        ``Preprocessing``) is not used; randomness from ``rng``."""
        im = _pil(image, "TrivialAugment")
        space = _ta_space(self.num_bins)
        name = list(space)[int(rng.integers(len(space)))]
        bins, signed = space[name]
        v = 0.0 if bins is None else float(bins[int(rng.integers(len(bins)))])
        if signed and rng.integers(2):
            v = -v
        return np.asarray(self._apply(im, name, v))


_ERASE_MODES = ("pixel", "rand", "const")


@dataclasses.dataclass(frozen=True)
class RandomErasing:
    """Random erasing (timm's ``RandomErasing``) of a normalised image: with probability
    ``prob``, ``count`` rectangles (1, or drawn from ``1 .. max_count``, each of ``area / count``)
    of ``area`` × the image area (uniform) and aspect ratio ``h / w`` log-uniform in
    ``aspect``, filled with per-pixel ``N(0, 1)`` noise (``"pixel"``), one ``N(0, 1)`` colour
    per channel (``"rand"``) or zeros (``"const"``: the dataset mean). A box that does not
    fit after 10 tries is skipped.

    It runs on the float32 ``(3, S, S)`` image after normalisation (where timm applies it),
    so the noise is in normalised units: ``Augment(erasing=RandomErasing())``.

    **Arguments:**

    - `prob`: probability of erasing an image.
    - `area`: ``(lo, hi)`` fraction of the image area, ``0 < lo <= hi <= 1``.
    - `aspect`: ``(lo, hi)`` range of ``h / w``, ``0 < lo <= hi``.
    - `mode`: ``"pixel"``, ``"rand"`` or ``"const"``.
    - `max_count`: the most rectangles per image.
    """

    prob: float = 0.25
    area: tuple[float, float] = (0.02, 1 / 3)
    aspect: tuple[float, float] = (0.3, 1 / 0.3)
    mode: str = "pixel"
    max_count: int = 1

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        set_(
            "prob",
            real(self.prob, "RandomErasing(prob=...) (a probability)", DataError, low=0, high=1),
        )
        for what in ("area", "aspect"):
            pair = getattr(self, what)
            if not (isinstance(pair, tuple | list) and len(pair) == 2):
                raise DataError(f"RandomErasing({what}=...) must be a pair (lo, hi), got {pair!r}.")
            name = f"RandomErasing({what}=...)"
            lo, hi = (real(v, name, DataError, low=0, low_open=True) for v in pair)
            if lo > hi:
                raise DataError(f"RandomErasing({what}={pair!r}) needs lo <= hi.")
            set_(what, (lo, hi))
        if self.area[1] > 1:
            raise DataError(f"RandomErasing(area={self.area}) is a fraction of the image: hi <= 1.")
        if self.mode not in _ERASE_MODES:
            raise DataError(f"RandomErasing(mode={self.mode!r}): use one of {_ERASE_MODES}.")
        set_("max_count", count(self.max_count, "RandomErasing(max_count=...)", DataError))

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A float32 ``(C, H, W)`` image → the same shape, erased (a copy) or ``x`` itself."""
        if x.ndim != 3:
            raise DataError(f"RandomErasing takes one (C, H, W) image, got shape {x.shape}.")
        if rng.random() > self.prob:
            return x
        x = x.copy()
        c, height, width = x.shape
        n = 1 if self.max_count == 1 else int(rng.integers(1, self.max_count + 1))
        log_aspect = (math.log(self.aspect[0]), math.log(self.aspect[1]))
        for _ in range(n):
            for _ in range(10):
                target = rng.uniform(*self.area) * height * width / n
                aspect = math.exp(rng.uniform(*log_aspect))
                h = int(round(math.sqrt(target * aspect)))
                w = int(round(math.sqrt(target / aspect)))
                if w < width and h < height:
                    top = int(rng.integers(0, height - h + 1))
                    left = int(rng.integers(0, width - w + 1))
                    x[:, top : top + h, left : left + w] = self._fill(rng, (c, h, w))
                    break
        return x

    def _fill(self, rng, shape):
        if self.mode == "pixel":
            return rng.standard_normal(shape, np.float32)
        if self.mode == "rand":
            return rng.standard_normal((shape[0], 1, 1), np.float32)
        return 0.0
