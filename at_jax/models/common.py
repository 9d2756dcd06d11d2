"""Building blocks shared by the model families.

Initialisation follows the reference code: convolutions and dense layers use kaiming-normal
(fan-in, gain sqrt(2), untruncated normal), biases are zero. Batch-norm offsets start at zero and
scales at one (``bn_scale_init="ones"``, the torchvision and Flax default) or, as the reference
CIFAR code, drawn from U(0, 1) (``bn_scale_init="uniform"``; the Table 1/2 configs use it).
Batch norm (:class:`BatchNorm`) updates its running variance with the unbiased batch variance,
as PyTorch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "BatchNorm",
    "batch_norm",
    "conv",
    "dense",
    "bn_scale_initializer",
    "kaiming_normal",
    "BN_MOMENTUM",
    "BN_EPSILON",
    "BN_SCALE_INITS",
]

kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

# PyTorch's BatchNorm2d defaults: momentum 0.1 on the new statistic (= 0.9 on the running one).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def conv(
    features: int,
    kernel: int,
    stride: int = 1,
    padding: int | None = None,
    use_bias: bool = False,
    name: str | None = None,
    dtype=jnp.float32,
    groups: int = 1,
) -> nn.Conv:
    """A square convolution with PyTorch's explicit symmetric padding (default: kernel // 2);
    ``groups`` as PyTorch's (``groups=channels``: depthwise).

    Explicit padding (not 'SAME') keeps strided convolutions aligned exactly as in the reference.
    """
    pad = kernel // 2 if padding is None else padding
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        feature_group_count=groups,
        kernel_init=kaiming_normal,
        name=name,
        dtype=dtype,
    )


BN_SCALE_INITS = ("ones", "uniform")


def bn_scale_initializer(kind: str):
    """``"ones"`` or ``"uniform"`` (U(0, 1), the reference CIFAR code's BN scales)."""
    if kind not in BN_SCALE_INITS:
        raise ValueError(f"bn_scale_init must be one of {BN_SCALE_INITS}, got {kind!r}")
    return nn.initializers.ones if kind == "ones" else nn.initializers.uniform(1.0)


class BatchNorm(nn.Module):
    """Batch norm over the channels-last axis, as PyTorch's ``BatchNorm2d``.

    Training (``use_running_average=False``) normalises with the batch statistics (mean and
    biased variance over every axis but the last, computed in at least float32) and updates the
    running statistics as PyTorch does: ``running_var ← m·running_var + (1 − m)·var·n/(n − 1)``
    with the *unbiased* batch variance (n = values per channel: batch × height × width), where
    Flax's ``nn.BatchNorm`` uses the biased one (a relative difference of 1/(n − 1)). Otherwise
    it normalises with the running statistics and leaves them alone. Variables and their names
    are Flax's (``params``: ``scale``, ``bias``; ``batch_stats``: ``mean``, ``var``), so
    checkpoints and the torchvision converter are unchanged.
    """

    use_running_average: bool
    momentum: float = BN_MOMENTUM  # weight of the old running value (PyTorch's 1 − momentum)
    epsilon: float = BN_EPSILON
    dtype: Any = jnp.float32
    scale_init: Callable = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        axes = tuple(range(x.ndim - 1))
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
            mean = jnp.mean(xf, axes)
            var = jnp.maximum(0.0, jnp.mean(xf * xf, axes) - mean * mean)
            if not self.is_initializing():
                n = x.size // features
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * mean
                ra_var.value = m * ra_var.value + (1 - m) * var * (n / max(n - 1, 1))
        scale = self.param("scale", self.scale_init, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        y = (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        return y.astype(self.dtype)


def batch_norm(
    train: bool,
    name: str | None = None,
    dtype: Any = jnp.float32,
    scale_init: str = "ones",
    epsilon: float = BN_EPSILON,
) -> BatchNorm:
    """:class:`BatchNorm` with PyTorch's momentum and ``epsilon``; batch statistics (and the
    running statistics' update) when training."""
    return BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=epsilon,
        scale_init=bn_scale_initializer(scale_init),
        name=name,
        dtype=dtype,
    )


dense = functools.partial(nn.Dense, kernel_init=kaiming_normal)
