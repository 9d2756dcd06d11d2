"""Logit baselines: decoupled KD."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

from at_jax.precision import upcast

__all__ = ["dkd_loss", "dkd_warmup"]


def _kl_sum(log_q: jax.Array, p: jax.Array) -> jax.Array:
    """PyTorch's ``F.kl_div(log_q, p, reduction="sum")`` (``0 · log 0 = 0``)."""
    return jnp.sum(xlogy(p, p) - p * log_q)


def dkd_loss(
    logits_s: jax.Array,
    logits_t: jax.Array,
    labels: jax.Array,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> jax.Array:
    """Decoupled KD (Zhao et al., CVPR 2022), as mdistiller's ``dkd_loss``: ``α·TCKD + β·NCKD``.
    TCKD: the KL of the binary (target, all others) probabilities at ``temperature`` T; NCKD:
    the KL among the non-target classes (the target's logit lowered by 1000, as the reference);
    each summed, ×T², divided by the batch size. The defaults are mdistiller's CIFAR-100 ones."""
    s = upcast(logits_s) / temperature
    t = jax.lax.stop_gradient(upcast(logits_t)) / temperature
    gt = jax.nn.one_hot(labels, s.shape[-1], dtype=s.dtype)

    def binary(p):
        target = jnp.sum(p * gt, axis=1, keepdims=True)
        return jnp.concatenate([target, jnp.sum(p * (1 - gt), axis=1, keepdims=True)], axis=1)

    p_s, p_t = binary(jax.nn.softmax(s, axis=1)), binary(jax.nn.softmax(t, axis=1))
    scale = temperature**2 / s.shape[0]
    tckd = _kl_sum(jnp.log(p_s), p_t) * scale
    nckd = (
        _kl_sum(
            jax.nn.log_softmax(s - 1000.0 * gt, axis=1), jax.nn.softmax(t - 1000.0 * gt, axis=1)
        )
        * scale
    )
    return alpha * tckd + beta * nckd


def dkd_warmup(epoch: jax.Array | int, warmup: int = 20) -> jax.Array:
    """mdistiller's warm-up factor of the DKD loss, ``min(epoch / warmup, 1)`` (epoch from 1)."""
    return jnp.minimum(jnp.asarray(epoch, jnp.float32) / warmup, 1.0)
