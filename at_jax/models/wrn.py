"""Wide Residual Networks for CIFAR-sized inputs, exactly as the attention-transfer reference code.

WRN-D-K: depth D = 6n + 4, n pre-activation blocks per group, group widths (16, 32, 64) × K,
group strides 1, 2, 2. The stem (3×3 conv to 16 channels) is not widened. A block is
BN-ReLU-conv3×3-BN-ReLU-conv3×3; when the channel count changes the shortcut is a 1×1 conv
(same stride) applied to the *pre-activated* input. Head: BN-ReLU-global average pool-dense.

Sown activations (collection ``intermediates``):

* ``group0``, ``group1``, ``group2``: raw residual sums at the end of each group (before BN/ReLU)
* ``group{g}.block{i}``: the raw residual sum after every block (same-depth pairing)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from at_jax.models.common import batch_norm, conv, dense
from at_jax.precision import upcast

__all__ = ["WideResNet", "WRNBlock", "blocks_per_group"]

BASE_WIDTHS = (16, 32, 64)
GROUP_STRIDES = (1, 2, 2)


def blocks_per_group(depth: int) -> int:
    """Number of blocks per group for a WRN of the given depth (depth = 6n + 4)."""
    if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(
            f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth!r}"
        )
    return (depth - 4) // 6


class WRNBlock(nn.Module):
    """Pre-activation basic block of the reference code. ``preact_name``: sow the batch norm of
    its input before the ReLU (the previous group's pre-activation: AB's feature point) under
    that name among its parent's activations."""

    features: int
    stride: int
    dtype: Any = jnp.float32
    bn_scale_init: str = "ones"
    preact_name: str = ""

    @nn.compact
    def __call__(self, x, train: bool):
        pre = batch_norm(train, "bn0", self.dtype, self.bn_scale_init)(x)
        if self.preact_name and isinstance(self.parent, nn.Module):
            self.parent.sow("intermediates", self.preact_name, pre)
        o1 = nn.relu(pre)
        y = conv(self.features, 3, self.stride, name="conv0", dtype=self.dtype)(o1)
        o2 = nn.relu(batch_norm(train, "bn1", self.dtype, self.bn_scale_init)(y))
        z = conv(self.features, 3, 1, name="conv1", dtype=self.dtype)(o2)
        if x.shape[-1] != self.features:
            return z + conv(
                self.features, 1, self.stride, padding=0, name="convdim", dtype=self.dtype
            )(o1)
        if self.stride != 1:
            raise ValueError("a WRN block that changes resolution must change channels too")
        return z + x


class WideResNet(nn.Module):
    """WRN-depth-width. ``__call__(x, train)`` maps NHWC images to logits and sows the first
    conv's output (``stem``), group outputs (``group{g}``, ``group{g}.block{i}``), each group's
    pre-activation (``group{g}.preact``: its output through the batch norm that comes next, the
    next group's first ``bn0`` or the final ``bn``, before the ReLU; RepDistiller's
    ``preact=True`` features) and the pooled vector (``features``)."""

    depth: int = 16
    width: int = 1
    num_classes: int = 10
    dtype: Any = jnp.float32
    bn_scale_init: str = "ones"  # "uniform": U(0, 1), as the reference CIFAR code
    frozen_batch_norm: bool = False  # train mode still normalises with the running statistics

    @nn.compact
    def __call__(self, x, train: bool = False):
        train = train and not self.frozen_batch_norm  # (only batch norm depends on it)
        n = blocks_per_group(self.depth)
        if not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"WRN width must be a positive integer, got {self.width!r}")
        x = conv(BASE_WIDTHS[0], 3, name="conv0", dtype=self.dtype)(x.astype(self.dtype))
        self.sow("intermediates", "stem", x)
        for g, (base, stride) in enumerate(zip(BASE_WIDTHS, GROUP_STRIDES, strict=True)):
            for i in range(n):
                x = WRNBlock(
                    base * self.width,
                    stride if i == 0 else 1,
                    self.dtype,
                    self.bn_scale_init,
                    preact_name=f"group{g - 1}.preact" if g > 0 and i == 0 else "",
                    name=f"group{g}_block{i}",
                )(x, train)
                self.sow("intermediates", f"group{g}.block{i}", x)
            self.sow("intermediates", f"group{g}", x)
        pre = batch_norm(train, "bn", self.dtype, self.bn_scale_init)(x)
        self.sow("intermediates", f"group{len(BASE_WIDTHS) - 1}.preact", pre)
        x = jnp.mean(nn.relu(pre), axis=(1, 2))
        self.sow("intermediates", "features", x)  # the pooled vector (RepDistiller's feat[-1])
        return upcast(dense(self.num_classes, name="fc", dtype=self.dtype)(x))
