"""The model-side preprocessing every at_jax model's input goes through: :func:`normalize`
(uint8 images to float, scaled to [0, 1], normalised per channel). The training step, the
evaluator, a loaded teacher and the analysis tools all call it, so it lives below all of them."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["normalize"]


def normalize(images_u8: jax.Array, mean, std, dtype=jnp.float32) -> jax.Array:
    """``(images / 255 - mean) / std`` in ``dtype``; ``mean`` and ``std`` per channel (images
    scaled to [0, 1]), ``images_u8`` (..., C)."""
    x = images_u8.astype(jnp.float32) / 255.0
    return ((x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)).astype(dtype)
