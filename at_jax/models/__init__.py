"""Model registry: ``get_model(name, num_classes=10, **overrides)``.

Names: ``wrn-D-K`` (any depth D = 6n+4 and integer width K), ``nin-thin``, ``nin-wide``,
``resnet-18``, ``resnet-34``, RepDistiller's CIFAR models under its names (``resnet8`` …
``resnet110``, ``resnet8x4``, ``resnet32x4``, ``ResNet50``, ``vgg8`` … ``vgg19``:
:mod:`at_jax.models.cifar`; ``MobileNetV2``, ``ShuffleV1``, ``ShuffleV2``:
:mod:`at_jax.models.cifar_mobile`;
its ``wrn_40_2`` etc. name our ``wrn-40-2``), and, for fast tests, ``wrn-tiny`` (WRN-10-1)
and ``resnet-tiny`` (one block per group, widths 8-64, the ResNet layout otherwise) and
``nin-tiny`` (the NIN layout, widths 4-8).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
from flax import traverse_util

from at_jax.models.cifar import VGG, CifarResNet, cifar_models
from at_jax.models.nin import NIN, THIN_WIDTHS, WIDE_WIDTHS
from at_jax.models.resnet import STAGE_SIZES, ResNet, from_torchvision
from at_jax.models.vit import VIT_SIZES, VisionTransformer
from at_jax.models.wrn import WideResNet, blocks_per_group

_WRN_PATTERN = re.compile(r"^wrn-(\d+)-(\d+)$")
_VIT_PATTERN = re.compile(r"^vit-(tiny|small|base|large|huge)/(\d+)$")

_FIXED: dict[str, Callable[..., nn.Module]] = {
    "nin-thin": lambda **kw: NIN(widths=THIN_WIDTHS, **kw),
    "nin-wide": lambda **kw: NIN(widths=WIDE_WIDTHS, **kw),
    "resnet-18": lambda **kw: ResNet(stage_sizes=STAGE_SIZES[18], **kw),
    "resnet-34": lambda **kw: ResNet(stage_sizes=STAGE_SIZES[34], **kw),
    "wrn-tiny": lambda **kw: WideResNet(depth=10, width=1, **kw),
    "resnet-tiny": lambda **kw: ResNet(
        **{"stage_sizes": (1, 1, 1, 1), "widths": (8, 16, 32, 64), **kw}
    ),
    "nin-tiny": lambda **kw: NIN(**{"widths": (8, 8, 4, 8, 8, 8, 8, 8), **kw}),
    # RepDistiller's CIFAR models under its own names (at_jax.models.cifar)
    **cifar_models(),
}
# RepDistiller's names for the WRNs at_jax has as wrn-D-K
REFERENCE_ALIASES = {
    "wrn_16_1": "wrn-16-1",
    "wrn_16_2": "wrn-16-2",
    "wrn_40_1": "wrn-40-1",
    "wrn_40_2": "wrn-40-2",
}


def model_names() -> list[str]:
    """Known model names (``wrn-D-K`` stands for every valid depth and width)."""
    return ["wrn-D-K", "vit-SIZE/P", *sorted(_FIXED)]


def get_model(name: str, num_classes: int = 10, **overrides) -> nn.Module:
    """Build a model by name. ``overrides`` are module fields (e.g. ``batch_norm=False``,
    ``dtype``)."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    name = REFERENCE_ALIASES.get(name, name)
    match = _WRN_PATTERN.match(name)
    if match:
        depth, width = int(match.group(1)), int(match.group(2))
        blocks_per_group(depth)
        if width < 1:
            raise ValueError(f"WRN width must be a positive integer, got {width} in {name!r}")

        def builder(**kw: Any) -> nn.Module:
            return WideResNet(depth=depth, width=width, **kw)

    elif _VIT_PATTERN.match(name):
        vit = _VIT_PATTERN.match(name)
        assert vit is not None
        width, depth, heads = VIT_SIZES[vit.group(1)]
        patch = int(vit.group(2))

        def builder(**kw: Any) -> nn.Module:
            size = {"embed_dim": width, "depth": depth, "num_heads": heads, "patch_size": patch}
            return VisionTransformer(**{**size, **kw})

    elif name in _FIXED:
        builder = _FIXED[name]
    else:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(model_names())} "
            f"(e.g. wrn-16-1, wrn-40-2, vit-base/16; ViT sizes: {', '.join(VIT_SIZES)})"
        )
    try:
        return builder(num_classes=num_classes, **overrides)
    except TypeError as e:
        raise ValueError(f"bad override for model {name!r}: {e}") from None


def forward(model: nn.Module, variables, x, train: bool = False, rngs=None, **inputs):
    """Run ``model`` and collect its sown activations.

    Returns ``(logits, activations, new_batch_stats)``: activations map sown names to arrays
    (names sown inside submodules are joined with ``/``, e.g. ``backbone/group0``);
    ``new_batch_stats`` is the updated BN state when ``train`` (else ``None``). ``rngs`` (e.g.
    ``{"dropout": key}``) feed models with dropout in train mode; ``inputs``: further arguments
    of the model's ``__call__`` (a ViT's ``given`` attention and ``drop_masks``).
    """
    mutable = ["intermediates"]
    if train and "batch_stats" in variables:
        mutable.append("batch_stats")
    logits, state = model.apply(variables, x, train=train, mutable=mutable, rngs=rngs, **inputs)
    flat = traverse_util.flatten_dict(dict(state.get("intermediates", {})), sep="/")
    acts = {name: value[0] for name, value in flat.items()}
    return logits, acts, state.get("batch_stats")


__all__ = [
    "forward",
    "NIN",
    "ResNet",
    "WideResNet",
    "CifarResNet",
    "VGG",
    "VisionTransformer",
    "from_torchvision",
    "get_model",
    "model_names",
]
