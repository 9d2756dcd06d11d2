"""Network-in-Network for CIFAR-sized inputs, as the authors' own (cifar.torch ``models/nin.lua``,
Lin et al.'s CIFAR network) — the paper's NIN students and teachers (§4.1.1, §4.1.3).

    block0: conv5×5 w0 → conv1×1 w1 → conv1×1 w2 → max-pool 3×3/2 (ceil) → dropout
    block1: conv5×5 w3 → conv1×1 w4 → conv1×1 w5 → avg-pool 3×3/2 (ceil) → dropout
    block2: conv3×3 w6 → conv1×1 w7 → conv1×1 num_classes → global average

Every convolution has a bias and is followed by [BN (eps 1e-3)] and ReLU. Switches for the
paper's variants:

* ``batch_norm``: BN after every conv (the activation-based experiments) or none (Table 3's
  gradient-based AT);
* ``relu_before_pool``: whether the conv before each pooling is followed by ReLU. The paper's
  thin student without BN drops it ("which leads to better performance without batch
  normalization"), and so does its second teacher for activation-based AT;
* ``dropout_rate``: the dropout after the two poolings (0.5 in nin.lua; 0 turns it off);
* ``frozen_batch_norm``: BN uses its running statistics in train mode too (fine-tuning).

Widths: ``nin-wide`` (192, 160, 96, 192, 192, 192, 192, 192): 966,986 parameters without BN,
969,822 with (10 classes) — the paper's "wide NIN, 1M"; ``nin-thin`` halves every width: 246,186
/ 247,614 — the "thin NIN, 0.2M". Weights are drawn from N(0, 0.05²), biases are zero.

Sown activations: ``block0``, ``block1``, ``block2`` — each block's output before its pooling
(the conv outputs AT uses: 32², 16², 8² on CIFAR; 28², 14², 7² on Fashion-MNIST). Pooling uses
PyTorch's ceil mode; an average over a window cut by the border divides by the pixels inside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from at_jax.models.common import batch_norm
from at_jax.precision import upcast

__all__ = ["NIN", "WIDE_WIDTHS", "THIN_WIDTHS"]

WIDE_WIDTHS = (192, 160, 96, 192, 192, 192, 192, 192)
THIN_WIDTHS = tuple(w // 2 for w in WIDE_WIDTHS)
BN_EPSILON = 1e-3
KERNELS = ((5, 1, 1), (5, 1, 1), (3, 1, 1))
weight_init = nn.initializers.normal(0.05)


def _ceil_padding(size: int, window: int = 3, stride: int = 2) -> tuple[int, int]:
    """Right padding that makes a VALID pooling produce PyTorch's ceil-mode output size."""
    out = -(-(size - window) // stride) + 1
    return (0, max(0, (out - 1) * stride + window - size))


class NIN(nn.Module):
    widths: Sequence[int] = THIN_WIDTHS
    num_classes: int = 10
    batch_norm: bool = True
    relu_before_pool: bool = True
    dropout_rate: float = 0.5
    bn_scale_init: str = "ones"
    dtype: Any = jnp.float32
    frozen_batch_norm: bool = False  # train mode still normalises with the running statistics

    @nn.compact
    def __call__(self, x, train: bool = False):
        if len(self.widths) != 8 or any(int(w) < 1 for w in self.widths):
            raise ValueError(
                "NIN widths are 8 positive integers (the convs before the classifier "
                f"conv), got {tuple(self.widths)!r}"
            )
        x = x.astype(self.dtype)
        features = [*list(self.widths), self.num_classes]
        for b, kernels in enumerate(KERNELS):
            for j, kernel in enumerate(kernels):
                pad = kernel // 2
                x = nn.Conv(
                    features[3 * b + j],
                    (kernel, kernel),
                    padding=((pad, pad), (pad, pad)),
                    kernel_init=weight_init,
                    name=f"block{b}_conv{j}",
                    dtype=self.dtype,
                )(x)
                if self.batch_norm:
                    bn_train = train and not self.frozen_batch_norm
                    x = batch_norm(
                        bn_train,
                        f"block{b}_bn{j}",
                        self.dtype,
                        self.bn_scale_init,
                        epsilon=BN_EPSILON,
                    )(x)
                if j < 2 or self.relu_before_pool:
                    x = nn.relu(x)
            self.sow("intermediates", f"block{b}", x)
            if b < 2:
                padding = (_ceil_padding(x.shape[1]), _ceil_padding(x.shape[2]))
                pool = nn.max_pool if b == 0 else _avg_pool
                x = pool(x, (3, 3), strides=(2, 2), padding=padding)
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return upcast(jnp.mean(x, axis=(1, 2)))


def _avg_pool(x, window, strides, padding):
    return nn.avg_pool(x, window, strides=strides, padding=padding, count_include_pad=False)
