"""The optimiser and its learning-rate schedule: :func:`build_optimizer`, :func:`lr_schedule`,
:func:`base_lr`, :func:`mask_frozen`. Each reads ``config.optimizer`` and the run's global batch
size only; a new recipe is one more entry in :data:`OPTIMIZERS` (and its schedule here).

Two recipes: the 2017 paper's SGD with a step schedule, and MAE's fine-tuning (the attention-
transfer port's, ``main_finetune.py``): AdamW (``b1``, ``b2``; weight decay on neither 1-D
parameters — biases, norms — nor the position embedding and class token, as
``param_groups_lrd``), ``schedule="warmup_cosine"`` (linear warm-up from 0 over
``warmup_epochs``, then a half cosine to ``min_lr`` at ``cosine_epochs``, per step, as MAE's
``adjust_learning_rate``), layer-wise lr decay (:func:`layer_decay`), gradient clipping
(``clip_grad_norm``) and an EMA of the weights (``ema_decay``, :func:`track_ema`; timm's
``ModelEmaV2``). All of it optax; the EMA is a transformation whose state holds the averaged
weights, so it is checkpointed with the optimiser's state and read by :func:`ema_params`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Set as AbstractSet
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "build_optimizer",
    "lr_schedule",
    "base_lr",
    "mask_frozen",
    "sgd",
    "adamw",
    "layer_decay",
    "layer_ids",
    "weight_decay_mask",
    "track_ema",
    "ema_params",
    "EmaState",
    "OPTIMIZERS",
    "SCHEDULES",
    "LAYER_DECAY_FORMS",
]

SCHEDULES = ("step", "warmup_cosine")
# "port": the attention-transfer port's DualVisionTransformer (num_layers = depth: the last block
# and the head share scale 1); "mae": MAE's ViT (num_layers = depth + 1)
LAYER_DECAY_FORMS = ("port", "mae")
_NO_DECAY = ("pos_embed", "cls_token")
_BLOCK = re.compile(r"^blocks_(\d+)$")

FROZEN, TRAINED = "frozen", "trained"


def base_lr(optimizer: Any, batch_size: int) -> float:
    """``optimizer.lr``, scaled by ``batch_size / optimizer.lr_batch_size`` when that is set
    (the ImageNet recipe's "0.1 per 256 images")."""
    reference = optimizer.get("lr_batch_size", 0)
    return optimizer.lr * batch_size / reference if reference else optimizer.lr


def lr_schedule(optimizer: Any, batch_size: int, steps_per_epoch: int) -> optax.Schedule:
    """``optimizer.schedule``: "step" (the default; the 2017 reference's ``lr ×
    lr_decay_factor`` at each epoch in ``optimizer.lr_decay_epochs``) or "warmup_cosine"
    (MAE's: ``warmup_epochs``, ``min_lr``, ``cosine_epochs``)."""
    lr = base_lr(optimizer, batch_size)
    if optimizer.get("schedule", "step") == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=lr,
            warmup_steps=round(optimizer.warmup_epochs * steps_per_epoch),
            decay_steps=round(optimizer.cosine_epochs * steps_per_epoch),
            end_value=optimizer.min_lr,
        )
    boundaries = {
        int(e) * steps_per_epoch: optimizer.lr_decay_factor for e in optimizer.lr_decay_epochs
    }
    return optax.piecewise_constant_schedule(lr, boundaries)


def sgd(optimizer: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    """SGD as PyTorch's: weight decay added to the gradient, then (non-Nesterov unless
    ``optimizer.nesterov``) momentum."""
    decay = optimizer.weight_decay
    return optax.chain(
        optax.add_decayed_weights(decay) if decay else optax.identity(),
        optax.sgd(schedule, momentum=optimizer.momentum or None, nesterov=optimizer.nesterov),
    )


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def weight_decay_mask(params: Any) -> Any:
    """True where AdamW decays: parameters of 2 or more dimensions but the position embedding
    and the class token (MAE's ``param_groups_lrd`` with ``no_weight_decay``)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.ndim(p) > 1 and _keys(path)[-1] not in _NO_DECAY, params
    )


def adamw(optimizer: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW as PyTorch's (eps 1e-8; decoupled decay ``lr · weight_decay · p``) with MAE's
    weight-decay mask (:func:`weight_decay_mask`)."""
    return optax.adamw(
        schedule,
        b1=optimizer.get("b1", 0.9),
        b2=optimizer.get("b2", 0.999),
        eps=1e-8,
        weight_decay=optimizer.weight_decay,
        mask=weight_decay_mask,
    )


def layer_ids(params: Any, form: str = "port") -> tuple[Any, int]:
    """``(layer of each parameter, num_layers)`` (BEiT/MAE's ``get_layer_id_for_vit``): 0
    for the patch embedding, class token and position embedding, ``i + 1`` for block i,
    ``num_layers`` for the rest (the final norm, the head; the loss terms' parameters too);
    ``num_layers`` is the depth (``form="port"``) or the depth + 1 (``"mae"``)."""
    student = params.get("student", params)
    depth = sum(1 for name in student if _BLOCK.match(name))
    if not depth:
        raise ValueError(
            "config.optimizer.layer_decay needs a ViT student (blocks_0, blocks_1, ...); "
            "set it to 1.0 for other models"
        )
    top = depth + (form == "mae")

    def layer(path, _):
        keys = _keys(path)
        if keys[0] != "student":
            return top
        name = keys[1]
        if name in ("patch_embed", *_NO_DECAY):
            return 0
        block = _BLOCK.match(name)
        return int(block.group(1)) + 1 if block else top

    return jax.tree_util.tree_map_with_path(layer, params), top


def layer_decay(decay: float, form: str = "port") -> optax.GradientTransformation:
    """Scale each update by ``decay ** (num_layers − layer)`` (:func:`layer_ids`), MAE's
    ``lr_scale``; applied after the optimiser, so the decoupled weight decay is scaled too, as
    PyTorch's per-group lr does."""

    def scales(params):
        ids, top = layer_ids(params, form)
        return jax.tree.map(lambda i: decay ** (top - i), ids)

    def init(params):
        return optax.EmptyState()

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("layer_decay needs the parameters")
        return jax.tree.map(lambda u, s: u * s, updates, scales(params)), state

    return optax.GradientTransformation(init, update)


class EmaState(NamedTuple):
    ema_params: Any


def track_ema(decay: float) -> optax.GradientTransformation:
    """Leaves the updates as they are and keeps ``ema ← decay · ema + (1 − decay) · new params``
    (``optax.incremental_update``; timm's ``ModelEmaV2``, started from the initial weights) in
    its state. Chain it last."""

    def init(params):
        return EmaState(jax.tree.map(jnp.asarray, params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("track_ema needs the parameters")
        new = optax.apply_updates(params, updates)
        return updates, EmaState(optax.incremental_update(new, state.ema_params, 1.0 - decay))

    return optax.GradientTransformation(init, update)


def ema_params(opt_state: Any) -> Any:
    """The EMA weights that :func:`track_ema` keeps in ``opt_state`` (None without it)."""
    found = [
        leaf
        for leaf in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, EmaState))
        if isinstance(leaf, EmaState)
    ]
    return found[0].ema_params if found else None


# config.optimizer.name -> (optimizer config, schedule) -> transformation
OPTIMIZERS: dict[str, Callable[[Any, optax.Schedule], optax.GradientTransformation]] = {
    "sgd": sgd,
    "adamw": adamw,
}


def mask_frozen(
    tx: optax.GradientTransformation,
    frozen: AbstractSet,
    frozen_terms: AbstractSet = frozenset(),
) -> optax.GradientTransformation:
    """``tx`` for the trained parameters, nothing for the ``frozen`` student paths (no gradient
    step, no weight decay, no momentum: ``optax.set_to_zero`` through
    ``optax.multi_transform``). The train state's params are ``{"student": ..., "terms": ...}``;
    the terms' parameters are trained but under the ``frozen_terms`` prefixes
    (``("terms", term, module)``: FT's paraphraser after its first stage)."""
    if not frozen and not frozen_terms:
        return tx

    def labels(params):
        def label(path, _):
            keys = tuple(str(k.key) for k in path)
            if keys[0] == "terms" and any(keys[: len(p)] == p for p in frozen_terms):
                return FROZEN
            return FROZEN if keys[0] == "student" and keys[1:] in frozen else TRAINED

        return jax.tree_util.tree_map_with_path(label, params)

    return optax.multi_transform({TRAINED: tx, FROZEN: optax.set_to_zero()}, labels)


def build_optimizer(
    optimizer: Any,
    batch_size: int,
    steps_per_epoch: int,
    frozen: AbstractSet = frozenset(),
    frozen_terms: AbstractSet = frozenset(),
) -> optax.GradientTransformation:
    """The run's optimiser (``optimizer``: ``config.optimizer``) with its schedule, the
    ``frozen`` student paths left untouched: clipping (``clip_grad_norm`` > 0), the optimiser,
    layer-wise lr decay (``layer_decay`` < 1), then the EMA (``ema_decay`` > 0)."""
    schedule = lr_schedule(optimizer, batch_size, steps_per_epoch)
    parts = [OPTIMIZERS[optimizer.name](optimizer, schedule)]
    if optimizer.get("clip_grad_norm", 0):
        parts.insert(0, optax.clip_by_global_norm(optimizer.clip_grad_norm))
    if optimizer.get("layer_decay", 1.0) != 1.0:
        parts.append(layer_decay(optimizer.layer_decay, optimizer.get("layer_decay_form", "port")))
    tx = mask_frozen(
        parts[0] if len(parts) == 1 else optax.chain(*parts), set(frozen), set(frozen_terms)
    )
    if optimizer.get("ema_decay", 0):
        tx = optax.chain(tx, track_ema(optimizer.ema_decay))
    return tx
