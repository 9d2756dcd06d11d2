"""Loss terms as pure functions, and their composition into one objective.

Formulas (REFERENCE.md):
  at_loss  "code":  mean over batch and positions of (Q_S/||Q_S|| − Q_T/||Q_T||)²  — weight β = 1e3
           "paper": eq. 2's per-sample ||Q_S/||Q_S|| − Q_T/||Q_T|| ||_2, averaged over the batch
                    (weight it with β/2)
  kd_loss  alpha · T² · KL(softmax(t/T) || softmax(s/T)) (batch mean) + (1 − alpha) · CE(s, y)
           (the reference code since 2018-07-11); ``legacy=True``: its earlier form, whose
           ``kl_div`` averaged over batch × classes and was weighted 2·alpha·T², i.e. 2/C times
           the KL term above — the version its README called exactly reproducible on CIFAR-10
  factt_loss  full-activation transfer: mean squared difference of per-sample l2-normalised
              activations (student adapted to the teacher's channels by a 1×1 conv if needed)

An objective is a weighted sum of named terms (:func:`make_objective`). A term is a function
``term(out: StepOutputs, **options) -> scalar`` registered with :func:`register_term`; adding a
distillation method means writing one such function and naming it in a config.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from at_jax.attention import attention_map, normalize_rows, resize_map
from at_jax.precision import upcast

AT_MODES = ("code", "paper")


# --------------------------------------------------------------------------- elementary losses

def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(
        upcast(logits), labels).mean()


def at_loss(student_act: jax.Array, teacher_act: jax.Array, p: float = 2.0,
            reduce: str = "mean", mode: str = "code", normalize: Optional[str] = "l2") -> jax.Array:
    """Attention-transfer loss between one pair of NHWC activations.

    If the spatial sizes differ, the larger 2-D map is pooled (or interpolated) to the smaller.
    """
    if mode not in AT_MODES:
        raise ValueError(f"at_loss mode must be one of {AT_MODES}, got {mode!r}")
    if student_act.shape[0] != teacher_act.shape[0]:
        raise ValueError(f"student and teacher batch sizes differ: {student_act.shape} vs "
                         f"{teacher_act.shape}")
    s_hw, t_hw = student_act.shape[1:3], teacher_act.shape[1:3]
    size = min(s_hw, t_hw, key=lambda hw: hw[0] * hw[1]) if s_hw != t_hw else None
    qs = attention_map(student_act, p, reduce, normalize, size=size)
    qt = attention_map(teacher_act, p, reduce, normalize, size=size)
    diff = qs - qt
    if mode == "code":
        return jnp.mean(diff * diff)
    return jnp.mean(jnp.sqrt(jnp.sum(diff * diff, axis=-1) + 1e-24))


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
            temperature: float = 4.0, alpha: float = 0.9, legacy: bool = False) -> jax.Array:
    """Hinton's knowledge distillation exactly as the reference ``distillation()``.

    ``legacy=False`` (the reference since 2018-07-11): ``α·T²·KL_batchmean + (1−α)·CE``.
    ``legacy=True`` (before it): ``2·α·T²·KL/(B·C) + (1−α)·CE`` — ``kl_div``'s old default
    averaged over every one of the B×C elements, so the KL term is 2/C times the current one
    (5× smaller on CIFAR-10, 50× on CIFAR-100)."""
    t = temperature
    log_p = jax.nn.log_softmax(upcast(student_logits) / t, axis=-1)
    log_q = jax.nn.log_softmax(upcast(teacher_logits) / t, axis=-1)
    kl = jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1).mean() * t * t
    if legacy:
        kl = kl * 2.0 / student_logits.shape[-1]
    return alpha * kl + (1.0 - alpha) * cross_entropy(student_logits, labels)


def factt_loss(student_act: jax.Array, teacher_act: jax.Array) -> jax.Array:
    """F-ActT: mean squared difference of per-sample l2-normalised full activations.

    ``student_act`` must already have the teacher's channel count (see :class:`FActTAdapters`).
    """
    if student_act.shape[-1] != teacher_act.shape[-1]:
        raise ValueError(f"F-ActT needs equal channel counts (got {student_act.shape[-1]} and "
                         f"{teacher_act.shape[-1]}); adapt the student with a 1x1 conv first")
    s, t = upcast(student_act), upcast(teacher_act)
    if s.shape[1:3] != t.shape[1:3]:
        size = min(s.shape[1:3], t.shape[1:3], key=lambda hw: hw[0] * hw[1])
        s, t = (_resize_nhwc(x, size) for x in (s, t))
    b = s.shape[0]
    diff = normalize_rows(s.reshape(b, -1)) - normalize_rows(t.reshape(b, -1))
    return jnp.mean(diff * diff)


def _resize_nhwc(x: jax.Array, size) -> jax.Array:
    # Resize each channel as a 2-D map (channels folded into the batch axis).
    b, h, w, c = x.shape
    maps = jnp.moveaxis(x, -1, 1).reshape(b * c, h, w)
    return jnp.moveaxis(resize_map(maps, size).reshape(b, c, *size), 1, -1)


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


# --------------------------------------------------------------------------- pairing activations

_TRANSFER_POINT = re.compile(r"^(group|block|layer)\d+$")
_WRN_BLOCK = re.compile(r"^group\d+\.block\d+$")

Pairs = Union[str, Sequence[Union[str, Sequence[str]]]]


def _sorted_names(names, pattern) -> list[str]:
    key = lambda n: [int(d) for d in re.findall(r"\d+", n)]  # noqa: E731
    return sorted((n for n in names if pattern.match(n)), key=key)


def pair_activations(student_acts: Mapping[str, Any], teacher_acts: Mapping[str, Any],
                     pairs: Pairs = "groups") -> list[tuple[str, str]]:
    """Choose (student_name, teacher_name) pairs of sown activations.

    ``"groups"``: the models' transfer points (WRN ``group*``, NIN ``block*``, ResNet ``layer*``),
    paired in order — the paper's one loss per group for networks of different depth.
    ``"blocks"``: every WRN block, for student and teacher of the same depth.
    A sequence: names present in both (``["group1", "group2"]``) or explicit pairs; or the same
    as one comma-separated string (``"layer3,layer4"``, ``"s_name:t_name,..."``), the form that a
    command-line override can give (``--config.loss.at.pairs=layer3,layer4``).
    """
    if isinstance(pairs, str) and pairs not in ("groups", "blocks"):
        if not pairs.strip() or not all(p.strip() for p in pairs.split(",")):
            raise ValueError(f"pairs must be 'groups', 'blocks' or names such as "
                             f"'layer3,layer4', got {pairs!r}")
        pairs = [tuple(p.strip().split(":", 1)) if ":" in p else p.strip()
                 for p in pairs.split(",")]
    if isinstance(pairs, str):
        pattern = _TRANSFER_POINT if pairs == "groups" else _WRN_BLOCK
        s_names = _sorted_names(student_acts, pattern)
        t_names = _sorted_names(teacher_acts, pattern)
        if not s_names or len(s_names) != len(t_names):
            raise ValueError(
                f"cannot pair {pairs!r}: student has {s_names}, teacher has {t_names}"
                + (" (per-block pairing needs student and teacher of the same depth)"
                   if pairs == "blocks" else ""))
        return list(zip(s_names, t_names))
    result = []
    for item in pairs:
        s, t = (item, item) if isinstance(item, str) else tuple(item)
        missing = [n for n, acts in ((s, student_acts), (t, teacher_acts)) if n not in acts]
        if missing:
            raise ValueError(f"activation(s) {missing} not sown; student has {sorted(student_acts)},"
                             f" teacher has {sorted(teacher_acts)}")
        result.append((s, t))
    return result


# --------------------------------------------------------------------------- composition

@dataclasses.dataclass
class StepOutputs:
    """What a train step computed, handed to every loss term.

    ``student_acts``/``teacher_acts`` map sown names to activations. ``term_modules`` maps the
    name of a term that owns parameters to its module applied with the current parameters
    (``out.term_module("factt")(acts)``). ``weight_scale`` is the multiplier for terms whose
    weight follows the learning-rate schedule; ``epoch`` (1-based) switches on terms with a
    ``start_epoch``. ``extras`` holds lazily computed quantities (for
    example input gradients; see :mod:`at_jax.gradient`).
    """

    images: jax.Array
    labels: jax.Array
    student_logits: jax.Array
    student_acts: Mapping[str, jax.Array]
    teacher_logits: Optional[jax.Array] = None
    teacher_acts: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)
    term_modules: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
    weight_scale: jax.Array | float = 1.0
    epoch: jax.Array | int = 1
    extras: dict = dataclasses.field(default_factory=dict)
    lazy: Mapping[str, Callable[[], Any]] = dataclasses.field(default_factory=dict)

    def get(self, key: str):
        """Compute (once per trace) and return a lazily provided quantity such as an input gradient."""
        if key not in self.extras:
            if key not in self.lazy:
                raise ValueError(f"this step does not provide {key!r}; available: {sorted(self.lazy)}")
            self.extras[key] = self.lazy[key]()
        return self.extras[key]

    def term_module(self, name: str) -> Optional[Callable]:
        """The parameterised module of term ``name`` (bound to its parameters), or None."""
        return self.term_modules.get(name)

    def require_teacher(self, term: str) -> None:
        if self.teacher_logits is None:
            raise ValueError(f"loss term {term!r} needs a teacher: set config.teacher.workdir")


TermFn = Callable[..., jax.Array]
# module(student_acts, teacher_acts, **options) -> flax module or None; acts may be shape structs
ModuleFactory = Callable[..., Optional[nn.Module]]
_TERMS: dict[str, TermFn] = {}
_MODULES: dict[str, ModuleFactory] = {}
TEACHER_TERMS: set[str] = set()


def register_term(name: str, needs_teacher: bool = False, module: Optional[ModuleFactory] = None):
    """Decorator registering ``fn(out: StepOutputs, **options) -> scalar`` under ``name``.

    A term that owns trainable parameters (F-ActT's adapters) passes ``module``: a function of the
    student's and teacher's sown activations (shapes) and the term's options that returns a flax
    module (or None when none is needed). The train step initialises it on the student's
    activations, trains its ``params`` with the student's (``params['terms'][name]``), and hands
    it to the term as ``out.term_module(name)``.
    """
    def wrap(fn: TermFn) -> TermFn:
        _TERMS[name] = fn
        if needs_teacher:
            TEACHER_TERMS.add(name)
        if module is not None:
            _MODULES[name] = module
        return fn
    return wrap


def term_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """A term's own options (without ``weight`` and ``weight_schedule``)."""
    return {k: v for k, v in options.items() if k not in _SPEC_KEYS}


def term_modules(spec: Mapping[str, Mapping[str, Any]], student_acts: Mapping[str, Any],
                 teacher_acts: Mapping[str, Any]) -> dict[str, nn.Module]:
    """The parameterised modules of the active terms of ``spec``, by term name."""
    modules = {}
    for name, options in validate_terms(spec).items():
        if name in _MODULES:
            module = _MODULES[name](student_acts, teacher_acts, **term_options(options))
            if module is not None:
                modules[name] = module
    return modules


def term_names() -> list[str]:
    return sorted(_TERMS)


@register_term("ce")
def ce_term(out: StepOutputs) -> jax.Array:
    return cross_entropy(out.student_logits, out.labels)


@register_term("kd", needs_teacher=True)
def kd_term(out: StepOutputs, temperature: float = 4.0, alpha: float = 0.9,
            legacy: bool = False) -> jax.Array:
    out.require_teacher("kd")
    return kd_loss(out.student_logits, out.teacher_logits, out.labels, temperature, alpha, legacy)


@register_term("at", needs_teacher=True)
def at_term(out: StepOutputs, p: float = 2.0, reduce: str = "mean", mode: str = "code",
            normalize: Optional[str] = "l2", pairs: Pairs = "groups") -> jax.Array:
    """Σ over paired activations of :func:`at_loss` (the reference's ``sum(at_losses)``)."""
    out.require_teacher("at")
    return sum(at_loss(out.student_acts[s], out.teacher_acts[t], p, reduce, mode, normalize)
               for s, t in pair_activations(out.student_acts, out.teacher_acts, pairs))


def factt_adapters(student_acts, teacher_acts, pairs: Pairs = "groups") -> Optional[FActTAdapters]:
    """1×1 adapters for the F-ActT pairs whose channel counts differ (None if all match)."""
    if not teacher_acts:
        return None
    channels = {s: teacher_acts[t].shape[-1]
                for s, t in pair_activations(student_acts, teacher_acts, pairs)
                if student_acts[s].shape[-1] != teacher_acts[t].shape[-1]}
    return FActTAdapters(channels) if channels else None


@register_term("factt", needs_teacher=True, module=factt_adapters)
def factt_term(out: StepOutputs, pairs: Pairs = "groups") -> jax.Array:
    """Σ over paired activations of :func:`factt_loss` on adapted student activations."""
    out.require_teacher("factt")
    adapt = out.term_module("factt")
    adapted = adapt(out.student_acts) if adapt is not None else out.student_acts
    return sum(factt_loss(adapted[s], out.teacher_acts[t])
               for s, t in pair_activations(out.student_acts, out.teacher_acts, pairs))


WEIGHT_SCHEDULES = ("constant", "lr")
_SPEC_KEYS = ("weight", "weight_schedule", "start_epoch")


def validate_terms(spec: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Check an objective spec ``{term: {'weight': w, 'weight_schedule': s, 'start_epoch': e,
    **options}}``: a term with ``start_epoch`` e > 1 counts from epoch e on (Table 5 adds AT at
    epoch 60 of 100); before that its weight is 0 (its value is still measured).

    Terms with weight 0 are dropped. Raises ``ValueError`` naming the unknown term or option.
    """
    active = {}
    for name, options in spec.items():
        options = dict(options)
        if name not in _TERMS:
            raise ValueError(f"unknown loss term {name!r}; known terms: {', '.join(term_names())}")
        weight = options.get("weight", 1.0)
        if not isinstance(weight, (int, float)):
            raise ValueError(f"loss term {name!r}: weight must be a number, got {weight!r}")
        schedule = options.get("weight_schedule", "constant")
        if schedule not in WEIGHT_SCHEDULES:
            raise ValueError(f"loss term {name!r}: weight_schedule must be one of "
                             f"{WEIGHT_SCHEDULES}, got {schedule!r}")
        params = inspect.signature(_TERMS[name]).parameters
        unknown = [k for k in options if k not in _SPEC_KEYS and k not in params]
        if unknown:
            allowed = [k for k in params if k != "out"] + list(_SPEC_KEYS)
            raise ValueError(f"loss term {name!r} has no option(s) {unknown}; options: {allowed}")
        start = options.get("start_epoch", 0)
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"loss term {name!r}: start_epoch must be an integer >= 0 (0 or 1: "
                             f"from the start), got {start!r}")
        if weight != 0:
            active[name] = options
    if not active:
        raise ValueError("the objective has no term with a non-zero weight")
    return active


def make_objective(spec: Mapping[str, Mapping[str, Any]]
                   ) -> Callable[[StepOutputs], tuple[jax.Array, dict[str, jax.Array]]]:
    """Compose named, weighted terms into ``objective(out) -> (loss, measurements)``.

    ``measurements`` holds every term's unweighted value under its name and the total as ``loss``.
    """
    active = validate_terms(spec)

    def objective(out: StepOutputs):
        total = jnp.zeros((), jnp.float32)
        measurements = {}
        for name, options in active.items():
            value = _TERMS[name](out, **term_options(options))
            weight = options.get("weight", 1.0)
            if options.get("weight_schedule", "constant") == "lr":
                weight = weight * out.weight_scale
            if options.get("start_epoch", 0) > 1:
                weight = jnp.where(out.epoch >= options["start_epoch"], weight, 0.0)
            total = total + weight * value
            measurements[name] = value
        measurements["loss"] = total
        return total, measurements

    return objective


def needs_teacher(spec: Mapping[str, Mapping[str, Any]]) -> bool:
    return any(name in TEACHER_TERMS for name in validate_terms(spec))


# The input-gradient terms (grad_at, min_l2, symmetry) live in their own module; importing it
# here registers them wherever the objective is built.
from at_jax import gradient  # noqa: E402,F401
