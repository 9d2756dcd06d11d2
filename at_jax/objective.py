"""The training objective as a weighted sum of named terms: :func:`make_objective`,
:func:`register_term`.

A term is ``term(out: StepOutputs, **options) -> scalar``, registered under a name; a config
names the terms and their weights (``config.loss``), and the train step computes
``Σ weight · term``. Built-in terms: ``ce``, ``kd``, ``at``, ``factt`` (on the array functions
of :mod:`at_jax.losses`) and ``grad_at``, ``min_l2``, ``symmetry`` (on :mod:`at_jax.gradient`).
Adding a distillation method means writing one such function and naming it in a config::

    @register_term("my_term", needs_teacher=True)
    def my_term(out: StepOutputs, scale: float = 1.0):
        return scale * jnp.mean((out.student_logits - out.teacher_logits) ** 2)

A term that owns trainable parameters registers a module factory (``module=``): the step
initialises it, trains its parameters with the student's (``params["terms"][name]``) and hands
it to the term as ``out.term_module(name)`` — F-ActT's 1×1 adapters (:class:`FActTAdapters`).

The registry itself (:class:`StepOutputs`, :func:`register_term`) lives in :mod:`at_jax.terms`,
below the terms of every family; this module re-exports it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from at_jax import gradient, losses, vit_losses
from at_jax.attention import POOLS, common_size
from at_jax.distill import (
    stage_terms as _stage_terms,  # noqa: F401  (registers ab/fsp/ft/crd)
    terms as _distill_terms,  # noqa: F401  (registers the baselines' terms)
)
from at_jax.precision import upcast
from at_jax.terms import (
    SPEC_KEYS,
    STAGE_KEYS,
    WEIGHT_SCHEDULES,
    StepOutputs,
    TermData,
    check_of,
    init_stage_of,
    module_factory,
    needs_teacher_term,
    register_term,
    registered,
    state_factory,
    term_names,
    term_options,
)

__all__ = [
    "ActiveTerms",
    "make_objective",
    "register_term",
    "StepOutputs",
    "validate_terms",
    "needs_teacher",
    "term_modules",
    "term_states",
    "make_stateful_objective",
    "TermData",
    "term_options",
    "term_names",
    "FActTAdapters",
    "WEIGHT_SCHEDULES",
]


class ActiveTerms(dict):
    """The active terms of a checked objective spec (what :func:`validate_terms` returns):
    ``make_objective``, ``needs_teacher`` and ``term_modules`` take it as it is, without
    checking it again."""


def _active(spec: Mapping[str, Mapping[str, Any]]) -> ActiveTerms:
    return spec if isinstance(spec, ActiveTerms) else validate_terms(spec)


def validate_terms(spec: Mapping[str, Mapping[str, Any]]) -> ActiveTerms:
    """Check an objective spec ``{term: {'weight': w, 'weight_schedule': s, 'start_epoch': e,
    **options}}`` and return its active terms (weight ≠ 0).

    A term with ``start_epoch`` e > 1 counts from epoch e on (Table 5 adds AT at epoch 60 of
    100); before that its weight is 0 (its value is still measured). Raises ``ValueError``
    naming the unknown term or option.
    """
    active = ActiveTerms()
    for name, options in spec.items():
        options = dict(options)
        fn = registered(name)
        if fn is None:
            raise ValueError(f"unknown loss term {name!r}; known terms: {', '.join(term_names())}")
        weight = options.get("weight", 1.0)
        if not isinstance(weight, (int, float)):
            raise ValueError(f"loss term {name!r}: weight must be a number, got {weight!r}")
        schedule = options.get("weight_schedule", "constant")
        if schedule not in WEIGHT_SCHEDULES:
            raise ValueError(
                f"loss term {name!r}: weight_schedule must be one of "
                f"{WEIGHT_SCHEDULES}, got {schedule!r}"
            )
        params = inspect.signature(fn).parameters
        unknown = [k for k in options if k not in SPEC_KEYS and k not in params]
        if unknown:
            allowed = [k for k in params if k != "out"] + list(SPEC_KEYS)
            raise ValueError(f"loss term {name!r} has no option(s) {unknown}; options: {allowed}")
        start = options.get("start_epoch", 0)
        if not isinstance(start, int) or start < 0:
            raise ValueError(
                f"loss term {name!r}: start_epoch must be an integer >= 0 (0 or 1: "
                f"from the start), got {start!r}"
            )
        _check_stage_keys(name, options)
        if weight != 0:
            active[name] = options
    if not active:
        raise ValueError("the objective has no term with a non-zero weight")
    return active


def _check_stage_keys(name: str, options: Mapping[str, Any]) -> None:
    given = [k for k in STAGE_KEYS if k in options]
    if given and init_stage_of(name) is None:
        raise ValueError(
            f"loss term {name!r} has no stage of its own, so {given} mean nothing for it "
            "(the terms with a first stage: "
            + ", ".join(n for n in term_names() if init_stage_of(n) is not None)
            + ")"
        )
    epochs = options.get("init_epochs", 0)
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise ValueError(
            f"loss term {name!r}: init_epochs must be an integer >= 0 (the epochs of its first "
            f"stage; 0: none), got {epochs!r}"
        )
    lr = options.get("init_lr", 0.0)
    if not isinstance(lr, (int, float)) or lr < 0:
        raise ValueError(
            f"loss term {name!r}: init_lr must be a number >= 0 (0: the stage's default), got "
            f"{lr!r}"
        )


def needs_teacher(spec: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether an active term of ``spec`` needs a teacher."""
    return any(needs_teacher_term(name) for name in _active(spec))


def term_modules(
    spec: Mapping[str, Mapping[str, Any]],
    student_acts: Mapping[str, Any],
    teacher_acts: Mapping[str, Any],
) -> dict[str, nn.Module]:
    """The parameterised modules of the active terms of ``spec``, by term name. Every term's
    feature points are checked against the activations (``ValueError`` naming a missing one)."""
    modules = {}
    for name, options in _active(spec).items():
        check = check_of(name)
        if check is not None and teacher_acts:
            check(student_acts, teacher_acts, **term_options(options))
        factory = module_factory(name)
        if factory is not None:
            module = factory(student_acts, teacher_acts, **term_options(options))
            if module is not None:
                modules[name] = module
    return modules


def term_states(
    spec: Mapping[str, Mapping[str, Any]],
    student_acts: Mapping[str, Any],
    teacher_acts: Mapping[str, Any],
    data: TermData,
) -> dict[str, Callable[[jax.Array], Any]]:
    """``key -> initial state`` of each active term of ``spec`` that keeps state, by name."""
    inits = {}
    for name, options in _active(spec).items():
        factory = state_factory(name)
        if factory is not None:
            inits[name] = factory(student_acts, teacher_acts, data, **term_options(options))
    return inits


def make_stateful_objective(
    spec: Mapping[str, Mapping[str, Any]],
) -> Callable[[StepOutputs], tuple[jax.Array, dict[str, jax.Array], dict[str, Any]]]:
    """:func:`make_objective` that also returns the new state of the terms that keep one:
    ``objective(out) -> (loss, measurements, new_term_states)``."""
    active = _active(spec)

    def objective(out: StepOutputs):
        total = jnp.zeros((), jnp.float32)
        measurements, states = {}, {}
        for name, options in active.items():
            value = registered(name)(out, **term_options(options))  # type: ignore[misc]
            if state_factory(name) is not None:
                value, states[name] = value
            weight = options.get("weight", 1.0)
            if options.get("weight_schedule", "constant") == "lr":
                weight = weight * out.weight_scale
            if options.get("start_epoch", 0) > 1:
                weight = jnp.where(out.epoch >= options["start_epoch"], weight, 0.0)
            total = total + weight * value
            measurements[name] = value
        measurements["loss"] = total
        return total, measurements, states

    return objective


def make_objective(
    spec: Mapping[str, Mapping[str, Any]],
) -> Callable[[StepOutputs], tuple[jax.Array, dict[str, jax.Array]]]:
    """Compose named, weighted terms into ``objective(out) -> (loss, measurements)``.

    ``measurements`` holds every term's unweighted value under its name and the total as
    ``loss``. Example::

        objective = make_objective({"kd": {"weight": 1.0, "temperature": 4.0, "alpha": 0.9},
                                    "at": {"weight": 1e3, "pairs": "groups"}})
        loss, measurements = objective(step_outputs)
    """
    stateful = make_stateful_objective(spec)

    def objective(out: StepOutputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        loss, measurements, _ = stateful(out)
        return loss, measurements

    return objective


# --------------------------------------------------------------------------- the built-in terms


@register_term("ce")
def ce_term(out: StepOutputs, label_smoothing: float = 0.0) -> jax.Array:
    """Cross-entropy with the labels, or with the soft targets of a mixed batch; with
    ``label_smoothing`` s the targets are ``(1 − s)·t + s/C`` (timm's, MAE's recipe)."""
    if out.targets is None and not label_smoothing:
        return losses.cross_entropy(out.student_logits, out.labels)
    classes = out.student_logits.shape[-1]
    targets = out.targets if out.targets is not None else jax.nn.one_hot(out.labels, classes)
    targets = targets * (1.0 - label_smoothing) + label_smoothing / classes
    return jnp.mean(-jnp.sum(targets * jax.nn.log_softmax(upcast(out.student_logits)), axis=-1))


@register_term("kd", needs_teacher=True)
def kd_term(
    out: StepOutputs, temperature: float = 4.0, alpha: float = 0.9, legacy: bool = False
) -> jax.Array:
    """:func:`at_jax.losses.kd_loss`."""
    out.require_teacher("kd")
    assert out.teacher_logits is not None
    return losses.kd_loss(
        out.student_logits, out.teacher_logits, out.labels, temperature, alpha, legacy
    )


def _check_at(
    student_acts, teacher_acts, pairs: losses.Pairs = "groups", pool: str = "map", **_: Any
) -> None:
    """The AT term's points exist and, with ``pool="map"``, have maps of comparable sizes."""
    if pool not in POOLS:
        raise ValueError(f"loss.at.pool must be one of {POOLS}, got {pool!r}")
    for s, t in losses.pair_activations(student_acts, teacher_acts, pairs):
        if pool == "map":
            common_size(student_acts[s].shape, teacher_acts[t].shape)


@register_term("at", needs_teacher=True, check=_check_at)
def at_term(
    out: StepOutputs,
    p: float = 2.0,
    reduce: str = "mean",
    mode: str = "code",
    normalize: Optional[str] = "l2",
    pairs: losses.Pairs = "groups",
    pool: str = "map",
) -> jax.Array:
    """The total of :func:`at_jax.losses.at_losses` (the reference's ``sum(at_losses)``);
    ``pool="activation"``: RepDistiller's adaptive pooling of maps of other sizes."""
    out.require_teacher("at")
    return losses.at_losses(
        out.student_acts,
        out.teacher_acts,
        pairs,
        p=p,
        reduce=reduce,
        mode=mode,
        normalize=normalize,
        pool=pool,
    )[0]


@register_term("atd", needs_teacher=True)
def atd_term(out: StepOutputs, end_layer: int = -3, target: str = "attention") -> jax.Array:
    """Attention distillation between ViTs (Li et al., NeurIPS 2024): the total of
    :func:`at_jax.vit_losses.attention_distillation_losses` over the teacher's blocks
    ``0 .. depth + end_layer − 1``; ``target`` "attention" (the logits' cross-entropy) or "q",
    "k", "v" (mean squared errors). The paper's ImageNet command: weight 3.0, end_layer −6
    (ViT-L)."""
    out.require_teacher("atd")
    return vit_losses.attention_distillation_losses(
        out.student_acts, out.teacher_acts, end_layer, target
    )[0]


class FActTAdapters(nn.Module):
    """1×1 conv adapters from student to teacher channels, one per transfer point that needs it.

    ``channels`` maps a student activation name to the teacher's channel count. The ``factt``
    term owns these parameters (registered with ``module=``): they are trained with the student,
    under ``params['terms']['factt']``.
    """

    channels: Mapping[str, int]

    @nn.compact
    def __call__(self, acts: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        out = dict(acts)
        for name, c in self.channels.items():
            out[name] = nn.Conv(c, (1, 1), use_bias=False, name=name.replace("/", "_"))(acts[name])
        return out


def factt_adapters(
    student_acts: Mapping[str, Any], teacher_acts: Mapping[str, Any], pairs: losses.Pairs = "groups"
) -> Optional[FActTAdapters]:
    """1×1 adapters for the F-ActT pairs whose channel counts differ (None if all match)."""
    if not teacher_acts:
        return None
    channels = {
        s: teacher_acts[t].shape[-1]
        for s, t in losses.pair_activations(student_acts, teacher_acts, pairs)
        if student_acts[s].shape[-1] != teacher_acts[t].shape[-1]
    }
    return FActTAdapters(channels) if channels else None


@register_term("factt", needs_teacher=True, module=factt_adapters)
def factt_term(out: StepOutputs, pairs: losses.Pairs = "groups") -> jax.Array:
    """Σ over paired activations of :func:`at_jax.losses.factt_loss` on adapted student
    activations."""
    out.require_teacher("factt")
    adapt = out.term_module("factt")
    adapted = adapt(out.student_acts) if adapt is not None else out.student_acts
    return sum(
        (
            losses.factt_loss(adapted[s], out.teacher_acts[t])
            for s, t in losses.pair_activations(out.student_acts, out.teacher_acts, pairs)
        ),
        jnp.zeros((), jnp.float32),
    )


@register_term("grad_at", needs_teacher=True)
def grad_at_term(out: StepOutputs, squared: bool = True) -> jax.Array:
    """:func:`at_jax.gradient.grad_at_loss` (eq. 4)."""
    out.require_teacher("grad_at")
    assert out.teacher_fn is not None
    return gradient.grad_at_loss(
        out.require_student_fn("grad_at"), out.teacher_fn, out.images, out.labels, squared=squared
    )


@register_term("min_l2")
def min_l2_term(out: StepOutputs, squared: bool = True) -> jax.Array:
    """:func:`at_jax.gradient.min_l2_loss` (double backprop)."""
    return gradient.min_l2_loss(
        out.require_student_fn("min_l2"), out.images, out.labels, squared=squared
    )


@register_term("symmetry")
def symmetry_term(out: StepOutputs, squared: bool = True) -> jax.Array:
    """:func:`at_jax.gradient.symmetry_loss` (eq. 6)."""
    return gradient.symmetry_loss(
        out.require_student_fn("symmetry"), out.images, out.labels, squared=squared
    )
