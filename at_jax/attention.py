"""Activation-based spatial attention maps (paper §3.1): call :func:`attention_map`.

For an activation tensor ``A`` with a channel axis (NHWC by default; ``channel_axis=1`` for
NCHW) the attention map is a function of the channel-wise absolute values, flattened to
(B, H*W)::

    reduce="sum"   F_sum^p(A)  = Σ_c |A_c|^p
    reduce="mean"  (1/C) Σ_c |A_c|^p   — the public reference code (``x.pow(2).mean(1)``)
    reduce="max"   F_max^p(A)  = max_c |A_c|^p

then normalised per sample (``normalize="l2"`` as the reference's ``F.normalize``, ``"l1"``, or
``None``), with the reference's epsilon: ``q / max(||q||, 1e-12)``. Every norm here
(:func:`safe_norm`) has a finite gradient at zero, PyTorch's: an all-zero map (a blank image
through a bias-free convolution, a ReLU stage that is off for one example) gives finite
gradients, not NaN.

Layouts: a 4-D array is NHWC unless ``channel_axis`` says otherwise. What can be detected is
refused or flagged: a 3-D array (ViT tokens, (B, N, D)) is refused with how to make it a grid;
two maps whose spatial sizes are not one integer multiple of each other are refused; an array
read as NHWC whose last two axes are equal and differ from the second (``(B, C, H, H)``, the
shape of square NCHW maps) gives a warning. What cannot be detected: NCHW arrays of the same
non-square shape on both sides, read as NHWC, give a number without complaint — pass
``channel_axis=1`` for PyTorch-layout arrays.

Maps of different resolutions (a student and a teacher whose feature maps differ in size) are
compared after average-pooling the larger map to the smaller (:func:`pool_map`), which needs the
larger size to be the same integer multiple of the smaller in height and width; anything else
raises, so that a wrong layout (an NCHW array read as NHWC) fails loudly instead of giving a
plausible number.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from at_jax.precision import upcast

__all__ = [
    "attention_map",
    "spatial_map",
    "normalize_rows",
    "safe_norm",
    "check_feature_maps",
    "pool_map",
    "common_size",
    "adaptive_avg_pool",
    "pool_to_smaller",
    "POOLS",
    "EPSILON",
    "REDUCTIONS",
    "NORMALIZATIONS",
]

EPSILON = 1e-12
REDUCTIONS = ("sum", "mean", "max")
NORMALIZATIONS = ("l2", "l1", None)
# where maps of two sizes are made comparable (at_jax.losses.at_loss's ``pool``): "map", the
# map average-pooled by an integer factor; "activation", RepDistiller's adaptive average pooling
# of the larger activation before the map, at any ratio
POOLS = ("map", "activation")


def _check_options(p: float, reduce: str, normalize: Optional[str]) -> None:
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if not p > 0:
        raise ValueError(f"the attention exponent p must be positive, got {p!r}")


def _token_hint(shape: tuple) -> str:
    b, n, d = shape
    side = round((n - 1) ** 0.5)
    grid = (
        f"tokens[:, 1:].reshape({b}, {side}, {side}, {d}) drops the class token and makes the "
        f"{side}x{side} patch grid; "
        if side * side == n - 1
        else f"tokens.reshape(B, h, w, {d}) with h*w patch tokens; "
    )
    return (
        f"a 3-D array {tuple(shape)} looks like (B, N, D) tokens, not a feature map: {grid}"
        "then the grid is a feature map (B, h, w, D). Attention maps take 4-D batches of "
        "feature maps: NHWC, or NCHW with channel_axis=1"
    )


def check_feature_maps(shape: tuple, channel_axis: int = -1, warn: bool = True) -> None:
    """Raise ``ValueError`` unless ``shape`` is a 4-D batch of feature maps with a valid
    ``channel_axis``; ``warn``: warn when an array read as NHWC has the shape of square NCHW
    maps."""
    shape = tuple(int(d) for d in shape)
    if len(shape) != 4:
        raise ValueError(
            _token_hint(shape)
            if len(shape) == 3
            else "attention maps take a batch of feature maps (4 dims: NHWC, or NCHW "
            f"with channel_axis=1), got shape {shape}"
        )
    if not -4 <= channel_axis < 4 or channel_axis in (0, -4):
        raise ValueError(
            f"channel_axis must name one of the axes 1-3 (or -1..-3) of a 4-D "
            f"batch, got {channel_axis}"
        )
    if warn and channel_axis in (-1, 3) and shape[2] == shape[3] != shape[1] and shape[1] > 1:
        warnings.warn(
            f"an array of shape {shape} is read as NHWC (H={shape[1]}, W={shape[2]}, "
            f"C={shape[3]}), but it has the shape of NCHW maps ({shape[1]} channels of "
            f"{shape[2]}x{shape[3]}): pass channel_axis=1 if it is NCHW",
            stacklevel=2,
        )


def channels_last(a: jax.Array, channel_axis: int = -1) -> jax.Array:
    """``a`` (4-D: a batch of feature maps) with its channel axis moved last (NHWC)."""
    check_feature_maps(a.shape, channel_axis)
    return a if channel_axis in (-1, 3) else jnp.moveaxis(a, channel_axis, -1)


def safe_norm(x: jax.Array, order: int = 2, axis: int = -1, keepdims: bool = False) -> jax.Array:
    """The l1 or l2 norm of ``x`` along ``axis`` with PyTorch's gradient at zero (0, where
    ``jnp.linalg.norm``'s is NaN): the values are ``jnp.linalg.norm``'s."""
    if order not in (1, 2):
        raise ValueError(f"safe_norm takes order 1 or 2, got {order!r}")
    if order == 1:  # |x|'s gradient at 0 is 1 in JAX, 0 in PyTorch: a zero entry adds nothing
        return jnp.sum(jnp.where(x == 0, 0.0, jnp.abs(x)), axis=axis, keepdims=keepdims)
    squared = jnp.sum(x * x, axis=axis, keepdims=keepdims)
    positive = squared > 0
    # the double `where`: sqrt's gradient is taken only where it is finite
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


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
    """Per-sample normalisation of (B, N) rows: ``q / max(||q||, eps)`` (l2 or l1), or identity
    — PyTorch's ``F.normalize``, whose gradient is finite for an all-zero row (``1/eps`` times
    the incoming one, as PyTorch's)."""
    _check_options(2.0, "mean", normalize)
    if normalize is None:
        return q
    norm = safe_norm(q, 2 if normalize == "l2" else 1, axis=-1, keepdims=True)
    return q / jnp.maximum(norm, EPSILON)


def common_size(a_shape: tuple, b_shape: tuple, channel_axis: int = -1) -> tuple[int, int]:
    """The spatial size (H, W) at which two batches of feature maps are compared: the smaller
    one, when the larger is the same integer multiple of it in height and width.

    Raises ``ValueError`` naming both shapes and ``channel_axis`` otherwise (and for arrays that
    are not 4-D batches of feature maps, see :func:`check_feature_maps`).
    """
    for shape in (a_shape, b_shape):
        check_feature_maps(shape, channel_axis, warn=False)  # the maps themselves warn
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
            "arrays need channel_axis=1) and that the two points are at comparable depths; to "
            "compare them at any ratio as RepDistiller does, pool the activations adaptively "
            "(at_loss(..., pool='activation'); in a config, loss.at.pool = 'activation')."
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


def _bins(n_in: int, n_out: int) -> jax.Array:
    """(n_out, n_in) averaging weights of PyTorch's adaptive pooling: output ``i`` is the mean of
    inputs ``floor(i·n_in/n_out) .. ceil((i+1)·n_in/n_out) − 1`` (bins overlap when the sizes
    do not divide)."""
    i = np.arange(n_out)
    start, end = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
    j = np.arange(n_in)
    inside = (j[None] >= start[:, None]) & (j[None] < end[:, None])
    return jnp.asarray(inside / (end - start)[:, None], jnp.float32)


def adaptive_avg_pool(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """PyTorch's ``F.adaptive_avg_pool2d`` of NHWC ``x`` (B, H, W, C) to ``size`` (h, w): any
    ratio, each output the mean of its bin (see :func:`_bins`); for sizes that divide, the
    plain average pooling. Float32 at least."""
    h, w = x.shape[1:3]
    if (h, w) == tuple(size):
        return x
    if not (0 < size[0] <= h and 0 < size[1] <= w):
        raise ValueError(f"adaptive_avg_pool pools a {h}x{w} map down, not to {size}")
    rows, cols = _bins(h, int(size[0])), _bins(w, int(size[1]))
    return jnp.einsum("ih,bhwc,jw->bijc", rows, upcast(x), cols)


def pool_to_smaller(f_s: jax.Array, f_t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """RepDistiller's rule for two NHWC activations of different sizes: the larger one
    adaptively average-pooled (:func:`adaptive_avg_pool`) to the other's size. The reference
    pools the map of the larger height to the other's (H, H); for maps that are not square,
    each of height and width goes to the smaller of the two."""
    for f in (f_s, f_t):
        check_feature_maps(f.shape, warn=False)
    size = (min(f_s.shape[1], f_t.shape[1]), min(f_s.shape[2], f_t.shape[2]))
    return adaptive_avg_pool(f_s, size), adaptive_avg_pool(f_t, size)


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
