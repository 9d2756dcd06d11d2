"""The two networks of a run side by side: :class:`Networks` holds the student, the teacher
(eval mode) and the objective's parameterised term modules, and turns one batch into the
:class:`~at_jax.objective.StepOutputs` every loss term reads. Pure: parameters and the
teacher's variables are arguments, nothing is captured."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Set as AbstractSet
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from at_jax import finetune, losses, objective
from at_jax.attention import common_size
from at_jax.attention_copy import NO_COPY, VIT_PAIRS, AttentionCopy, paired_blocks
from at_jax.data.spec import DataSpec
from at_jax.models import forward
from at_jax.models.build import build_model, compute_dtype
from at_jax.models.vit import shared_drop_masks

__all__ = ["Networks", "init_states", "init_terms", "dummy_input"]


class Networks:
    """The student ``model``, the ``teacher_model`` (or None) with variables of the shapes of
    ``teacher_variables``, and the term modules of the active ``terms``. ``bn_mode``
    (``config.gradient.bn_mode``): batch norm in the gradient terms' input-gradient pass.
    ``copy`` (:class:`~at_jax.attention_copy.AttentionCopy`, ``config.attention_copy``): the
    teacher's attention that the student's first blocks use instead of their own.
    ``term_data`` (:class:`~at_jax.objective.TermData`): the training set, for the terms that
    keep state (CRD's memory banks; :func:`init_states`)."""

    def __init__(
        self,
        *,
        model: nn.Module,
        spec: DataSpec,
        terms: objective.ActiveTerms,
        dtype: Any = jnp.float32,
        bn_mode: str = "batch_stats",
        teacher_model: Optional[nn.Module] = None,
        teacher_variables: Any = None,
        copy: AttentionCopy = NO_COPY,
        term_data: Optional[objective.TermData] = None,
    ):
        if (objective.needs_teacher(terms) or copy.on) and teacher_model is None:
            raise ValueError(
                f"the {'attention copy' if copy.on else 'loss'} uses a teacher (at/kd/atd/"
                "factt/attention_copy...) but no teacher is set: set config.teacher.workdir to "
                "a trained teacher's workdir"
            )
        self.model, self.spec, self.terms, self.dtype, self.copy = model, spec, terms, dtype, copy
        self.bn_mode, self.teacher_model = bn_mode, teacher_model
        self.pool = terms.get("at", {}).get("pool", "map")  # how maps of two sizes compare
        dummy = dummy_input(self.spec, self.dtype)
        # the student's variables as shapes ({"params", "batch_stats"})
        self.variable_shapes = jax.eval_shape(model.init, jax.random.key(0), dummy)
        self.student_shapes = jax.eval_shape(
            lambda v: forward(model, v, dummy)[1], self.variable_shapes
        )
        self.teacher_shapes = (
            {}
            if teacher_model is None
            else jax.eval_shape(lambda v: forward(teacher_model, v, dummy)[1], teacher_variables)
        )
        if copy.on:
            copy.check_pair(self.student_shapes, self.teacher_shapes)
        self.term_modules = objective.term_modules(terms, self.student_shapes, self.teacher_shapes)
        self.term_state_inits = objective.term_states(
            terms, self.student_shapes, self.teacher_shapes, term_data or objective.TermData(0)
        )

    @classmethod
    def from_config(cls, config: Any, spec: DataSpec, terms: Any = None, **teacher: Any):
        """The networks of a run's ``config`` (``model``, ``model_overrides``, ``dtype``,
        ``gradient.bn_mode``; ``terms`` if checked already, else ``config.loss`` checked here);
        ``teacher``: ``teacher_model`` and ``teacher_variables``."""
        return cls(
            model=build_model(config, spec.class_count()),
            spec=spec,
            terms=objective.validate_terms(dict(config.loss)) if terms is None else terms,
            dtype=compute_dtype(config),
            bn_mode=config.get("gradient", {}).get("bn_mode", "batch_stats"),
            copy=AttentionCopy.from_config(config),
            **teacher,
        )

    def attention_pairs(self) -> Optional[Any]:
        """Where to measure the attention distance to the teacher: the AT term's pairs when on;
        for two ViTs, their self-attention (:data:`~at_jax.attention_copy.VIT_PAIRS`); else
        ``"groups"``. None without a teacher or when the networks cannot be paired."""
        if self.teacher_model is None:
            return None
        if "at" not in self.terms and paired_blocks(self.student_shapes, self.teacher_shapes):
            return VIT_PAIRS
        pairs = self.terms.get("at", {}).get("pairs", "groups")
        ok = _comparable(self.student_shapes, self.teacher_shapes, pairs, self.pool)
        return pairs if ok else None

    def init(
        self,
        model_key: jax.Array,
        terms_key: jax.Array,
        pretrained: Any = None,
        replaced: AbstractSet = frozenset(),
    ) -> tuple[Any, dict]:
        """``(student variables, term parameters)`` of one seed; ``pretrained`` variables (if
        any) replace the fresh ones but at the ``replaced`` paths."""
        variables: Any = self.model.init(model_key, dummy_input(self.spec, self.dtype))
        if pretrained is not None:
            variables = finetune.merge(variables, pretrained, set(replaced))
        terms = init_terms(self.term_modules, terms_key, self.student_shapes, self.teacher_shapes)
        return variables, terms

    def student_fn(
        self, params, batch_stats, train: bool, dropout_key=None, **inputs: Any
    ) -> Callable:
        """``x -> (logits, activations, new_batch_stats)`` of the student (``dropout_key``: the
        dropout masks in train mode, for models with dropout; ``inputs``: further arguments of
        the model, as the copied attention)."""
        variables = {"params": params["student"]}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        rngs = {"dropout": dropout_key} if train and dropout_key is not None else None
        return lambda x: forward(self.model, variables, x, train=train, rngs=rngs, **inputs)

    def outputs(
        self,
        params: Mapping,
        batch_stats: Any,
        teacher_variables: Any,
        batch: tuple[jax.Array, jax.Array],
        key: jax.Array,
        **schedule: Any,
    ) -> tuple[objective.StepOutputs, Any]:
        """Student (train mode) and teacher (eval mode) forward passes of ``batch`` (images,
        labels) -> ``(StepOutputs, new batch statistics)``; ``schedule``: ``weight_scale``,
        ``epoch``, ``targets`` and what the stateful terms read (``term_states``,
        ``example_index``, ``terms_key``). The gradient terms' input-gradient pass sees the training
        forward's dropout masks (``key``), batch norm as ``bn_mode``. Two ViTs of one depth share
        drop-path masks; with attention copy the student uses the teacher's attention."""
        images, labels = batch
        teacher = self.teacher_model
        masks = shared_drop_masks(self.model, teacher, jax.random.fold_in(key, 1), len(images))
        shared: dict[str, Any] = {} if masks is None else {"drop_masks": masks}
        t_logits, t_acts, teacher_fn = _teacher_pass(teacher, teacher_variables, images, shared)
        inputs = {**shared, **self.copy.student_inputs(t_acts)}
        s_logits, s_acts, new_stats = self.student_fn(params, batch_stats, True, key, **inputs)(
            images
        )
        gradient_pass = self.student_fn(
            params, batch_stats, self.bn_mode == "batch_stats", key, **inputs
        )
        bound = {
            name: functools.partial(module.apply, {"params": params["terms"][name]})
            for name, module in self.term_modules.items()
        }
        out = objective.StepOutputs(
            images=images,
            labels=labels,
            student_logits=s_logits,
            student_acts=s_acts,
            teacher_logits=t_logits,
            teacher_acts=t_acts,
            student_fn=lambda x: gradient_pass(x)[0],
            teacher_fn=teacher_fn,
            term_modules=bound,
            **schedule,
        )
        return out, new_stats


def _comparable(student_shapes: Any, teacher_shapes: Any, pairs: Any, pool: str) -> bool:
    """Whether the transfer points ``pairs`` exist in both networks with maps of comparable
    sizes (any sizes with ``pool="activation"``)."""
    try:
        for s, t in losses.pair_activations(student_shapes, teacher_shapes, pairs):
            if pool == "map":
                common_size(student_shapes[s].shape, teacher_shapes[t].shape)
    except ValueError:  # no such points, or maps of sizes that cannot be compared
        return False
    return True


def dummy_input(spec: DataSpec, dtype: Any) -> jax.Array:
    """A batch of two zero images of ``spec``'s shape: what shapes are traced with."""
    return jnp.zeros((2, *spec.image_shape), dtype)


def init_states(networks: Networks, key: jax.Array) -> dict:
    """The initial state of ``networks``' terms that keep one, by term name."""
    return {
        name: init(jax.random.fold_in(key, i))
        for i, (name, init) in enumerate(sorted(networks.term_state_inits.items()))
    }


def init_terms(
    modules: Mapping[str, nn.Module], key: jax.Array, student_shapes: Any, teacher_shapes: Any
) -> dict:
    """The parameters of the term ``modules``, initialised on zero activations of the
    student's (and, for a module that reads them, ``reads_teacher``, the teacher's) shapes."""
    acts = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), student_shapes)
    t_acts = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), teacher_shapes)
    return {
        name: module.init(
            jax.random.fold_in(key, i),
            acts,
            *((t_acts,) if getattr(module, "reads_teacher", False) else ()),
        ).get("params", {})
        for i, (name, module) in enumerate(sorted(modules.items()))
    }


def _teacher_pass(teacher: Optional[nn.Module], variables: Any, images: jax.Array, shared: dict):
    """The teacher's ``(logits, activations, images -> logits)`` of a batch (eval mode;
    ``shared``: the drop masks it shares with the student); ``(None, {}, None)`` without one."""
    if teacher is None:
        return None, {}, None

    def teacher_fn(x):
        return forward(teacher, variables, x)[0]

    logits, acts, _ = forward(teacher, variables, images, **shared)
    return logits, acts, teacher_fn
