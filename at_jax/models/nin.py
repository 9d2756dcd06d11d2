"""Network-in-Network for CIFAR-sized inputs (the paper's §4.1.1 and §4.1.3 students/teachers).

Three blocks, each conv3×3 → conv1×1 → conv1×1 (every conv followed by [BN] and ReLU), then 2×2
max pooling after the first two blocks and global average pooling after the last, and a dense head.
Two switches reproduce the paper's variants:

  ``batch_norm``        BN after every conv (the activation-based experiments) or none, with conv
                        biases instead (Table 3, gradient-based AT);
  ``relu_before_pool``  whether the last conv of a block is followed by ReLU. The paper's thin
                        student without BN drops it ("which leads to better performance without
                        batch normalization").

Sown activations: ``block0``, ``block1``, ``block2`` — each block's output before pooling
(32², 16², 8² on CIFAR, matching WRN groups).

Widths: ``nin-thin`` (64, 96, 128) ≈ 0.23M parameters, ``nin-wide`` (128, 192, 256) ≈ 0.91M.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from at_jax.precision import upcast
from at_jax.models.common import batch_norm, conv, dense

THIN_WIDTHS = (64, 96, 128)
WIDE_WIDTHS = (128, 192, 256)


class NIN(nn.Module):
    widths: Sequence[int] = THIN_WIDTHS
    num_classes: int = 10
    batch_norm: bool = True
    relu_before_pool: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if len(self.widths) == 0 or any(int(w) < 1 for w in self.widths):
            raise ValueError(f"NIN widths must be positive integers, got {tuple(self.widths)!r}")
        x = x.astype(self.dtype)
        last_block = len(self.widths) - 1
        for b, width in enumerate(self.widths):
            for j, kernel in enumerate((3, 1, 1)):
                x = conv(width, kernel, use_bias=not self.batch_norm, name=f"block{b}_conv{j}",
                         dtype=self.dtype)(x)
                if self.batch_norm:
                    x = batch_norm(train, f"block{b}_bn{j}", self.dtype)(x)
                if j < 2 or self.relu_before_pool:
                    x = nn.relu(x)
            self.sow("intermediates", f"block{b}", x)
            if b < last_block:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = jnp.mean(x, axis=(1, 2))
        return upcast(dense(self.num_classes, name="fc", dtype=self.dtype)(x))
