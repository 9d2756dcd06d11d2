"""Building blocks shared by the model families.

Initialisation follows the reference code: convolutions and dense layers use kaiming-normal
(fan-in, gain sqrt(2), untruncated normal), biases are zero. Batch-norm offsets start at zero and
scales at one (``bn_scale_init="ones"``, the torchvision and Flax default) or, as the reference
CIFAR code, drawn from U(0, 1) (``bn_scale_init="uniform"``; the Table 1/2 configs use it).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

# PyTorch's BatchNorm2d defaults: momentum 0.1 on the new statistic (= 0.9 on the running one).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def conv(features: int, kernel: int, stride: int = 1, padding: int | None = None,
         use_bias: bool = False, name: str | None = None, dtype=jnp.float32) -> nn.Conv:
    """A square convolution with PyTorch's explicit symmetric padding (default: kernel // 2).

    Explicit padding (not 'SAME') keeps strided convolutions aligned exactly as in the reference.
    """
    pad = kernel // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=use_bias,
                   kernel_init=kaiming_normal, name=name, dtype=dtype)


BN_SCALE_INITS = ("ones", "uniform")


def bn_scale_initializer(kind: str):
    """``"ones"`` or ``"uniform"`` (U(0, 1), the reference CIFAR code's BN scales)."""
    if kind not in BN_SCALE_INITS:
        raise ValueError(f"bn_scale_init must be one of {BN_SCALE_INITS}, got {kind!r}")
    return nn.initializers.ones if kind == "ones" else nn.initializers.uniform(1.0)


def batch_norm(train: bool, name: str | None = None, dtype=jnp.float32,
               scale_init: str = "ones") -> nn.BatchNorm:
    """BatchNorm with PyTorch's momentum and epsilon; batch statistics when training."""
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                        epsilon=BN_EPSILON, scale_init=bn_scale_initializer(scale_init),
                        name=name, dtype=dtype)


dense = functools.partial(nn.Dense, kernel_init=kaiming_normal)
