"""The small CIFAR students of RepDistiller's cross-architecture table (``models/mobilenetv2.py``,
``ShuffleNetv1.py``, ``ShuffleNetv2.py`` at b84f547), NHWC, under the reference's module names
(its ``.pth`` files convert by name; MobileNetV2's ``blocks.i.j`` through :func:`mobilenet_keys`).

* :class:`MobileNetV2`: the reference's ``mobile_half`` (expansion 6, width multiplier 0.5):
  ``conv1`` 3×3/2 → 16 channels, seven stages of inverted residuals (1×1 expansion, 3×3
  depthwise, 1×1 linear projection, each with batch norm; the residual where shapes allow),
  ``conv2`` 1×1 → 1280, global average pooling, ``classifier``. 812 836 parameters (100
  classes). Its feature points are the reference's: ``stem`` (after ``conv1``), ``block1`` …
  ``block4`` (after stages 1, 2, 4, 6: ``feat[1:5]``; its projections have no ReLU, so
  ``block{k}.preact`` is the same array), ``features``.
* :class:`ShuffleNetV1` (``ShuffleV1``: groups 3, widths 240-480-960, 4-8-4 blocks; 949 258
  parameters) and :class:`ShuffleNetV2` (``ShuffleV2``: net size 1, widths 116-232-464, 3-7-3
  blocks, ``conv2`` 1×1 → 1024; 1 355 528 parameters): a 1×1 stem of 24 channels (the
  reference's CIFAR stem, stride 1, no max-pool), three stages ``layer1..3`` that halve the
  resolution, global average pooling, ``linear``. Feature points ``stem``, ``layer{k}`` and
  the last block's pre-activation ``layer{k}.preact`` (V1: the sum or concatenation before the
  ReLU; V2: ``cat(x1, bn3(...))`` before the channel shuffle, as the reference returns it).

Where this differs from the reference: the reference pools with a fixed window (4, or 2 for
MobileNetV2), which is global average pooling at 32×32 (and MobileNetV2's asserts 32-pixel
multiples); here pooling is global at every input size, so 28×28 Fashion-MNIST works.
Initialisation is at_jax's (kaiming-normal fan-in, :mod:`at_jax.models.common`), not each
reference file's own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from at_jax.models.common import batch_norm, conv, dense
from at_jax.precision import upcast

__all__ = [
    "MobileNetV2",
    "ShuffleNetV1",
    "ShuffleNetV2",
    "channel_shuffle",
    "mobilenet_keys",
    "MOBILE_MODELS",
]

# t (expansion), c (channels), n (blocks), s (stride): the reference's MobileNetV2 setting
MOBILENET_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# the stages after which the reference's feat[1..4] are taken
_MOBILENET_POINTS = (1, 2, 4, 6)


def channel_shuffle(x, groups: int):
    """ShuffleNet's channel shuffle of NHWC ``x``: (…, g, C/g) → (…, C/g, g), as the
    reference's ``view(N, g, C/g, H, W).permute(0, 2, 1, 3, 4)``."""
    *lead, c = x.shape
    if groups == 1:
        return x
    return x.reshape(*lead, groups, c // groups).swapaxes(-1, -2).reshape(*lead, c)


class _Net(nn.Module):
    """What every model here has: its classes, dtype and batch-norm options."""

    num_classes: int = 100
    dtype: Any = jnp.float32
    bn_scale_init: str = "ones"
    frozen_batch_norm: bool = False

    def conv_bn(self, x, train, names: str, features: int, kernel: int = 1, **kw):
        """A convolution then its batch norm, ``names`` ``"CONV|BN"`` (the reference's)."""
        conv_name, bn_name = names.split("|")
        y = conv(features, kernel, name=conv_name, dtype=self.dtype, **kw)(x)
        return batch_norm(train, bn_name, self.dtype, self.bn_scale_init)(y)

    def head(self, x, name: str):
        x = jnp.mean(x, axis=(1, 2))
        self.sow("intermediates", "features", x)
        return upcast(dense(self.num_classes, name=name, dtype=self.dtype)(x))


class _InvertedResidual(_Net):
    """The reference's ``InvertedResidual`` (its ``conv`` Sequential: indices 0-7)."""

    features: int = 16
    stride: int = 1
    expand: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        hidden = x.shape[-1] * self.expand
        y = nn.relu(self.conv_bn(x, train, "conv_0|conv_1", hidden, padding=0))
        y = self.conv_bn(y, train, "conv_3|conv_4", hidden, 3, stride=self.stride, groups=hidden)
        y = self.conv_bn(nn.relu(y), train, "conv_6|conv_7", self.features, padding=0)
        return x + y if self.stride == 1 and x.shape[-1] == self.features else y


class MobileNetV2(_Net):
    """RepDistiller's CIFAR MobileNetV2 (``mobile_half``: ``expansion`` 6, ``width`` 0.5)."""

    expansion: int = 6
    width: float = 0.5

    @nn.compact
    def __call__(self, x, train: bool = False):
        train = train and not self.frozen_batch_norm
        x = x.astype(self.dtype)
        x = nn.relu(self.conv_bn(x, train, "conv1_0|conv1_1", int(32 * self.width), 3, stride=2))
        self.sow("intermediates", "stem", x)
        for i, (t, c, n, s) in enumerate(MOBILENET_SETTING):
            for j in range(n):
                x = _InvertedResidual(
                    dtype=self.dtype,
                    bn_scale_init=self.bn_scale_init,
                    features=int(c * self.width),
                    stride=s if j == 0 else 1,
                    expand=self.expansion if t > 1 else 1,
                    name=f"blocks_{i}_{j}",
                )(x, train)
            if i in _MOBILENET_POINTS:
                k = _MOBILENET_POINTS.index(i) + 1
                self.sow("intermediates", f"block{k}.preact", x)
                self.sow("intermediates", f"block{k}", x)
        last = int(1280 * self.width) if self.width > 1.0 else 1280
        x = nn.relu(self.conv_bn(x, train, "conv2_0|conv2_1", last, padding=0))
        return self.head(x, "classifier_0")


_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(\d+)\.")


def mobilenet_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The reference MobileNetV2's ``blocks.i.j.conv.k`` keys as ``blocks_i_j.conv.k`` (the
    module names here), for :func:`~at_jax.models.from_torchvision`."""
    return {_BLOCK_KEY.sub(r"blocks_\1_\2.", key): value for key, value in state_dict.items()}


class _ShuffleV1Block(_Net):
    """ShuffleNetV1's ``Bottleneck``: grouped 1×1 (``first_groups``: 1 on the stem's output, as
    the reference's ``in_planes == 24``), shuffle, depthwise 3×3, grouped 1×1; stride 2 joins an
    average-pooled shortcut by concatenation."""

    features: int = 240
    stride: int = 1
    groups: int = 3
    first_groups: int = 3
    preact_name: str = ""

    @nn.compact
    def __call__(self, x, train: bool):
        mid = self.features // 4
        y = nn.relu(self.conv_bn(x, train, "conv1|bn1", mid, padding=0, groups=self.first_groups))
        y = channel_shuffle(y, self.first_groups)
        y = nn.relu(self.conv_bn(y, train, "conv2|bn2", mid, 3, stride=self.stride, groups=mid))
        y = self.conv_bn(y, train, "conv3|bn3", self.features, padding=0, groups=self.groups)
        if self.stride == 2:
            # PyTorch's AvgPool2d(3, 2, padding=1) counts the zero padding
            shortcut = nn.avg_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)), count_include_pad=True)
            pre = jnp.concatenate([y, shortcut], axis=-1)
        else:
            pre = y + x
        if self.preact_name and isinstance(self.parent, nn.Module):
            self.parent.sow("intermediates", self.preact_name, pre)
        return nn.relu(pre)


class ShuffleNetV1(_Net):
    """RepDistiller's CIFAR ShuffleNetV1 (``ShuffleV1``)."""

    widths: Sequence[int] = (240, 480, 960)
    blocks: Sequence[int] = (4, 8, 4)
    groups: int = 3

    @nn.compact
    def __call__(self, x, train: bool = False):
        train = train and not self.frozen_batch_norm
        x = nn.relu(self.conv_bn(x.astype(self.dtype), train, "conv1|bn1", 24, padding=0))
        self.sow("intermediates", "stem", x)
        for k, (width, n) in enumerate(zip(self.widths, self.blocks, strict=True), start=1):
            for i in range(n):
                x = _ShuffleV1Block(
                    dtype=self.dtype,
                    bn_scale_init=self.bn_scale_init,
                    features=width - (x.shape[-1] if i == 0 else 0),
                    stride=2 if i == 0 else 1,
                    groups=self.groups,
                    first_groups=1 if k == 1 and i == 0 else self.groups,
                    preact_name=f"layer{k}.preact" if i == n - 1 else "",
                    name=f"layer{k}_{i}",
                )(x, train)
            self.sow("intermediates", f"layer{k}", x)
        return self.head(x, "linear")


class _ShuffleV2Block(_Net):
    """ShuffleNetV2's ``BasicBlock``: split the channels in halves, 1×1, depthwise 3×3, 1×1 on
    the second, concatenate, shuffle (groups 2)."""

    preact_name: str = ""

    @nn.compact
    def __call__(self, x, train: bool):
        c = x.shape[-1] // 2
        x1, x2 = x[..., :c], x[..., c:]
        width = x2.shape[-1]
        y = nn.relu(self.conv_bn(x2, train, "conv1|bn1", width, padding=0))
        y = self.conv_bn(y, train, "conv2|bn2", width, 3, groups=width)
        y = self.conv_bn(y, train, "conv3|bn3", width, padding=0)
        if self.preact_name and isinstance(self.parent, nn.Module):
            self.parent.sow("intermediates", self.preact_name, jnp.concatenate([x1, y], -1))
        return channel_shuffle(jnp.concatenate([x1, nn.relu(y)], axis=-1), 2)


class _ShuffleV2Down(_Net):
    """ShuffleNetV2's ``DownBlock``: two stride-2 branches of ``features / 2`` channels each,
    concatenated and shuffled."""

    features: int = 116

    @nn.compact
    def __call__(self, x, train: bool):
        mid, cin = self.features // 2, x.shape[-1]
        left = self.conv_bn(x, train, "conv1|bn1", cin, 3, stride=2, groups=cin)
        left = nn.relu(self.conv_bn(left, train, "conv2|bn2", mid, padding=0))
        right = nn.relu(self.conv_bn(x, train, "conv3|bn3", mid, padding=0))
        right = self.conv_bn(right, train, "conv4|bn4", mid, 3, stride=2, groups=mid)
        right = nn.relu(self.conv_bn(right, train, "conv5|bn5", mid, padding=0))
        return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleNetV2(_Net):
    """RepDistiller's CIFAR ShuffleNetV2 (``ShuffleV2``: net size 1)."""

    widths: Sequence[int] = (116, 232, 464, 1024)
    blocks: Sequence[int] = (3, 7, 3)

    @nn.compact
    def __call__(self, x, train: bool = False):
        train = train and not self.frozen_batch_norm
        opts = {"dtype": self.dtype, "bn_scale_init": self.bn_scale_init}
        x = nn.relu(self.conv_bn(x.astype(self.dtype), train, "conv1|bn1", 24, padding=0))
        self.sow("intermediates", "stem", x)
        for k, (width, n) in enumerate(zip(self.widths[:3], self.blocks, strict=True), start=1):
            x = _ShuffleV2Down(**opts, features=width, name=f"layer{k}_0")(x, train)
            for i in range(1, n + 1):
                last = f"layer{k}.preact" if i == n else ""
                x = _ShuffleV2Block(**opts, preact_name=last, name=f"layer{k}_{i}")(x, train)
            self.sow("intermediates", f"layer{k}", x)
        x = nn.relu(self.conv_bn(x, train, "conv2|bn2", self.widths[3], padding=0))
        return self.head(x, "linear")


MOBILE_MODELS = {
    "MobileNetV2": MobileNetV2,
    "ShuffleV1": ShuffleNetV1,
    "ShuffleV2": ShuffleNetV2,
}
