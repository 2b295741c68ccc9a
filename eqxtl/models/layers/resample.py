"""Position-embedding resampling (fine-tuning at another resolution): PyTorch-exact
bicubic weights, in numpy (once, at load time) or traced (on every forward)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _bicubic_matrix(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
    """``(n_out, n_in)`` weights of PyTorch's 1-D bicubic interpolation, ``align_corners=
    False``: without antialias, Keys' kernel a = -0.75 with edge-replicated taps
    (``F.interpolate(mode="bicubic")``); with it, a = -0.5, a support widened by the
    downscale factor and weights renormalised inside the image (``antialias=True``, PIL's
    filter)."""
    scale = n_in / n_out
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        if antialias:
            center = (i + 0.5) * scale
            stretch = max(scale, 1.0)
            lo = max(int(center - 2 * stretch + 0.5), 0)
            hi = min(int(center + 2 * stretch + 0.5), n_in)
            taps = np.arange(lo, hi)
            w = _cubic((taps - center + 0.5) / stretch, -0.5)
            m[i, taps] += w / w.sum()
        else:
            src = (i + 0.5) * scale - 0.5
            base = math.floor(src)
            for k in range(-1, 3):
                m[i, min(max(base + k, 0), n_in - 1)] += _cubic(np.array(src - (base + k)), -0.75)
    return m


def resample_grid(
    grid: Float[np.ndarray, "h w d"], size: tuple[int, int], *, antialias: bool = False
) -> Float[np.ndarray, "h2 w2 d"]:
    """Bicubic resize of a ``(h, w, d)`` grid of position embeddings to ``size``, as
    PyTorch's ``F.interpolate(mode="bicubic", align_corners=False)`` does (what timm's
    ``resample_abs_pos_embed`` and transformers' ``interpolate_pos_encoding`` call; DINOv2
    passes ``antialias=True``). Computed in float64, returned in the input's dtype."""
    h, w, _ = grid.shape
    mh = _bicubic_matrix(h, size[0], antialias)
    mw = _bicubic_matrix(w, size[1], antialias)
    out = np.einsum("ih,hwd,jw->ijd", mh, np.asarray(grid, np.float64), mw)
    return out.astype(grid.dtype)


def resample_grid_traced(
    grid: Float[Array, "h w d"], size: tuple[int, int], *, antialias: bool = False
) -> Float[Array, "h2 w2 d"]:
    """``resample_grid`` inside a traced computation (the resize of transformers' DINOv2 on
    every forward): the same torch-exact weights as float32 constants, differentiable in
    ``grid``, computed in float32 as transformers does."""
    h, w, _ = grid.shape
    mh = jnp.asarray(_bicubic_matrix(h, size[0], antialias), jnp.float32)
    mw = jnp.asarray(_bicubic_matrix(w, size[1], antialias), jnp.float32)
    out = jnp.einsum(
        "ih,hwd,jw->ijd", mh, grid.astype(jnp.float32), mw, precision=jax.lax.Precision.HIGHEST
    )
    return out.astype(grid.dtype)


def resample_positions(
    pos: Float[np.ndarray, "n d"],
    prefix: int,
    grid: tuple[int, int],
    size: tuple[int, int],
    *,
    antialias: bool = False,
) -> Float[np.ndarray, "m d"]:
    """Position embeddings ``(prefix + gh * gw, d)`` of a ``grid = (gh, gw)`` of patches
    (row-major, after ``prefix`` class / register positions) resampled to a ``size`` grid
    with ``resample_grid``; the prefix positions are kept as they are."""
    pos = np.asarray(pos)
    if grid == tuple(size):
        return pos
    patches = pos[prefix:].reshape(*grid, pos.shape[-1])
    new = resample_grid(patches, tuple(size), antialias=antialias)
    return np.concatenate([pos[:prefix], new.reshape(-1, pos.shape[-1])])


def image_hw(value, name: str = "image_size") -> tuple[int, int]:
    """``(h, w)`` from an int or an ``(h, w)`` pair (a config's image or patch size)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or (height, width), got {value!r}.")
        return int(value[0]), int(value[1])
    return int(value), int(value)
