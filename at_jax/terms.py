"""The registry of loss terms: :class:`StepOutputs` (what a train step hands every term) and
:func:`register_term`. Terms are registered here by :mod:`at_jax.objective` (the built-in ones)
and :mod:`at_jax.distill.terms` (the distillation baselines); :mod:`at_jax.objective` composes
them (import ``register_term`` and ``StepOutputs`` from there, as before)."""

from __future__ import annotations

import dataclasses
import zlib
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
    "STAGE_KEYS",
    "WEIGHT_SCHEDULES",
    "InitStage",
    "init_stage_of",
    "check_of",
    "state_factory",
    "TermData",
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
    term_states: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    example_index: Optional[jax.Array] = None
    terms_key: Optional[jax.Array] = None

    def term_state(self, name: str) -> Any:
        """The state of term ``name`` (registered with ``state=``)."""
        if name not in self.term_states:
            raise ValueError(
                f"loss term {name!r} keeps state, but StepOutputs.term_states has none"
            )
        return self.term_states[name]

    def term_key(self, name: str) -> jax.Array:
        """A random key of this step for term ``name`` (``terms_key`` with the name folded in)."""
        if self.terms_key is None:
            raise ValueError(
                f"loss term {name!r} draws random numbers: StepOutputs.terms_key is unset"
            )
        return jax.random.fold_in(self.terms_key, zlib.crc32(name.encode()) & 0x7FFFFFFF)

    def require_example_index(self, term: str) -> jax.Array:
        if self.example_index is None:
            raise ValueError(
                f"loss term {term!r} needs each example's index in the training set "
                "(StepOutputs.example_index), which this batch does not carry"
            )
        return self.example_index

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


@dataclasses.dataclass(frozen=True)
class InitStage:
    """A term that trains in a stage of its own before the student's main training
    (RepDistiller's ``init_epochs``; see :mod:`at_jax.stages`). ``trains``: "features" (the
    student's layers but its classifier, and the term's modules) or "term" (the term's modules
    only; the student is frozen, batch norm in eval mode). ``main``: whether the term has a loss
    in the main stage too. ``keeps``: the term's submodules that the main stage takes over from
    the first, frozen (FT's paraphraser). ``init_lr``: the first stage's default learning rate
    (None: the run's)."""

    trains: str = "features"
    main: bool = False
    keeps: tuple[str, ...] = ()
    init_lr: Optional[float] = None


TermFn = Callable[..., Any]  # a scalar; (scalar, new state) for a term with state
# module(student_acts, teacher_acts, **options) -> flax module or None; acts may be shape structs
ModuleFactory = Callable[..., Optional[nn.Module]]
# state(student_acts, teacher_acts, data, **options) -> (key -> initial state); data: TermData
StateFactory = Callable[..., Callable[[jax.Array], Any]]
_TERMS: dict[str, TermFn] = {}
_MODULES: dict[str, ModuleFactory] = {}
_STATES: dict[str, StateFactory] = {}
_STAGES: dict[str, InitStage] = {}
# check(student_acts, teacher_acts, **options) -> None; raises ValueError naming what is missing
_CHECKS: dict[str, Callable[..., None]] = {}
_TEACHER_TERMS: set[str] = set()
WEIGHT_SCHEDULES = ("constant", "lr")
STAGE_KEYS = ("init_epochs", "init_lr")
SPEC_KEYS = ("weight", "weight_schedule", "start_epoch", *STAGE_KEYS)


def register_term(
    name: str,
    needs_teacher: bool = False,
    module: Optional[ModuleFactory] = None,
    state: Optional[StateFactory] = None,
    init_stage: Optional[InitStage] = None,
    check: Optional[Callable[..., None]] = None,
) -> Callable[[TermFn], TermFn]:
    """Decorator registering ``fn(out: StepOutputs, **options) -> scalar`` under ``name``.

    A term that owns trainable parameters (F-ActT's adapters) passes ``module``: a function of the
    student's and teacher's activations (shapes) and the term's options that returns a flax
    module (or None when none is needed). The train step initialises it on the student's
    activations, trains its ``params`` with the student's (``params['terms'][name]``), and hands
    it to the term as ``out.term_module(name)``.

    A term that keeps state that is not trained (CRD's memory banks) passes ``state``: a
    function of the activations' shapes, the training set (:class:`TermData`) and the term's
    options that returns ``key -> initial state``. The state lives in the train state
    (``term_state[name]``, checkpointed); the term reads it as ``out.term_state(name)`` and
    returns ``(value, new_state)``. A term with a stage of its own first passes ``init_stage``
    (:class:`InitStage`); it is called with ``stage="init"`` there. ``check``: a function of
    the activations' shapes and the options that raises ``ValueError`` naming a feature point
    that the networks lack (run when the networks are built, before anything compiles; a
    module factory checks what it reads already).
    """

    def wrap(fn: TermFn) -> TermFn:
        _TERMS[name] = fn
        if needs_teacher:
            _TEACHER_TERMS.add(name)
        tables: tuple[tuple[dict[str, Any], Any], ...] = (
            (_MODULES, module),
            (_STATES, state),
            (_STAGES, init_stage),
            (_CHECKS, check),
        )
        for table, value in tables:
            if value is not None:
                table[name] = value
        return fn

    return wrap


def term_names() -> list[str]:
    """The registered terms' names."""
    return sorted(_TERMS)


def term_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """A term's own options (without ``weight``, ``weight_schedule``, ``start_epoch`` and the
    stage keys ``init_epochs``, ``init_lr``)."""
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


def state_factory(name: str) -> Optional[StateFactory]:
    """The state factory of the term ``name`` (None for a term without state)."""
    return _STATES.get(name)


def check_of(name: str) -> Optional[Callable[..., None]]:
    """The feature-point check of the term ``name`` (None where it has none)."""
    return _CHECKS.get(name)


def init_stage_of(name: str) -> Optional[InitStage]:
    """The first stage of the term ``name`` (None for a term trained in one stage)."""
    return _STAGES.get(name)


@dataclasses.dataclass(frozen=True)
class TermData:
    """What a term's state may depend on: the training set's size and its labels (host array,
    or None where the data cannot give them)."""

    n_train: int
    labels: Any = None
