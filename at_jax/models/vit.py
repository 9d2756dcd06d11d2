"""Vision Transformers that expose their attention (the MAE/timm layout; Li et al., NeurIPS 2024,
*On the Surprising Effectiveness of Attention Transfer for Vision Transformers*).

Pre-norm blocks as MAE's and timm's ``VisionTransformer``: a patch embedding (a p×p convolution
of stride p), a class token and a learned position embedding, then ``depth`` blocks of
LayerNorm → multi-head self-attention (qkv with bias) → residual, LayerNorm → MLP (GELU, hidden
``mlp_ratio`` × width) → residual, each residual branch with drop path (stochastic depth, the
rate rising linearly from 0 to ``drop_path_rate`` over the blocks); the classifier reads the
class token after a LayerNorm (``norm``) or, with ``global_pool``, the mean of the patch tokens
after its own LayerNorm (``fc_norm``), as MAE's fine-tuning. LayerNorm epsilon 1e-6.

Every block ``i`` sows, under ``block{i}.*``: ``attention_logits`` (B, heads, N, N; q·kᵀ/√d,
before the softmax, as the port returns them), ``q``, ``k``, ``v`` (B, heads, N, d),
``tokens`` (B, N, C: the block's output, class token first) and, as ``block{i}``, its patch
tokens as a (B, h, w, C) grid — a transfer point like a CNN group's, so that the 2017 spatial
maps and :func:`at_jax.losses.at_losses` work on ViTs and between a CNN and a ViT.

Attention from outside (attention copy): ``model.apply(variables, x, given=[...],
given_kind="attention")`` runs block ``i`` with ``given[i]`` (for the first ``len(given)``
blocks; None entries run the block's own) instead of its own attention probabilities
(``"attention"``, B × heads × N × N), queries, keys or values (``"q"``, ``"k"``, ``"v"``, as the
port's ``copy_q/k/v``). ``drop_masks`` (depth, 2, B) gives the drop-path masks from outside, so
that a teacher can run with its student's (the port does so).

Initialisation as timm's: dense kernels, class token and position embedding N(0, 0.02) (timm's
``trunc_normal_(std=.02)`` truncates at ±2, a hundred standard deviations out: a normal), zero
biases, LayerNorm scale 1 and offset 0, the patch embedding as PyTorch's ``Conv2d`` default
(uniform ±1/√fan_in for kernel and bias).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from at_jax.precision import upcast

__all__ = [
    "VisionTransformer",
    "ViTBlock",
    "SelfAttention",
    "VIT_SIZES",
    "GIVEN_KINDS",
    "drop_path_masks",
    "drop_path_rates",
    "shared_drop_masks",
]

# name -> (width, depth, heads), as timm's and MAE's
VIT_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
GIVEN_KINDS = ("attention", "q", "k", "v")
LN_EPSILON = 1e-6
_normal02 = nn.initializers.normal(0.02)


def _torch_conv_bias(fan_in: int):
    def init(key, shape, dtype=jnp.float32):
        bound = 1.0 / fan_in**0.5
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _dense(features: int, name: str, dtype: Any) -> nn.Dense:
    return nn.Dense(features, name=name, dtype=dtype, kernel_init=_normal02)


def _layer_norm(name: str, dtype: Any) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LN_EPSILON, name=name, dtype=dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention; returns ``(output, {"attention_logits", "q", "k", "v"})``."""

    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, given: Optional[jax.Array] = None, given_kind: str = "attention"
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        b, n, c = x.shape
        heads = self.num_heads
        qkv = _dense(3 * c, "qkv", self.dtype)(x).reshape(b, n, 3, heads, c // heads)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
        if given is not None and given_kind in ("q", "k", "v"):
            q, k, v = (
                given if given_kind == n else t for n, t in zip("qkv", (q, k, v), strict=True)
            )
        scale = (c // heads) ** -0.5
        logits = jnp.einsum("bhqd,bhkd->bhqk", upcast(q), upcast(k)) * scale
        attn = jax.nn.softmax(logits, axis=-1)
        if given is not None and given_kind == "attention":
            attn = upcast(given)
        out = jnp.einsum("bhqk,bhkd->bhqd", attn, upcast(v)).astype(self.dtype)
        out = out.transpose(0, 2, 1, 3).reshape(b, n, c)
        acts = {"attention_logits": logits, "q": q, "k": k, "v": v}
        return _dense(c, "proj", self.dtype)(out), acts


def drop_path_masks(key: jax.Array, rate: float, batch: int) -> jax.Array:
    """(2, B) per-example masks of one block's two residual branches: 0 (dropped) or
    1 / keep_prob, as timm's drop path."""
    keep = 1.0 - rate
    return jnp.floor(keep + jax.random.uniform(key, (2, batch))) / keep


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Block i's drop-path rate: rising linearly from 0 to ``rate`` over ``depth`` blocks (timm's
    and the port's ``linspace(0, rate, depth)``)."""
    return [rate * i / max(1, depth - 1) for i in range(depth)]


def shared_drop_masks(
    student: nn.Module, teacher: Optional[nn.Module], key: jax.Array, batch: int
) -> Optional[jax.Array]:
    """(depth, 2, B) drop-path masks for a ViT student and a ViT teacher of the same depth to
    share in training, as the port's ``DualVisionTransformer`` draws them (the student's rates);
    None when the pair has no drop path or is not two ViTs of one depth (each network then runs
    as alone: the student with its own masks, the teacher without drop path)."""
    if not (isinstance(student, VisionTransformer) and isinstance(teacher, VisionTransformer)):
        return None
    if student.drop_path_rate <= 0 or student.depth != teacher.depth:
        return None
    rates = drop_path_rates(student.drop_path_rate, student.depth)
    keys = jax.random.split(key, student.depth)
    return jnp.stack([drop_path_masks(k, r, batch) for k, r in zip(keys, rates, strict=True)])


class ViTBlock(nn.Module):
    """A pre-norm transformer block; returns ``(tokens, attention's acts)``."""

    num_heads: int
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        train: bool = False,
        given: Optional[jax.Array] = None,
        given_kind: str = "attention",
        drop_masks: Optional[jax.Array] = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        c = x.shape[-1]
        if drop_masks is None and train and self.drop_path > 0:
            drop_masks = drop_path_masks(self.make_rng("dropout"), self.drop_path, x.shape[0])
        masks: tuple[Any, ...] = (1.0, 1.0)
        if drop_masks is not None:
            masks = tuple(drop_masks[j][:, None, None].astype(x.dtype) for j in range(2))
        y, acts = SelfAttention(self.num_heads, self.dtype, name="attn")(
            _layer_norm("norm1", self.dtype)(x), given, given_kind
        )
        x = x + masks[0] * y
        h = _layer_norm("norm2", self.dtype)(x)
        h = _dense(int(c * self.mlp_ratio), "fc1", self.dtype)(h)
        h = _dense(c, "fc2", self.dtype)(nn.gelu(h, approximate=False))
        return x + masks[1] * h, acts


class VisionTransformer(nn.Module):
    """A ViT for (B, H, W, C) images whose sides are multiples of ``patch_size``."""

    num_classes: int = 1000
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    global_pool: bool = False
    dtype: Any = jnp.float32

    def check(self, image_shape: Sequence[int]) -> tuple[int, int]:
        """The patch grid (h, w) of images of ``image_shape`` (H, W, C); raises when it has none."""
        height, width = int(image_shape[0]), int(image_shape[1])
        p = self.patch_size
        if p < 1 or height % p or width % p:
            raise ValueError(
                f"a ViT with patch size {p} needs image sides that are multiples of {p}; got "
                f"{height}×{width} (for 28×28 Fashion-MNIST use /4, /7, /14 or /28)"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"the ViT's width {self.embed_dim} does not split into {self.num_heads} heads"
            )
        return height // p, width // p

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        train: bool = False,
        given: Optional[Sequence[Optional[jax.Array]]] = None,
        given_kind: str = "attention",
        drop_masks: Optional[jax.Array] = None,
    ) -> jax.Array:
        if given_kind not in GIVEN_KINDS:
            raise ValueError(f"given_kind must be one of {GIVEN_KINDS}, got {given_kind!r}")
        b = x.shape[0]
        h, w = self.check(x.shape[1:])
        d, p = self.embed_dim, self.patch_size
        fan_in = p * p * x.shape[-1]
        patches = nn.Conv(
            d,
            (p, p),
            strides=(p, p),
            padding="VALID",
            name="patch_embed",
            dtype=self.dtype,
            kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
            bias_init=_torch_conv_bias(fan_in),
        )(x.astype(self.dtype))
        cls = self.param("cls_token", _normal02, (1, 1, d))
        pos = self.param("pos_embed", _normal02, (1, 1 + h * w, d))
        tokens = jnp.concatenate(
            [jnp.broadcast_to(cls, (b, 1, d)).astype(self.dtype), patches.reshape(b, h * w, d)],
            axis=1,
        )
        x = tokens + pos.astype(self.dtype)
        given = list(given or [])
        for i, rate in enumerate(drop_path_rates(self.drop_path_rate, self.depth)):
            block = ViTBlock(self.num_heads, self.mlp_ratio, rate, self.dtype, name=f"blocks_{i}")
            own = given[i] if i < len(given) else None
            x, acts = block(
                x, train, own, given_kind, None if drop_masks is None else drop_masks[i]
            )
            for name, value in acts.items():
                self.sow("intermediates", f"block{i}.{name}", value)
            self.sow("intermediates", f"block{i}.tokens", x)
            self.sow("intermediates", f"block{i}", x[:, 1:].reshape(b, h, w, d))
        if self.global_pool:
            x = _layer_norm("fc_norm", self.dtype)(jnp.mean(x[:, 1:], axis=1))
        else:
            x = _layer_norm("norm", self.dtype)(x)[:, 0]
        self.sow("intermediates", "features", x)  # what the head reads
        return upcast(_dense(self.num_classes, "head", self.dtype)(x))
