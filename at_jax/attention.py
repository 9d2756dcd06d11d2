"""Activation-based spatial attention maps (paper §3.1), as pure functions on NHWC arrays.

For an activation tensor ``A`` of shape (B, H, W, C) the attention map is a function of the
channel-wise absolute values, flattened to (B, H*W):

  reduce="sum"   F_sum^p(A)  = Σ_c |A_c|^p
  reduce="mean"  (1/C) Σ_c |A_c|^p   — the public reference code (``x.pow(2).mean(1)``)
  reduce="max"   F_max^p(A)  = max_c |A_c|^p

then normalised per sample (``normalize="l2"`` as the reference's ``F.normalize``, ``"l1"``, or
``None``), with the reference's epsilon: ``q / max(||q||, 1e-12)``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from at_jax.precision import upcast

EPSILON = 1e-12
REDUCTIONS = ("sum", "mean", "max")
NORMALIZATIONS = ("l2", "l1", None)


def _check_options(p: float, reduce: str, normalize: Optional[str]) -> None:
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if not p > 0:
        raise ValueError(f"the attention exponent p must be positive, got {p!r}")


def spatial_map(a: jax.Array, p: float = 2.0, reduce: str = "mean") -> jax.Array:
    """Unnormalised 2-D attention: (B, H, W, C) -> (B, H, W) of reduce_c |a_c|^p (at least float32)."""
    _check_options(p, reduce, None)
    if a.ndim != 4:
        raise ValueError(f"attention maps take NHWC activations (4 dims), got shape {a.shape}")
    a = upcast(a)
    powered = a * a if p == 2 else jnp.abs(a) ** p
    return {"sum": jnp.sum, "mean": jnp.mean, "max": jnp.max}[reduce](powered, axis=-1)


def normalize_rows(q: jax.Array, normalize: Optional[str] = "l2") -> jax.Array:
    """Per-sample normalisation of (B, N) rows: ``q / max(||q||, eps)`` (l2 or l1), or identity."""
    _check_options(2.0, "mean", normalize)
    if normalize is None:
        return q
    order = 2 if normalize == "l2" else 1
    norm = jnp.linalg.norm(q, ord=order, axis=-1, keepdims=True)
    return q / jnp.maximum(norm, EPSILON)


def resize_map(m: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resize (B, H, W) maps to ``size``: average pooling for integer down-scaling (as peers pool
    the larger map to the smaller), bilinear interpolation otherwise."""
    b, h, w = m.shape
    th, tw = size
    if (h, w) == (th, tw):
        return m
    if h % th == 0 and w % tw == 0:
        return m.reshape(b, th, h // th, tw, w // tw).mean(axis=(2, 4))
    return jax.image.resize(m, (b, th, tw), method="bilinear")


def attention_map(a: jax.Array, p: float = 2.0, reduce: str = "mean",
                  normalize: Optional[str] = "l2", *,
                  size: Optional[tuple[int, int]] = None) -> jax.Array:
    """Attention map of NHWC activations as (B, H*W) rows (paper §3.1; reference ``at(x)``).

    ``size`` optionally resizes the 2-D map (before normalisation) so that maps of a student and
    teacher with different resolutions can be compared.
    """
    _check_options(p, reduce, normalize)
    m = spatial_map(a, p, reduce)
    if size is not None:
        m = resize_map(m, tuple(size))
    return normalize_rows(m.reshape(m.shape[0], -1), normalize)
