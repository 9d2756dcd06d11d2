"""MAE/timm ViT ``state_dict`` → :class:`~at_jax.models.vit.VisionTransformer` variables, with the
position embedding resized to another patch grid (:func:`interpolate_pos_embed`).

Keys (MAE's and timm's ``VisionTransformer``): ``patch_embed.proj.{weight,bias}``, ``cls_token``,
``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.{weight,bias}``,
``norm`` (class-token models and MAE's pre-training encoder) or ``fc_norm`` (MAE fine-tuned with
``global_pool``), ``head``. MAE's decoder (``decoder_*``, ``mask_token``) is not part of the
encoder and is left out. A checkpoint without ``head`` (MAE pre-training) is an attention teacher:
its attention is all that transfer uses.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["from_timm", "interpolate_pos_embed", "bicubic_matrix", "describe_timm", "MAE_DECODER"]

MAE_DECODER = re.compile(r"^(decoder_|mask_token)")
_BLOCK = re.compile(
    r"^blocks\.(\d+)\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)$"
)
_BLOCK_NAMES = {
    "norm1": ("norm1",),
    "attn.qkv": ("attn", "qkv"),
    "attn.proj": ("attn", "proj"),
    "norm2": ("norm2",),
    "mlp.fc1": ("fc1",),
    "mlp.fc2": ("fc2",),
}
_NORMS = ("norm1", "norm2", "norm", "fc_norm")


def describe_timm(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """What the weights are: ``width``, ``depth``, ``patch_size``, ``channels``, ``grid`` (the
    position embedding's side), ``global_pool`` (fc_norm instead of norm), ``num_classes`` (None
    without a head)."""
    if "patch_embed.proj.weight" not in state_dict or "pos_embed" not in state_dict:
        raise ValueError(
            "not a MAE/timm ViT state_dict: it has no patch_embed.proj.weight or pos_embed (keys: "
            f"{sorted(state_dict)[:5]} ...)"
        )
    width, channels, patch, _ = np.shape(state_dict["patch_embed.proj.weight"])
    tokens = np.shape(state_dict["pos_embed"])[1] - 1
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"pos_embed has {tokens} patch positions: not a square grid")
    depth = len({int(m.group(1)) for k in state_dict if (m := _BLOCK.match(k))})
    head = state_dict.get("head.weight")
    return {
        "width": int(width),
        "depth": depth,
        "patch_size": int(patch),
        "channels": int(channels),
        "grid": grid,
        "global_pool": "fc_norm.weight" in state_dict,
        "num_classes": None if head is None else int(np.shape(head)[0]),
    }


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """The cubic convolution kernel of PyTorch's bicubic interpolation (a = −0.75)."""
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in): PyTorch's ``interpolate(mode="bicubic", align_corners=False)`` along
    one axis (source index ``(i + ½)·in/out − ½``, its four neighbours clamped to the edge)."""
    matrix = np.zeros((size_out, size_in), np.float64)
    for i in range(size_out):
        src = (i + 0.5) * size_in / size_out - 0.5
        base = math.floor(src)
        for j in range(base - 1, base + 3):
            matrix[i, min(max(j, 0), size_in - 1)] += _cubic(np.asarray(src - j))
    return matrix


def interpolate_pos_embed(pos_embed: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(1, 1 + g·g, D) → (1, 1 + h·w, D): the class token's entry kept, the patch positions
    resized bicubically as MAE's ``interpolate_pos_embed`` (PyTorch's bicubic, a = −0.75)."""
    pos_embed = np.asarray(pos_embed, np.float32)
    tokens, width = pos_embed.shape[1] - 1, pos_embed.shape[2]
    side = math.isqrt(tokens)
    if tuple(grid) == (side, side):
        return pos_embed
    patches = pos_embed[0, 1:].reshape(side, side, width).astype(np.float64)
    rows, cols = bicubic_matrix(side, grid[0]), bicubic_matrix(side, grid[1])
    resized = np.einsum("hi,ijc,wj->hwc", rows, patches, cols).astype(np.float32)
    return np.concatenate([pos_embed[:, :1], resized.reshape(1, -1, width)], axis=1)


def _put(tree: dict, path: tuple[str, ...], value: np.ndarray, key: str) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
    if path[-1] in node:
        raise ValueError(f"two keys map to {'/'.join(path)} (the second is {key})")
    node[path[-1]] = value


def from_timm(
    state_dict: Mapping[str, Any], grid: tuple[int, int] | None = None
) -> tuple[dict, dict[str, Any]]:
    """``({"params": ...}, describe_timm(state_dict))``: linear weights transposed, the patch
    convolution OIHW → HWIO, LayerNorm weight → scale; ``grid``: the patch grid to resize the
    position embedding to (None keeps the checkpoint's). MAE's decoder is left out; any other
    unknown key is an error naming it."""
    info = describe_timm(state_dict)
    params: dict = {}
    for key, value in state_dict.items():
        value = np.asarray(value, np.float32)
        block = _BLOCK.match(key)
        if MAE_DECODER.match(key):
            continue
        if block:
            module = (f"blocks_{block.group(1)}", *_BLOCK_NAMES[block.group(2)])
            field = block.group(3)
        elif key in ("cls_token", "pos_embed"):
            if key == "pos_embed" and grid is not None:
                value = interpolate_pos_embed(value, grid)
            _put(params, (key,), value, key)
            continue
        elif key.rsplit(".", 1)[0] in ("patch_embed.proj", "norm", "fc_norm", "head"):
            name, field = key.rsplit(".", 1)
            module = ("patch_embed",) if name == "patch_embed.proj" else (name,)
        else:
            raise ValueError(f"unexpected key {key!r} for a MAE/timm ViT")
        if field == "bias":
            leaf = "bias"
        elif module[-1] in _NORMS:
            leaf = "scale"
        else:
            leaf = "kernel"
            value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
        _put(params, (*module, leaf), value, key)
    return {"params": params}, info
