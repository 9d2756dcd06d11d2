"""Dtype helpers for mixed precision."""

import jax
import jax.numpy as jnp

__all__ = ["upcast"]


def upcast(x: jax.Array) -> jax.Array:
    """At least float32: bfloat16 logits and activations are compared in float32, float64 stays."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))
