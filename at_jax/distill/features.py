"""Feature-map baselines: FitNet's hint, NST, VID. Maps are (B, H, W, C) (``channel_axis=1``:
(B, C, H, W)); the teacher's side is under ``stop_gradient``. The trainable parts (FitNet's
regressor, VID's regressor and variances) are Flax modules that the terms own."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from at_jax.attention import channels_last, pool_to_smaller
from at_jax.distill.relational import normalize_rows
from at_jax.precision import upcast

__all__ = [
    "hint_loss",
    "ConvRegressor",
    "nst_loss",
    "VIDRegressor",
    "vid_loss",
    "vid_initial_log_scale",
]


def hint_loss(f_s: jax.Array, f_t: jax.Array) -> jax.Array:
    """FitNet's hint (Romero et al., ICLR 2015): the mean squared error between the student's
    regressed hint and the teacher's (``nn.MSELoss``); any layout, the same shapes."""
    if f_s.shape != f_t.shape:
        raise ValueError(
            f"hint_loss: the regressed student features {f_s.shape} and the teacher's "
            f"{f_t.shape} differ (regress the student's with ConvRegressor)"
        )
    return jnp.mean((upcast(f_s) - jax.lax.stop_gradient(upcast(f_t))) ** 2)


class BatchStatsNorm(nn.Module):
    """Batch normalisation with the batch's own statistics (biased variance), a learned scale
    and shift, and no running averages: PyTorch's ``BatchNorm2d`` in train mode, which is how
    a distillation regressor is only ever used (it plays no part at evaluation)."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        mean = jnp.mean(x, axis=(0, 1, 2))
        var = jnp.mean((x - mean) ** 2, axis=(0, 1, 2))
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class ConvRegressor(nn.Module):
    """FitNet's regressor from the student's hint layer to the teacher's (RepDistiller's
    ``ConvReg``), NHWC: a 3×3 stride-2 conv when the student's map is twice the teacher's, a 4×4
    stride-2 transposed conv when it is half, else a valid conv of kernel ``1 + s − t``; then
    batch norm (train mode) and ReLU (``relu``)."""

    channels: int  # the teacher's
    student_size: tuple[int, int]
    teacher_size: tuple[int, int]
    relu: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        (sh, sw), (th, tw) = self.student_size, self.teacher_size
        if sh == 2 * th:
            x = nn.Conv(self.channels, (3, 3), (2, 2), padding=((1, 1), (1, 1)), name="conv")(x)
        elif 2 * sh == th:
            # PyTorch's ConvTranspose2d(k=4, s=2, p=1): pad the dilated input by k − 1 − p = 2
            x = nn.ConvTranspose(
                self.channels,
                (4, 4),
                (2, 2),
                padding=((2, 2), (2, 2)),
                transpose_kernel=True,
                name="conv",
            )(x)
        elif sh >= th and sw >= tw:
            x = nn.Conv(self.channels, (1 + sh - th, 1 + sw - tw), padding="VALID", name="conv")(x)
        else:
            raise ValueError(
                f"FitNet's regressor cannot map a student map of {sh}×{sw} to the teacher's "
                f"{th}×{tw} (twice, half, or larger are supported): choose another hint layer"
            )
        x = BatchStatsNorm(name="bn")(x)
        return nn.relu(x) if self.relu else x


def _poly_kernel(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum("nil,njl->nij", b, a) ** 2


def nst_loss(f_s: jax.Array, f_t: jax.Array, channel_axis: int = -1) -> jax.Array:
    """Neuron selectivity transfer (Huang & Wang, 2017): each channel's spatial map
    l2-normalised, then the MMD with the polynomial kernel ``k(a, b) = (aᵀb)²`` between the two
    sets of channels: ``mean k(t, t) + mean k(s, s) − 2 mean k(s, t)`` (the reference's
    ``full_loss``). Maps of different sizes are pooled to the smaller."""
    f_s, f_t = pool_to_smaller(
        upcast(channels_last(f_s, channel_axis)), upcast(channels_last(f_t, channel_axis))
    )

    def unit(f):  # (B, C, HW), each channel's map of unit norm
        return normalize_rows(jnp.swapaxes(f.reshape(f.shape[0], -1, f.shape[-1]), 1, 2))

    s, t = unit(f_s), jax.lax.stop_gradient(unit(f_t))
    return (
        jnp.mean(_poly_kernel(t, t))
        + jnp.mean(_poly_kernel(s, s))
        - 2 * jnp.mean(_poly_kernel(s, t))
    )


def vid_initial_log_scale(init_pred_var: float = 5.0, eps: float = 1e-5) -> float:
    """The reference's initial ``log_scale``: the softplus inverse of ``init_pred_var − eps``."""
    return math.log(math.exp(init_pred_var - eps) - 1.0)


class VIDRegressor(nn.Module):
    """VID's mean regressor (three 1×1 convs without bias, ReLU between, student channels →
    ``mid`` → ``mid`` → the teacher's) and its per-channel ``log_scale``; returns the predicted
    mean and variance ``softplus(log_scale) + eps``."""

    channels: int
    mid: int
    init_pred_var: float = 5.0
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        for i, c in enumerate((self.mid, self.mid, self.channels)):
            x = nn.Conv(c, (1, 1), use_bias=False, name=f"conv{i}")(x)
            x = nn.relu(x) if i < 2 else x
        start = vid_initial_log_scale(self.init_pred_var, self.eps)
        log_scale = self.param("log_scale", nn.initializers.constant(start), (self.channels,))
        return x, jax.nn.softplus(log_scale) + self.eps


def vid_loss(mean: jax.Array, variance: jax.Array, f_t: jax.Array) -> jax.Array:
    """Variational information distillation (Ahn et al., CVPR 2019): the Gaussian negative
    log-likelihood of the teacher's map under the student's predicted ``mean`` (NHWC) and
    per-channel ``variance``, ``mean(0.5 · ((μ − t)² / σ² + log σ²))`` (constant dropped)."""
    t = jax.lax.stop_gradient(upcast(f_t))
    return jnp.mean(0.5 * ((upcast(mean) - t) ** 2 / variance + jnp.log(variance)))
