"""The registry of loss terms: :class:`StepOutputs` (what a train step hands every term) and
:func:`register_term`. Terms are registered here by :mod:`at_jax.objective` (the built-in ones)
and :mod:`at_jax.distill.terms` (the distillation baselines); :mod:`at_jax.objective` composes
them (import ``register_term`` and ``StepOutputs`` from there, as before)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Optional

import flax.linen as nn
import jax

__all__ = [
    "StepOutputs",
    "register_term",
    "term_names",
    "term_options",
    "registered",
    "needs_teacher_term",
    "module_factory",
    "SPEC_KEYS",
    "WEIGHT_SCHEDULES",
]


@dataclasses.dataclass
class StepOutputs:
    """What a train step computed, handed to every loss term.

    ``student_acts``/``teacher_acts`` map activation names to arrays. ``student_fn`` and
    ``teacher_fn`` are ``x -> logits`` of the two networks for the input-gradient terms
    (the student's with batch norm as ``config.gradient.bn_mode``; the teacher in eval mode).
    ``targets``: (B, C) soft targets where the batch was mixed (mixup/CutMix), else None.
    ``term_modules`` maps the name of a term that owns parameters to its module applied with the
    current parameters (``out.term_module("factt")(acts)``). ``weight_scale`` is the multiplier
    for terms whose weight follows the learning-rate schedule; ``epoch`` (1-based) switches on
    terms with a ``start_epoch``.
    """

    images: jax.Array
    labels: jax.Array
    student_logits: jax.Array
    student_acts: Mapping[str, jax.Array]
    teacher_logits: Optional[jax.Array] = None
    teacher_acts: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)
    student_fn: Optional[Callable[[jax.Array], jax.Array]] = None
    teacher_fn: Optional[Callable[[jax.Array], jax.Array]] = None
    term_modules: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
    weight_scale: jax.Array | float = 1.0
    epoch: jax.Array | int = 1
    targets: Optional[jax.Array] = None

    def term_module(self, name: str) -> Optional[Callable]:
        """The parameterised module of term ``name`` (bound to its parameters), or None."""
        return self.term_modules.get(name)

    def require_teacher(self, term: str) -> None:
        if self.teacher_logits is None:
            raise ValueError(f"loss term {term!r} needs a teacher: set config.teacher.workdir")

    def require_student_fn(self, term: str) -> Callable[[jax.Array], jax.Array]:
        if self.student_fn is None:
            raise ValueError(
                f"loss term {term!r} needs the student as a function of its input "
                "(StepOutputs.student_fn)"
            )
        return self.student_fn


TermFn = Callable[..., jax.Array]
# module(student_acts, teacher_acts, **options) -> flax module or None; acts may be shape structs
ModuleFactory = Callable[..., Optional[nn.Module]]
_TERMS: dict[str, TermFn] = {}
_MODULES: dict[str, ModuleFactory] = {}
_TEACHER_TERMS: set[str] = set()
WEIGHT_SCHEDULES = ("constant", "lr")
SPEC_KEYS = ("weight", "weight_schedule", "start_epoch")


def register_term(
    name: str, needs_teacher: bool = False, module: Optional[ModuleFactory] = None
) -> Callable[[TermFn], TermFn]:
    """Decorator registering ``fn(out: StepOutputs, **options) -> scalar`` under ``name``.

    A term that owns trainable parameters (F-ActT's adapters) passes ``module``: a function of the
    student's and teacher's activations (shapes) and the term's options that returns a flax
    module (or None when none is needed). The train step initialises it on the student's
    activations, trains its ``params`` with the student's (``params['terms'][name]``), and hands
    it to the term as ``out.term_module(name)``.
    """

    def wrap(fn: TermFn) -> TermFn:
        _TERMS[name] = fn
        if needs_teacher:
            _TEACHER_TERMS.add(name)
        if module is not None:
            _MODULES[name] = module
        return fn

    return wrap


def term_names() -> list[str]:
    """The registered terms' names."""
    return sorted(_TERMS)


def term_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """A term's own options (without ``weight``, ``weight_schedule`` and ``start_epoch``)."""
    return {k: v for k, v in options.items() if k not in SPEC_KEYS}


def registered(name: str) -> Optional[TermFn]:
    """The term function registered under ``name`` (None if none is)."""
    return _TERMS.get(name)


def needs_teacher_term(name: str) -> bool:
    """Whether the term ``name`` was registered with ``needs_teacher``."""
    return name in _TEACHER_TERMS


def module_factory(name: str) -> Optional[ModuleFactory]:
    """The module factory of the term ``name`` (None for a term without parameters)."""
    return _MODULES.get(name)
