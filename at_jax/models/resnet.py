"""ImageNet ResNet-18/34 (post-activation basic blocks), laid out like torchvision's.

Every torchvision parameter has exactly one counterpart here: ``conv1``, ``bn1``,
``layer{L}_{i}`` blocks with ``conv1``/``bn1``/``conv2``/``bn2`` and, where the shape changes,
``downsample_0`` (1×1 conv) and ``downsample_1`` (BN), then ``fc``. :func:`from_torchvision`
converts a torchvision ``state_dict`` (as NumPy arrays) into Flax variables.

``frozen_batch_norm=True`` (fine-tuning): batch norm uses its running statistics in train mode
too, and leaves them unchanged.

Sown activations: ``layer1`` … ``layer4`` (outputs of each group of blocks, after the final ReLU),
as used by the paper's ImageNet and transfer-learning experiments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from at_jax.models.common import batch_norm, conv, dense
from at_jax.precision import upcast

__all__ = ["ResNet", "BasicBlock", "from_torchvision", "STAGE_SIZES", "STAGE_WIDTHS"]

STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
STAGE_WIDTHS = (64, 128, 256, 512)


class BasicBlock(nn.Module):
    """torchvision's basic block. ``preact_name``: sow the residual sum before the final ReLU
    (the block's pre-activation: AB's feature point) under that name among its parent's
    activations."""

    features: int
    stride: int
    dtype: Any = jnp.float32
    bn_scale_init: str = "ones"
    preact_name: str = ""

    @nn.compact
    def __call__(self, x, train: bool):
        bn = lambda name: batch_norm(train, name, self.dtype, self.bn_scale_init)  # noqa: E731
        y = conv(self.features, 3, self.stride, name="conv1", dtype=self.dtype)(x)
        y = nn.relu(bn("bn1")(y))
        y = conv(self.features, 3, 1, name="conv2", dtype=self.dtype)(y)
        y = bn("bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = conv(
                self.features, 1, self.stride, padding=0, name="downsample_0", dtype=self.dtype
            )(x)
            x = bn("downsample_1")(x)
        if self.preact_name and isinstance(self.parent, nn.Module):
            self.parent.sow("intermediates", self.preact_name, x + y)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """torchvision's ResNet-18/34 layout. Sows the stem's output after the max-pool (``stem``),
    each stage's output (``layer{k}``) and its last block's pre-activation (``layer{k}.preact``:
    the residual sum before the ReLU) and the pooled vector (``features``)."""

    stage_sizes: Sequence[int] = STAGE_SIZES[18]
    num_classes: int = 1000
    dtype: Any = jnp.float32
    widths: Sequence[int] = STAGE_WIDTHS
    bn_scale_init: str = "ones"
    frozen_batch_norm: bool = False  # train mode still normalises with the running statistics

    @nn.compact
    def __call__(self, x, train: bool = False):
        train = train and not self.frozen_batch_norm  # (only batch norm depends on it)
        x = conv(self.widths[0], 7, 2, padding=3, name="conv1", dtype=self.dtype)(
            x.astype(self.dtype)
        )
        x = nn.relu(batch_norm(train, "bn1", self.dtype, self.bn_scale_init)(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        self.sow("intermediates", "stem", x)
        stages = list(zip(self.widths, self.stage_sizes, strict=True))
        return residual_stages(self, x, train, BasicBlock, stages, "fc")


def residual_stages(net: nn.Module, x, train: bool, block: Any, stages, head: str):
    """The ResNets' stages and head in ``net``'s scope, after its stem: ``stages``
    ``(planes, blocks)`` of ``block`` named ``layer{k}_{i}`` (stride 2 opening all but the
    first), sowing ``layer{k}``, the last block's ``layer{k}.preact`` and the pooled
    ``features`` (RepDistiller's ``feat[-1]``); the classifier ``head``."""
    for k, (planes, n) in enumerate(stages, start=1):
        for i in range(n):
            x = block(
                planes,
                2 if k > 1 and i == 0 else 1,
                net.dtype,
                net.bn_scale_init,
                preact_name=f"layer{k}.preact" if i == n - 1 else "",
                name=f"layer{k}_{i}",
            )(x, train)
        net.sow("intermediates", f"layer{k}", x)
    x = jnp.mean(x, axis=(1, 2))
    net.sow("intermediates", "features", x)
    return upcast(dense(net.num_classes, name=head, dtype=net.dtype)(x))


_BN_FIELDS = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}


def from_torchvision(state_dict: Mapping[str, Any]) -> dict:
    """Convert a torchvision ResNet ``state_dict`` into ``{'params': ..., 'batch_stats': ...}``
    (and any state dict of that naming: RepDistiller's CIFAR ResNets and VGGs, whose modules
    :mod:`at_jax.models.cifar` names alike).

    Keys such as ``layer2.0.downsample.1.running_var`` become
    ``batch_stats/layer2_0/downsample_1/var``; conv kernels go from OIHW to HWIO and the fc weight
    is transposed. ``num_batches_tracked`` entries are ignored.
    """
    variables: dict = {"params": {}, "batch_stats": {}}
    # batch norms are the modules with running statistics (VGG's are Sequential indices)
    bn_modules = {k.rsplit(".", 1)[0] for k in state_dict if k.endswith(".running_mean")}
    for key, value in state_dict.items():
        value = np.asarray(value)
        parts = key.split(".")
        field = parts[-1]
        if field == "num_batches_tracked":
            continue
        module = parts[:-1]
        # layer2.0.downsample.1 -> layer2_0 / downsample_1
        path = []
        i = 0
        while i < len(module):
            if i + 1 < len(module) and module[i + 1].isdigit():
                path.append(f"{module[i]}_{module[i + 1]}")
                i += 2
            else:
                path.append(module[i])
                i += 1
        if ".".join(module) in bn_modules:
            collection, name = _BN_FIELDS[field]
        elif value.ndim == 4:
            collection, name, value = "params", "kernel", value.transpose(2, 3, 1, 0)
        elif field == "weight":
            collection, name, value = "params", "kernel", value.T
        else:
            collection, name = "params", "bias"
        node = variables[collection]
        for p in path:
            node = node.setdefault(p, {})
        if name in node:
            raise ValueError(f"duplicate torchvision key mapped to {'/'.join(path)}/{name}: {key}")
        node[name] = jnp.asarray(value)
    return variables
