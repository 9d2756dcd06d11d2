"""The optimiser and its learning-rate schedule: :func:`build_optimizer`, :func:`lr_schedule`,
:func:`base_lr`, :func:`mask_frozen`. Each reads ``config.optimizer`` and the run's global batch
size only; a new recipe is one more entry in :data:`OPTIMIZERS` (and its schedule here)."""

from __future__ import annotations

from collections.abc import Callable, Set as AbstractSet
from typing import Any

import jax
import optax

__all__ = [
    "build_optimizer",
    "lr_schedule",
    "base_lr",
    "mask_frozen",
    "sgd",
    "OPTIMIZERS",
]

FROZEN, TRAINED = "frozen", "trained"


def base_lr(optimizer: Any, batch_size: int) -> float:
    """``optimizer.lr``, scaled by ``batch_size / optimizer.lr_batch_size`` when that is set
    (the ImageNet recipe's "0.1 per 256 images")."""
    reference = optimizer.get("lr_batch_size", 0)
    return optimizer.lr * batch_size / reference if reference else optimizer.lr


def lr_schedule(optimizer: Any, batch_size: int, steps_per_epoch: int) -> optax.Schedule:
    """The reference's step schedule: ``lr × lr_decay_factor`` at each epoch in
    ``optimizer.lr_decay_epochs``."""
    boundaries = {
        int(e) * steps_per_epoch: optimizer.lr_decay_factor for e in optimizer.lr_decay_epochs
    }
    return optax.piecewise_constant_schedule(base_lr(optimizer, batch_size), boundaries)


def sgd(optimizer: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    """SGD as PyTorch's: weight decay added to the gradient, then (non-Nesterov unless
    ``optimizer.nesterov``) momentum."""
    decay = optimizer.weight_decay
    return optax.chain(
        optax.add_decayed_weights(decay) if decay else optax.identity(),
        optax.sgd(schedule, momentum=optimizer.momentum or None, nesterov=optimizer.nesterov),
    )


# config.optimizer.name -> (optimizer config, schedule) -> transformation
OPTIMIZERS: dict[str, Callable[[Any, optax.Schedule], optax.GradientTransformation]] = {
    "sgd": sgd,
}


def mask_frozen(
    tx: optax.GradientTransformation, frozen: AbstractSet
) -> optax.GradientTransformation:
    """``tx`` for the trained parameters, nothing for the ``frozen`` student paths (no gradient
    step, no weight decay, no momentum: ``optax.set_to_zero`` through
    ``optax.multi_transform``). The train state's params are ``{"student": ..., "terms": ...}``;
    the terms' parameters are trained."""
    if not frozen:
        return tx

    def labels(params):
        def label(path, _):
            keys = tuple(str(k.key) for k in path)
            return FROZEN if keys[0] == "student" and keys[1:] in frozen else TRAINED

        return jax.tree_util.tree_map_with_path(label, params)

    return optax.multi_transform({TRAINED: tx, FROZEN: optax.set_to_zero()}, labels)


def build_optimizer(
    optimizer: Any, batch_size: int, steps_per_epoch: int, frozen: AbstractSet = frozenset()
) -> optax.GradientTransformation:
    """The run's optimiser (``optimizer``: ``config.optimizer``) with its schedule, the
    ``frozen`` student paths left untouched."""
    schedule = lr_schedule(optimizer, batch_size, steps_per_epoch)
    return mask_frozen(OPTIMIZERS[optimizer.name](optimizer, schedule), set(frozen))
