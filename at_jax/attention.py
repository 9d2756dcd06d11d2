"""Activation-based spatial attention maps (paper §3.1): call :func:`attention_map`.

For an activation tensor ``A`` with a channel axis (NHWC by default; ``channel_axis=1`` for
NCHW) the attention map is a function of the channel-wise absolute values, flattened to
(B, H*W)::

    reduce="sum"   F_sum^p(A)  = Σ_c |A_c|^p
    reduce="mean"  (1/C) Σ_c |A_c|^p   — the public reference code (``x.pow(2).mean(1)``)
    reduce="max"   F_max^p(A)  = max_c |A_c|^p

then normalised per sample (``normalize="l2"`` as the reference's ``F.normalize``, ``"l1"``, or
``None``), with the reference's epsilon: ``q / max(||q||, 1e-12)``.

Maps of different resolutions (a student and a teacher whose feature maps differ in size) are
compared after average-pooling the larger map to the smaller (:func:`pool_map`), which needs the
larger size to be the same integer multiple of the smaller in height and width; anything else
raises, so that a wrong layout (an NCHW array read as NHWC) fails loudly instead of giving a
plausible number.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from at_jax.precision import upcast

__all__ = [
    "attention_map",
    "spatial_map",
    "normalize_rows",
    "pool_map",
    "common_size",
    "EPSILON",
    "REDUCTIONS",
    "NORMALIZATIONS",
]

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


def channels_last(a: jax.Array, channel_axis: int = -1) -> jax.Array:
    """``a`` (4-D: a batch of feature maps) with its channel axis moved last (NHWC)."""
    if a.ndim != 4:
        raise ValueError(
            f"attention maps take a batch of feature maps (4 dims: NHWC, or NCHW "
            f"with channel_axis=1), got shape {tuple(a.shape)}"
        )
    if not -4 <= channel_axis < 4 or channel_axis in (0, -4):
        raise ValueError(
            f"channel_axis must name one of the axes 1-3 (or -1..-3) of a 4-D "
            f"batch, got {channel_axis}"
        )
    return a if channel_axis in (-1, 3) else jnp.moveaxis(a, channel_axis, -1)


def spatial_map(
    a: jax.Array, p: float = 2.0, reduce: str = "mean", channel_axis: int = -1
) -> jax.Array:
    """Unnormalised 2-D attention: (B, H, W, C) -> (B, H, W) of ``reduce_c |a_c|^p`` (at least
    float32). ``channel_axis=1`` takes (B, C, H, W)."""
    _check_options(p, reduce, None)
    a = upcast(channels_last(a, channel_axis))
    powered = a * a if p == 2 else jnp.abs(a) ** p
    if reduce == "sum":
        return jnp.sum(powered, axis=-1)
    return jnp.mean(powered, axis=-1) if reduce == "mean" else jnp.max(powered, axis=-1)


def normalize_rows(q: jax.Array, normalize: Optional[str] = "l2") -> jax.Array:
    """Per-sample normalisation of (B, N) rows: ``q / max(||q||, eps)`` (l2 or l1), or identity."""
    _check_options(2.0, "mean", normalize)
    if normalize is None:
        return q
    order = 2 if normalize == "l2" else 1
    norm = jnp.linalg.norm(q, ord=order, axis=-1, keepdims=True)
    return q / jnp.maximum(norm, EPSILON)


def common_size(a_shape: tuple, b_shape: tuple, channel_axis: int = -1) -> tuple[int, int]:
    """The spatial size (H, W) at which two batches of feature maps are compared: the smaller
    one, when the larger is the same integer multiple of it in height and width.

    Raises ``ValueError`` naming both shapes and ``channel_axis`` otherwise.
    """
    spatial = [i for i in range(4) if i not in (0, channel_axis % 4)]
    a_hw = (int(a_shape[spatial[0]]), int(a_shape[spatial[1]]))
    b_hw = (int(b_shape[spatial[0]]), int(b_shape[spatial[1]]))
    if a_hw == b_hw:
        return a_hw
    small, large = sorted((a_hw, b_hw), key=lambda hw: hw[0] * hw[1])
    factors = {lg / sm for lg, sm in zip(large, small, strict=True)}
    if len(factors) != 1 or not all(lg % sm == 0 for lg, sm in zip(large, small, strict=True)):
        raise ValueError(
            f"cannot compare feature maps of shapes {tuple(a_shape)} and {tuple(b_shape)} with "
            f"channel_axis={channel_axis}: their spatial sizes {a_hw} and {b_hw} are not the "
            "same integer multiple of each other in height and width. Check the layout (NCHW "
            "arrays need channel_axis=1) and that the two points are at comparable depths."
        )
    return small


def pool_map(m: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Average-pool (B, H, W) maps down to ``size`` (H and W integer multiples of it, by the
    same factor; see :func:`common_size`). RepDistiller and torchdistill pool the larger
    *activation* before squaring it; pooling the map (after the channel reduction) keeps the map
    a function of the activation at full resolution."""
    b, h, w = m.shape
    th, tw = size
    if (h, w) == (th, tw):
        return m
    if h % th or w % tw or h // th != w // tw:
        raise ValueError(
            f"cannot pool a {h}x{w} map to {th}x{tw}: not the same integer factor "
            "in height and width"
        )
    return m.reshape(b, th, h // th, tw, w // tw).mean(axis=(2, 4))


def attention_map(
    a: jax.Array,
    p: float = 2.0,
    reduce: str = "mean",
    normalize: Optional[str] = "l2",
    *,
    size: Optional[tuple[int, int]] = None,
    channel_axis: int = -1,
) -> jax.Array:
    """Attention map of a batch of feature maps as (B, H*W) rows (paper §3.1; reference
    ``at(x)``).

    Args:
      a: activations, (B, H, W, C) (or (B, C, H, W) with ``channel_axis=1``).
      p: the exponent of ``|A_c|^p`` (2: the paper's F_sum², the reference's default).
      reduce: "mean" (the reference code), "sum" (the paper's F_sum^p) or "max" (F_max^p).
      normalize: "l2" (the reference), "l1", or None.
      size: average-pool the 2-D map to this (H, W) before normalising, to compare maps of
        different resolutions (see :func:`common_size`).
      channel_axis: the channel axis of ``a``.

    Returns:
      (B, H*W) float32 (at least) rows, normalised per sample.

    Example::

        q = attention_map(acts["group1"])                   # NHWC, (B, 16*16)
        q = attention_map(torch_like_nchw, channel_axis=1)  # the same map from NCHW
    """
    _check_options(p, reduce, normalize)
    m = spatial_map(a, p, reduce, channel_axis)
    if size is not None:
        m = pool_map(m, (int(size[0]), int(size[1])))
    return normalize_rows(m.reshape(m.shape[0], -1), normalize)
