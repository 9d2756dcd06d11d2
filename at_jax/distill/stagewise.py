"""The baselines that RepDistiller trains in two stages: AB, FSP, FT. Their first stage
(``init_epochs``) trains connectors, the student's feature layers or FT's paraphraser with the
losses here; then the student trains with its classification loss (AB, FSP) or with the factor
loss (FT). Maps are (B, H, W, C); the teacher's side is under ``stop_gradient``.

* AB (Heo et al., AAAI 2019): :func:`ab_loss` on pre-activations (the batch norm before each
  group's ReLU), the student's through a :class:`Connector`;
* FSP (Yim et al., CVPR 2017): :func:`fsp_matrices` between consecutive feature points,
  :func:`fsp_loss`;
* FT (Kim et al., NeurIPS 2018): :class:`Paraphraser` (an autoencoder of the teacher's last
  group, pre-trained with :func:`reconstruction_loss`), :class:`Translator` (the student's),
  :func:`factor_loss` between their factors.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from at_jax.attention import pool_to_smaller
from at_jax.distill.features import BatchStatsNorm, ConvRegressor
from at_jax.distill.relational import normalize_rows
from at_jax.precision import upcast

__all__ = [
    "ab_loss",
    "ab_layer_weights",
    "Connector",
    "fsp_matrices",
    "fsp_loss",
    "factor",
    "factor_loss",
    "reconstruction_loss",
    "Paraphraser",
    "Translator",
]


def ab_layer_weights(n: int) -> list[float]:
    """AB's weight of each of ``n`` layers, deepest last: ``2 ** (i − n + 1)`` (…, ¼, ½, 1)."""
    return [2.0 ** (i - n + 1) for i in range(n)]


def ab_loss(
    sources: Sequence[jax.Array], targets: Sequence[jax.Array], margin: float = 1.0
) -> jax.Array:
    """Activation-boundary loss, RepDistiller's ``ABLoss`` (its ``criterion_alternative_l2``):
    for each layer i, the student's connected pre-activation ``s`` against the teacher's ``t``,

        Σ (s + m)² · [s > −m ∧ t ≤ 0] + (s − m)² · [s ≤ m ∧ t > 0]

    summed over the map, divided by the batch size, times ``ab_layer_weights`` and by 3/1000
    (the reference's constants), summed over the layers. ``margin`` m: 1.0 as the reference."""
    if len(sources) != len(targets) or not sources:
        raise ValueError(
            f"ab_loss: {len(sources)} student and {len(targets)} teacher pre-activations; "
            "give one of each per layer"
        )
    total = jnp.zeros((), jnp.float32)
    for w, s, t in zip(ab_layer_weights(len(sources)), sources, targets, strict=True):
        s, t = upcast(s), jax.lax.stop_gradient(upcast(t))
        if s.shape != t.shape:
            raise ValueError(
                f"ab_loss: a connected student map {s.shape} and the teacher's {t.shape} "
                "differ (connect the student's with Connector)"
            )
        below = (s + margin) ** 2 * ((s > -margin) & (t <= 0))
        above = (s - margin) ** 2 * ((s <= margin) & (t > 0))
        total = total + w * jnp.sum(below + above) / s.shape[0] / 1000.0 * 3.0
    return total


class Connector(nn.Module):
    """AB's connector of one layer (RepDistiller's ``Connector``): the identity when the student's
    map has the teacher's channels and size, else :class:`~at_jax.distill.features.ConvRegressor`
    without its ReLU (conv, then batch norm)."""

    channels: int  # the teacher's
    student_size: tuple[int, int]
    teacher_size: tuple[int, int]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] == self.channels and self.student_size[0] == self.teacher_size[0]:
            return x
        return ConvRegressor(
            self.channels, self.student_size, self.teacher_size, relu=False, name="regressor"
        )(x)


def fsp_matrices(maps: Sequence[jax.Array]) -> list[jax.Array]:
    """The flow of solution procedure between consecutive maps (RepDistiller's
    ``FSP.compute_fsp``): for maps ``a`` (B, H, W, m) and ``b`` (B, H', W', n), the larger
    average-pooled to the smaller's size, ``G[b, j, i] = mean_hw a[..., i] · b[..., j]``
    (B, n, m), the later map's channels first as the reference."""
    out = []
    for bottom, top in itertools.pairwise(maps):
        bottom, top = pool_to_smaller(upcast(bottom), upcast(top))
        hw = bottom.shape[1] * bottom.shape[2]
        out.append(jnp.einsum("bhwi,bhwj->bji", bottom, top) / hw)
    return out


def fsp_loss(student_maps: Sequence[jax.Array], teacher_maps: Sequence[jax.Array]) -> jax.Array:
    """FSP: the mean squared difference of the student's and the teacher's FSP matrices, summed
    over the consecutive pairs of feature points (RepDistiller sums ``FSP``'s list). The two
    networks need the same channel counts at every point (the reference refuses otherwise)."""
    s_ch = [m.shape[-1] for m in student_maps]
    t_ch = [m.shape[-1] for m in teacher_maps]
    if s_ch != t_ch or len(s_ch) < 2:
        raise ValueError(
            f"fsp_loss: the student's channels {s_ch} and the teacher's {t_ch} must be equal at "
            "two or more feature points (FSP pairs networks of the same widths)"
        )
    teacher = [jax.lax.stop_gradient(m) for m in teacher_maps]
    return sum(
        (
            jnp.mean((s - t) ** 2)
            for s, t in zip(fsp_matrices(student_maps), fsp_matrices(teacher), strict=True)
        ),
        jnp.zeros((), jnp.float32),
    )


def factor(f: jax.Array, p1: float = 2.0) -> jax.Array:
    """FT's factor of a map (B, H, W, C): ``normalize(mean_c f^p1)`` flattened to (B, H·W)
    (RepDistiller's ``FactorTransfer.factor``)."""
    f = upcast(f)
    return normalize_rows(jnp.mean(f**p1, axis=-1).reshape(f.shape[0], -1))


def factor_loss(f_s: jax.Array, f_t: jax.Array, p1: float = 2.0, p2: float = 1.0) -> jax.Array:
    """FT's loss between the translator's factor map ``f_s`` and the paraphraser's ``f_t`` (the
    larger pooled to the smaller): ``mean |factor(s) − factor(t)|`` for ``p2 = 1`` (the
    reference), else ``mean (factor(s) − factor(t))^p2``."""
    f_s, f_t = pool_to_smaller(f_s, jax.lax.stop_gradient(f_t))
    d = factor(f_s, p1) - factor(f_t, p1)
    return jnp.mean(jnp.abs(d)) if p2 == 1 else jnp.mean(d**p2)


def reconstruction_loss(reconstruction: jax.Array, f_t: jax.Array) -> jax.Array:
    """The paraphraser's pre-training loss: the mean squared error of its reconstruction of the
    teacher's map (``nn.MSELoss``)."""
    return jnp.mean((upcast(reconstruction) - jax.lax.stop_gradient(upcast(f_t))) ** 2)


def _conv(features: int, name: str) -> nn.Conv:
    return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), name=name)


def _leaky(x: jax.Array) -> jax.Array:
    return nn.leaky_relu(x, 0.1)


class Paraphraser(nn.Module):
    """FT's paraphraser of the teacher's map (C channels; RepDistiller's ``Paraphraser``, k = ½,
    no batch norm): encoder conv3×3 C→C, C→⌊kC⌋, ⌊kC⌋→⌊kC⌋ (each LeakyReLU 0.1); decoder three
    3×3 stride-1 transposed convs back to C (LeakyReLU 0.1). ``__call__(f, factor_only)``:
    ``(factor, reconstruction)``, or the factor alone."""

    channels: int
    rate: float = 0.5

    @nn.compact
    def __call__(self, f: jax.Array, factor_only: bool = False):
        out = int(self.channels * self.rate)
        x = f
        for i, width in enumerate((self.channels, out, out)):
            x = _leaky(_conv(width, f"encoder{i}")(x))
        if factor_only:
            return x
        y = x
        for i, width in enumerate((out, self.channels, self.channels)):
            y = nn.ConvTranspose(
                width, (3, 3), padding=((1, 1), (1, 1)), transpose_kernel=True, name=f"decoder{i}"
            )(y)
            y = _leaky(y)
        return x, y


class Translator(nn.Module):
    """FT's translator of the student's map (RepDistiller's ``Translator``, k = ½, batch norm):
    conv3×3 to the student's own channels, then to ⌊k·teacher channels⌋ twice, each followed by
    batch norm (train mode) and LeakyReLU 0.1."""

    teacher_channels: int
    rate: float = 0.5

    @nn.compact
    def __call__(self, f: jax.Array) -> jax.Array:
        out = int(self.teacher_channels * self.rate)
        x = f
        for i, width in enumerate((f.shape[-1], out, out)):
            x = _leaky(BatchStatsNorm(name=f"bn{i}")(_conv(width, f"conv{i}")(x)))
        return x
