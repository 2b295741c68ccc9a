"""Mixup and CutMix (``Mixup``): a classification task that mixes each training batch, inside
the compiled step, with the step's key.

Why a task: what mixing changes is how a training batch becomes a loss (the images the model
sees and the soft targets it is scored against), which is the task's job; evaluation (no key)
scores the plain images against their labels. Inside the step it runs on the device, jitted
with the rest, and its randomness comes from the step key, a pure function of ``(seed,
step)``: a resumed run mixes the batches it repeats the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from .._util.checks import real
from ..errors import DataError
from .tasks import Classification


def cutmix_box(shape: tuple[int, int], lam, cy, cx):
    """timm's ``rand_bbox``: the box ``(yl, yh, xl, xh)`` of side ``sqrt(1 - lam)`` times the
    image's, centred at ``(cy, cx)`` and clipped to the image (integers, traceable)."""
    h, w = shape
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(h * ratio).astype(jnp.int32)
    cut_w = jnp.floor(w * ratio).astype(jnp.int32)

    def inside(v, top):
        return jnp.minimum(jnp.maximum(v, 0), top)

    yl = inside(cy - cut_h // 2, h)
    yh = inside(cy + (cut_h + 1) // 2, h)
    xl = inside(cx - cut_w // 2, w)
    xh = inside(cx + (cut_w + 1) // 2, w)
    return yl, yh, xl, xh


def mix_images(images, lam, cutmix, box, partner, *, correct_lam: bool = True):
    """``(mixed images, lambda of the targets)``: each image ``i`` mixed with image
    ``partner[i]`` as timm's batch mode does: ``lam * x + (1 - lam) * x[partner]`` (mixup),
    or the partner's pixels pasted inside ``box`` (cutmix, where with ``correct_lam`` the
    lambda becomes the fraction of the image left outside the box). ``lam`` 1 leaves the
    batch as it is. ``images``: ``(B, C, H, W)``."""
    h, w = images.shape[-2:]
    other = images[partner]
    yl, yh, xl, xh = box
    ys = jnp.arange(h)[:, None]
    xs = jnp.arange(w)[None, :]
    inside = (ys >= yl) & (ys < yh) & (xs >= xl) & (xs < xh)
    cut = jnp.where(inside, other, images)
    blend = images * lam.astype(images.dtype) + other * (1.0 - lam).astype(images.dtype)
    if correct_lam:
        lam_cut = 1.0 - ((yh - yl) * (xh - xl)).astype(jnp.float32) / (h * w)
    else:
        lam_cut = lam
    mixes = lam < 1.0
    alone = (partner == jnp.arange(images.shape[0]))[:, None, None, None]  # exact, unmixed
    out = jnp.where(mixes & ~alone, jnp.where(cutmix, cut, blend), images)
    return out, jnp.where(mixes & cutmix, lam_cut, lam)


def mix_targets(labels, num_classes: int, lam, partner, smoothing: float = 0.0):
    """timm's ``mixup_target``: smoothed one-hot rows of ``labels`` ``(B,)`` mixed with their
    partners' with weight ``lam``: ``(B, num_classes)`` soft targets."""
    off = smoothing / num_classes
    y = jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off
    return y * lam + y[partner] * (1.0 - lam)


_TRIES = 8


def _log_gamma(a: float, x, u, u_boost):
    """``log`` of a ``Gamma(a, 1)`` draw from ``_TRIES`` standard normals ``x`` and uniforms
    ``u`` (and one more uniform for ``a < 1``): Marsaglia and Tsang's method, the first
    accepted candidate (each is accepted with probability > 0.95, so all fail with
    probability < 1e-10), boosted for ``a < 1`` (``G(a) = G(a + 1) U^(1/a)``, in log
    space). Why not ``jax.random.beta``: its rejection loop takes seconds to compile on the
    CPU, in every train step that mixes; here the step draws two arrays once."""
    d = (a + 1.0 if a < 1 else a) - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    v = (1.0 + c * x) ** 3
    safe_v = jnp.where(v > 0, v, 1.0)
    ok = (v > 0) & (jnp.log(u) < 0.5 * x**2 + d - d * safe_v + d * jnp.log(safe_v))
    out = jnp.log(d * safe_v[jnp.argmax(ok)])
    return out + jnp.log(u_boost) / a if a < 1 else out


def _beta(a: float, x, u, u_boost):
    """One ``Beta(a, a)`` draw, ``G1 / (G1 + G2)``, from two rows of ``_log_gamma``'s draws."""
    return jax.nn.sigmoid(
        _log_gamma(a, x[0], u[0], u_boost[0]) - _log_gamma(a, x[1], u[1], u_boost[1])
    )


@dataclasses.dataclass(frozen=True)
class Mixup(Classification):
    """Classification with mixup / CutMix on every training batch, as timm's
    ``timm.data.Mixup`` in its batch mode (one lambda, one box per batch; each image is mixed
    with the batch reversed) with ``label_smoothing`` applied to the soft targets.

    With probability ``prob`` a batch is mixed: by CutMix with probability ``switch_prob``
    when both alphas are positive (by the one that is otherwise), with ``lambda ~
    Beta(alpha, alpha)`` of the method chosen; the targets are ``lambda * y + (1 - lambda) *
    y_reversed`` (CutMix's lambda corrected by the clipped box's area, ``correct_lam``).
    Evaluation does not mix: it scores like ``Classification(label_smoothing)``. The
    training accuracy counts the larger share of each mixed target as its label. In a padded
    last batch an example whose partner is padding is left unmixed.

    >>> eqxtl.fit(model, state, opt, spec, train, task=eqxtl.Mixup(label_smoothing=0.1))

    **Arguments:** ``mixup_alpha`` (0: no mixup), ``cutmix_alpha`` (0: no CutMix), both
    ``>= 0`` and not both 0; ``prob`` and ``switch_prob`` in [0, 1]; ``label_smoothing`` in
    [0, 1); ``correct_lam``. Mixing uses the step key (``fit`` passes one; a step called with
    ``key=None`` does not mix).
    """

    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1
    correct_lam: bool = True
    _soft_targets = True

    def __post_init__(self):
        super().__post_init__()
        for what in ("mixup_alpha", "cutmix_alpha"):
            real(getattr(self, what), f"Mixup({what}=...)", DataError, low=0)
        if self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            raise DataError(
                "Mixup(mixup_alpha=0, cutmix_alpha=0) mixes nothing: give one of them > 0 "
                "(or use eqxtl.Classification)."
            )
        for what in ("prob", "switch_prob"):
            real(getattr(self, what), f"Mixup({what}=...)", DataError, low=0, high=1)
        if not isinstance(self.correct_lam, bool):
            raise DataError(
                f"Mixup(correct_lam=...) must be True or False, got {self.correct_lam!r}."
            )

    def draw(self, key, shape: tuple[int, int]):
        """``(lam, cutmix, (cy, cx))`` of one batch: timm's ``_params_per_batch`` and the
        centre of ``rand_bbox`` for images of ``shape`` ``(H, W)``."""
        k_u, k_x = jax.random.split(key)
        u = jax.random.uniform(k_u, (8 + 4 * _TRIES,), minval=1e-12)  # one draw: see _beta
        x = jax.random.normal(k_x, (4, _TRIES))
        accept = u[8:].reshape(4, _TRIES)
        mixes = u[0] < self.prob
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cutmix = u[1] < self.switch_prob
        else:
            cutmix = jnp.asarray(self.cutmix_alpha > 0)
        lam_mix = (
            _beta(self.mixup_alpha, x[:2], accept[:2], u[4:6]) if self.mixup_alpha > 0 else 1.0
        )
        lam_cut = (
            _beta(self.cutmix_alpha, x[2:], accept[2:], u[6:8]) if self.cutmix_alpha > 0 else 1.0
        )
        lam = jnp.where(mixes, jnp.where(cutmix, lam_cut, lam_mix), 1.0).astype(jnp.float32)
        h, w = shape
        centre = (
            jnp.minimum(jnp.floor(u[2] * h), h - 1).astype(jnp.int32),
            jnp.minimum(jnp.floor(u[3] * w), w - 1).astype(jnp.int32),
        )
        return lam, cutmix, centre

    def mix_batch(self, images, labels, mask, key) -> tuple[jax.Array, Callable]:
        """``(mixed images, targets(num_classes))`` for one training batch (the hook
        ``task_loss`` calls with the step key)."""
        if labels.shape != images.shape[:1] or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise DataError(
                f"Mixup mixes integer class indices (B,) = {images.shape[:1]}, got labels of "
                f"shape {tuple(labels.shape)} ({labels.dtype}). It is a classification task: "
                "for multi-hot or regression targets train without it."
            )
        b = images.shape[0]
        partner = jnp.arange(b)[::-1]
        if mask is not None:  # a padding partner would paste zeros and a fake label
            partner = jnp.where(mask[partner] > 0, partner, jnp.arange(b))
        lam, cutmix, (cy, cx) = self.draw(key, images.shape[-2:])
        box = cutmix_box(images.shape[-2:], lam, cy, cx)
        images, lam = mix_images(images, lam, cutmix, box, partner, correct_lam=self.correct_lam)

        def targets(num_classes: int):
            return mix_targets(labels, num_classes, lam, partner, self.label_smoothing)

        return images, targets
