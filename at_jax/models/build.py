"""A run's model from its config: :func:`build_model` (``config.model``, ``model_overrides``,
``freeze.batch_norm``, ``dtype``) and the compute dtypes (:data:`DTYPES`)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from at_jax.models import get_model

__all__ = ["build_model", "compute_dtype", "DTYPES"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(config: Any) -> Any:
    """``config.dtype`` as a JAX dtype (checked by :func:`at_jax.recipes.validate_config`)."""
    return DTYPES[config.dtype]


def build_model(config: Any, num_classes: int) -> nn.Module:
    """The model of a run's config for ``num_classes``: ``config.model`` with
    ``config.model_overrides``, batch norm frozen with ``config.freeze.batch_norm``, computing in
    ``config.dtype``."""
    overrides = dict(config.get("model_overrides", {}))
    if config.get("freeze", {}).get("batch_norm", False):
        overrides["frozen_batch_norm"] = True
    return get_model(
        config.model, num_classes=num_classes, dtype=compute_dtype(config), **overrides
    )
