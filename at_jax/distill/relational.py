"""Relational baselines: what a batch's examples are to each other, in the student and in the
teacher. Features are (B, ...) arrays, flattened per example; the teacher's side is under
``stop_gradient``."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from at_jax.attention import safe_norm
from at_jax.precision import upcast

__all__ = ["sp_loss", "cc_loss", "rkd_loss", "pkt_loss", "normalize_rows", "smooth_l1"]


def _flat(f: jax.Array) -> jax.Array:
    return upcast(f).reshape(f.shape[0], -1)


def normalize_rows(x: jax.Array, eps: float = 1e-12, axis: int = -1) -> jax.Array:
    """``x / max(‖x‖₂, eps)`` along ``axis``: PyTorch's ``F.normalize``, its gradient at 0 too."""
    return x / jnp.maximum(safe_norm(x, 2, axis=axis, keepdims=True), eps)


def smooth_l1(x: jax.Array, y: jax.Array) -> jax.Array:
    """PyTorch's ``F.smooth_l1_loss(x, y)`` (beta 1, mean)."""
    d = jnp.abs(x - y)
    return jnp.mean(jnp.where(d < 1.0, 0.5 * d * d, d - 0.5))


def sp_loss(f_s: jax.Array, f_t: jax.Array) -> jax.Array:
    """Similarity-preserving KD (Tung & Mori, ICCV 2019): the batch's (B, B) similarity matrices
    ``G = f fᵀ`` (features flattened per example), rows l2-normalised; ``‖G_t − G_s‖²_F / B²``.
    Channel order does not matter: NHWC and NCHW maps give the same loss."""
    b = f_s.shape[0]
    s, t = _flat(f_s), jax.lax.stop_gradient(_flat(f_t))
    g_s, g_t = normalize_rows(s @ s.T), normalize_rows(t @ t.T)
    return jnp.sum((g_t - g_s) ** 2) / (b * b)


def cc_loss(
    e_s: jax.Array, e_t: jax.Array, form: str = "reference", gamma: float = 0.4, order: int = 2
) -> jax.Array:
    """Correlation congruence (Peng et al., ICCV 2019) of (B, D) embeddings.

    ``form="reference"`` (default, RepDistiller's code, which its authors shared): with
    ``δ = |e_s − e_t|``, the mean over i of ``Σ_d δ_i,d · δ_{i+1},d`` (consecutive examples).
    ``form="paper"``: the paper's Gaussian-RBF correlation ``C_ij ≈ Σ_{p=0..order}
    exp(−2γ) (2γ)^p / p! (e_i·e_j)^p`` (its Taylor expansion, l2-normalised embeddings) of each
    side, and ``‖C_t − C_s‖²_F / B²``. The teacher's embedding is not under ``stop_gradient``:
    the reference trains it (only the teacher's features are fixed)."""
    e_s, e_t = upcast(e_s), upcast(e_t)
    if form == "reference":
        delta = jnp.abs(e_s - e_t)
        return jnp.mean(jnp.sum(delta[:-1] * delta[1:], axis=1))
    if form != "paper":
        raise ValueError(f"cc_loss form must be 'reference' or 'paper', got {form!r}")

    def correlation(e):
        e = normalize_rows(e)
        dots = e @ e.T
        return sum(
            math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * dots**p
            for p in range(order + 1)
        )

    b = e_s.shape[0]
    return jnp.sum((correlation(e_t) - correlation(e_s)) ** 2) / (b * b)


def _pdist(e: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Pairwise Euclidean distances as the reference's ``RKDLoss.pdist``: clamped at ``eps``
    before the root, 0 on the diagonal (its gradient there too)."""
    square = jnp.sum(e * e, axis=1)
    d = jnp.sqrt(jnp.maximum(square[:, None] + square[None, :] - 2 * e @ e.T, eps))
    return jnp.where(jnp.eye(e.shape[0], dtype=bool), 0.0, d)


def _mean_positive(d: jax.Array) -> jax.Array:
    positive = d > 0
    return jnp.sum(jnp.where(positive, d, 0.0)) / jnp.sum(positive)


def _angles(e: jax.Array) -> jax.Array:
    diff = normalize_rows(e[None, :, :] - e[:, None, :])  # (B, B, D): e_j − e_i, unit
    return jnp.einsum("ijd,ikd->ijk", diff, diff).reshape(-1)


def rkd_loss(
    f_s: jax.Array, f_t: jax.Array, distance_weight: float = 25.0, angle_weight: float = 50.0
) -> jax.Array:
    """Relational KD (Park et al., CVPR 2019): ``w_d · smooth_l1(ψ_D)`` on pairwise distances
    (each side divided by its mean positive distance) ``+ w_a · smooth_l1(ψ_A)`` on the cosines
    of the angles of every triplet; the reference's weights 25 and 50."""
    s, t = _flat(f_s), jax.lax.stop_gradient(_flat(f_t))
    d_s, d_t = _pdist(s), _pdist(t)
    loss_d = smooth_l1(d_s / _mean_positive(d_s), d_t / _mean_positive(d_t))
    loss_a = smooth_l1(_angles(s), _angles(t))
    return distance_weight * loss_d + angle_weight * loss_a


def pkt_loss(f_s: jax.Array, f_t: jax.Array, eps: float = 1e-7) -> jax.Array:
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018), as the authors' code: the
    cosine similarities of the batch's examples mapped to [0, 1], each row made a distribution,
    and ``mean(p_t · log((p_t + eps) / (p_s + eps)))`` over all B² entries."""

    def probabilities(f):
        f = f / (safe_norm(f, 2, axis=1, keepdims=True) + eps)
        f = jnp.where(jnp.isnan(f), 0.0, f)
        similarity = (f @ f.T + 1.0) / 2.0
        return similarity / jnp.sum(similarity, axis=1, keepdims=True)

    p_s, p_t = probabilities(_flat(f_s)), jax.lax.stop_gradient(probabilities(_flat(f_t)))
    return jnp.mean(p_t * jnp.log((p_t + eps) / (p_s + eps)))
