"""The CIFAR models of RepDistiller's benchmark (``models/resnet.py``, ``resnetv2.py``,
``vgg.py`` at b84f547; its MobileNetV2 and ShuffleNets: :mod:`at_jax.models.cifar_mobile`),
NHWC, with the reference's module names so that its ``.pth`` state dicts convert by name
(:func:`at_jax.models.resnet.from_torchvision`'s rule: ``layer1.0.conv1`` → ``layer1_0/conv1``).

* :class:`CifarResNet`: ``conv1`` 3×3 → ``bn1`` → ReLU, three stages ``layer1..3`` of basic
  blocks with 1×1 ``downsample`` convolutions where the shape changes, global
  average pooling, ``fc``. ``resnet8 … resnet110`` (depth 6n+2, widths 16-16-32-64) and
  ``resnet8x4``/``resnet32x4`` (widths 32-64-128-256).
* :class:`CifarResNetV2`: ``ResNet50`` (bottleneck blocks, four stages, ``shortcut`` projections).
* :class:`VGG`: five conv blocks (3×3 conv with bias, batch norm, ReLU; the last ReLU of each
  block applied outside it) with 2×2 max-pools between them (the fourth only for 64-pixel
  inputs, as the reference), global average pooling, ``classifier``. ``vgg8/11/13/16/19``.

Both sow RepDistiller's feature points: ``stem`` (its ``feat[0]``), the stages' (blocks')
outputs ``layer{k}``/``block{k}`` (``feat[1:-1]``) and their pre-activations
``layer{k}.preact``/``block{k}.preact`` (the residual sum / the block's batch norm before the
ReLU: ``preact=True``), and the pooled vector ``features`` (``feat[-1]``).

Parameter counts (100 classes), equal to the reference modules' (counted from RepDistiller's
own modules, and in ``tests/test_cifar_models.py`` from PyTorch modules of its layout): resnet8
83 892, resnet14 181 108, resnet20 278 324, resnet32 472 756, resnet44 667 188, resnet56
861 620, resnet110 1 736 564, resnet8x4 1 233 540, resnet32x4 7 433 860; vgg8 3 965 028,
vgg11 9 277 284, vgg13 9 462 180, vgg16 14 774 436, vgg19 20 086 692, ResNet50 23 705 252
(and at_jax's WRNs the reference's ``wrn_16_1`` 180 916, ``wrn_16_2`` 703 284, ``wrn_40_1``
569 780, ``wrn_40_2`` 2 255 156).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from at_jax.models.cifar_mobile import MOBILE_MODELS, mobilenet_keys
from at_jax.models.common import batch_norm, conv, dense
from at_jax.models.resnet import residual_stages
from at_jax.precision import upcast

__all__ = [
    "CifarResNet",
    "CifarBasicBlock",
    "CifarBottleneck",
    "CifarResNetV2",
    "VGG",
    "CIFAR_RESNETS",
    "VGG_CONFIGS",
    "REPDISTILLER_MODELS",
    "cifar_models",
    "wrn_keys",
    "reference_layout",
]

# name -> (depth, widths): RepDistiller's models/resnet.py
CIFAR_RESNETS = {
    **{f"resnet{d}": (d, (16, 16, 32, 64)) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}
# name -> the convolutions' widths per block: RepDistiller's models/vgg.py cfg S, A, B, D, E
VGG_CONFIGS = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": (
        (64, 64),
        (128, 128),
        (256, 256, 256, 256),
        (512, 512, 512, 512),
        (512, 512, 512, 512),
    ),
}


class _Residual(nn.Module):
    """The residual block's end: the shortcut and the final ReLU, sowing the pre-activation
    (the residual sum) in the parent under ``preact_name``."""

    shortcut = "downsample"  # the reference's name of the projection shortcut

    def finish(self, x, y, features: int, stride: int, train: bool, preact_name: str):
        if stride != 1 or x.shape[-1] != features:
            name = self.shortcut
            x = conv(features, 1, stride, padding=0, name=f"{name}_0", dtype=self.dtype)(x)
            x = batch_norm(train, f"{name}_1", self.dtype, self.bn_scale_init)(x)
        if preact_name and isinstance(self.parent, nn.Module):
            self.parent.sow("intermediates", preact_name, x + y)
        return nn.relu(x + y)


class CifarBasicBlock(_Residual):
    """The reference's ``BasicBlock``: 3×3 conv, BN, ReLU, 3×3 conv, BN, + shortcut, ReLU."""

    planes: int
    stride: int = 1
    dtype: Any = jnp.float32
    bn_scale_init: str = "ones"
    preact_name: str = ""
    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool):
        bn = lambda name: batch_norm(train, name, self.dtype, self.bn_scale_init)  # noqa: E731
        y = nn.relu(bn("bn1")(conv(self.planes, 3, self.stride, name="conv1", dtype=self.dtype)(x)))
        y = bn("bn2")(conv(self.planes, 3, 1, name="conv2", dtype=self.dtype)(y))
        return self.finish(x, y, self.planes, self.stride, train, self.preact_name)


class CifarBottleneck(_Residual):
    """``models/resnetv2.py``'s ``Bottleneck``: 1×1, 3×3 (stride), 1×1 to 4× ``planes``, each
    with BN (ReLU after the first two), + shortcut (``shortcut.0/1`` where shapes change), ReLU."""

    planes: int
    stride: int = 1
    dtype: Any = jnp.float32
    bn_scale_init: str = "ones"
    preact_name: str = ""
    expansion = 4
    shortcut = "shortcut"

    @nn.compact
    def __call__(self, x, train: bool):
        bn = lambda name: batch_norm(train, name, self.dtype, self.bn_scale_init)  # noqa: E731
        y = nn.relu(bn("bn1")(conv(self.planes, 1, padding=0, name="conv1", dtype=self.dtype)(x)))
        y = nn.relu(bn("bn2")(conv(self.planes, 3, self.stride, name="conv2", dtype=self.dtype)(y)))
        out = self.planes * self.expansion
        y = bn("bn3")(conv(out, 1, padding=0, name="conv3", dtype=self.dtype)(y))
        return self.finish(x, y, out, self.stride, train, self.preact_name)


class CifarResNetV2(nn.Module):
    """RepDistiller's ``ResNet50`` for CIFAR (``models/resnetv2.py``): a 3×3 stride-1 stem of 64
    channels (no max-pool), four stages ``layer1..4`` of bottlenecks (``stage_sizes``, widths
    64-128-256-512 ×4, strides 1-2-2-2), global average pooling, ``linear``. 23 705 252
    parameters (100 classes)."""

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    num_classes: int = 100
    dtype: Any = jnp.float32
    bn_scale_init: str = "ones"
    frozen_batch_norm: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        stages = [(64 * 2**k, n) for k, n in enumerate(self.stage_sizes)]
        return _resnet(self, x, train, CifarBottleneck, stages, 64, "linear")


class CifarResNet(nn.Module):
    """RepDistiller's CIFAR ResNet of ``depth`` (6n+2: n basic blocks per stage) and ``widths``
    (the stem's, then the three stages')."""

    depth: int = 20
    widths: Sequence[int] = (16, 16, 32, 64)
    num_classes: int = 100
    dtype: Any = jnp.float32
    bn_scale_init: str = "ones"
    frozen_batch_norm: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        if (self.depth - 2) % 6 or self.depth < 8:
            raise ValueError(f"a CIFAR ResNet has depth 6n+2 (8, 14, 20, ...), got {self.depth}")
        n = (self.depth - 2) // 6
        stages = [(planes, n) for planes in self.widths[1:4]]
        return _resnet(self, x, train, CifarBasicBlock, stages, self.widths[0], "fc")


def _resnet(net: nn.Module, x, train: bool, block: Any, stages, stem: int, head: str):
    """The reference CIFAR ResNets' forward in ``net``'s scope: a 3×3 stem of ``stem`` channels,
    BN, ReLU (sown as ``stem``), then :func:`~at_jax.models.resnet.residual_stages`."""
    train = train and not net.frozen_batch_norm
    x = conv(stem, 3, name="conv1", dtype=net.dtype)(x.astype(net.dtype))
    x = nn.relu(batch_norm(train, "bn1", net.dtype, net.bn_scale_init)(x))
    net.sow("intermediates", "stem", x)
    return residual_stages(net, x, train, block, stages, head)


class VGG(nn.Module):
    """RepDistiller's CIFAR VGG with batch norm (``vgg*_bn``): ``config`` the widths of its five
    blocks (:data:`VGG_CONFIGS`)."""

    config: Sequence[Sequence[int]] = VGG_CONFIGS["vgg8"]
    num_classes: int = 100
    dtype: Any = jnp.float32
    bn_scale_init: str = "ones"
    frozen_batch_norm: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        train = train and not self.frozen_batch_norm
        pool = lambda y: nn.max_pool(y, (2, 2), strides=(2, 2))  # noqa: E731
        height = x.shape[1]
        x = x.astype(self.dtype)
        for b, widths in enumerate(self.config):
            # (3×3 conv with bias, BN, ReLU) per width, the block's last ReLU outside it (the
            # reference's layers[:-1]); named by the reference's Sequential indices: conv 3j,
            # BN 3j+1 (block0.0.weight -> block0_0/kernel)
            for j, width in enumerate(widths):
                x = nn.relu(x) if j else x
                x = conv(width, 3, use_bias=True, name=f"block{b}_{3 * j}", dtype=self.dtype)(x)
                x = batch_norm(train, f"block{b}_{3 * j + 1}", self.dtype, self.bn_scale_init)(x)
            if b == 0:
                x = nn.relu(x)
                self.sow("intermediates", "stem", x)
            else:
                self.sow("intermediates", f"block{b}.preact", x)
                x = nn.relu(x)
                self.sow("intermediates", f"block{b}", x)
            if b < 3 or (b == 3 and height == 64):
                x = pool(x)
        x = jnp.mean(x, axis=(1, 2))
        self.sow("intermediates", "features", x)
        return upcast(dense(self.num_classes, name="classifier", dtype=self.dtype)(x))


# What `python -m at_jax.convert --repdistiller` takes: the models here and its WRNs
REPDISTILLER_MODELS = (
    *CIFAR_RESNETS,
    "ResNet50",
    *VGG_CONFIGS,
    *MOBILE_MODELS,
    "wrn_16_1",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
)
_WRN_BLOCK_KEY = re.compile(r"^block(\d+)\.layer\.(\d+)\.(bn1|conv1|bn2|conv2|convShortcut)\.(.+)$")
_WRN_INNER = {
    "bn1": "bn0",
    "conv1": "conv0",
    "bn2": "bn1",
    "conv2": "conv1",
    "convShortcut": "convdim",
}


def wrn_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """RepDistiller's WRN keys (``block1.layer.0.bn1.weight``, ``convShortcut``, the final
    ``bn1``) under at_jax's WRN names (``group0_block0.bn0.weight``, ``convdim``, ``bn``), for
    :func:`~at_jax.models.from_torchvision`."""
    out = {}
    for key, value in state_dict.items():
        block = _WRN_BLOCK_KEY.match(key)
        if block:
            g, i, inner, leaf = block.groups()
            key = f"group{int(g) - 1}_block{i}.{_WRN_INNER[inner]}.{leaf}"
        elif key.startswith("conv1."):
            key = "conv0." + key[len("conv1.") :]
        elif key.startswith("bn1."):
            key = "bn." + key[len("bn1.") :]
        out[key] = value
    return out


def reference_layout(name: str, state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """A RepDistiller state dict of model ``name`` under the module names here (WRN and
    MobileNetV2 keys renamed), and the key of its classifier's weight."""
    if name.startswith("wrn_"):
        return wrn_keys(state_dict), "fc.weight"
    if name == "MobileNetV2":
        return mobilenet_keys(state_dict), "classifier.0.weight"
    head = "classifier" if name.startswith("vgg") else "fc" if name in CIFAR_RESNETS else "linear"
    return dict(state_dict), f"{head}.weight"


def cifar_models() -> dict[str, Any]:
    """The reference's names → builders of the models here (the registry's entries)."""
    out: dict[str, Any] = {}
    for name, (depth, widths) in CIFAR_RESNETS.items():
        out[name] = lambda depth=depth, widths=widths, **kw: CifarResNet(
            depth=depth, widths=widths, **kw
        )
    for name, config in VGG_CONFIGS.items():
        out[name] = lambda config=config, **kw: VGG(config=config, **kw)
    return {**out, "ResNet50": CifarResNetV2, **MOBILE_MODELS}
