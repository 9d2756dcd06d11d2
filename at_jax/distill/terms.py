"""The distillation baselines as objective terms (``config.loss.<name>``): ``fitnet``, ``sp``,
``cc``, ``vid``, ``rkd``, ``pkt``, ``nst``, ``dkd``, on the array functions of this package.

Feature points, as RepDistiller's (its ``feat`` list: the stem, each group, the pooled
vector): ``pairs`` ("groups": at_jax's models' transfer points paired in order, or names,
``"s:t"`` pairs, as the ``at`` term) for the map terms, of which ``index`` picks one (FitNet's
hint: the second group, the reference's ``hint_layer=2``; SP: the last); ``feature`` (default
``"features"``: the pooled vector before the classifier, which at_jax's WRN, ResNet and ViT
sow) for the relational terms. :data:`REFERENCE_WEIGHTS`: the β of the reference's
``scripts/run_cifar_distill.sh``. The terms with parameters (FitNet's regressor, CC's two
embeddings, VID's regressors and variances) train them with the student; they are not part of
the student's exported weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from at_jax import losses
from at_jax.attention import pool_to_smaller
from at_jax.distill import features, logits, relational
from at_jax.terms import StepOutputs, register_term

__all__ = ["REFERENCE_WEIGHTS", "TermEmbeddings", "FitNetRegressor", "VIDRegressors"]

REFERENCE_WEIGHTS = {
    "fitnet": 100.0,
    "sp": 3000.0,
    "cc": 0.02,
    "vid": 1.0,
    "rkd": 1.0,
    "pkt": 30000.0,
    "nst": 50.0,
    "dkd": 1.0,  # DKD's own α, β inside (mdistiller: CE 1.0, α 1, β 8, T 4, warm-up 20)
}


def _pairs(
    student_acts: Mapping[str, Any],
    teacher_acts: Mapping[str, Any],
    pairs: losses.Pairs,
    index: Optional[int] = None,
) -> list[tuple[str, str]]:
    """The (student, teacher) feature points of ``pairs``; ``index``: only that one."""
    found = losses.pair_activations(student_acts, teacher_acts, pairs)
    if index is None:
        return found
    if not -len(found) <= index < len(found):
        raise ValueError(f"index {index} is out of range for the {len(found)} pairs {found}")
    return [found[index]]


def _feature(out: Any, feature: str, term: str) -> tuple[jax.Array, jax.Array]:
    """The student's and the teacher's vector ``feature`` ("name" or "student:teacher")."""
    try:
        _check_feature(out.student_acts, out.teacher_acts, feature)
    except ValueError as e:
        raise ValueError(f"loss term {term!r}: {e}") from None
    s, _, t = feature.partition(":")
    return out.student_acts[s], out.teacher_acts[t or s]


def _total(values) -> jax.Array:
    return sum(values, jnp.zeros((), jnp.float32))


class FitNetRegressor(nn.Module):
    """FitNet's :class:`~at_jax.distill.features.ConvRegressor` on the student's hint."""

    student: str
    channels: int
    student_size: tuple[int, int]
    teacher_size: tuple[int, int]
    reads_teacher = False

    @nn.compact
    def __call__(self, student_acts: Mapping[str, jax.Array]) -> jax.Array:
        regressor = features.ConvRegressor(
            self.channels, self.student_size, self.teacher_size, name="regressor"
        )
        return regressor(student_acts[self.student])


def fitnet_module(student_acts, teacher_acts, pairs: losses.Pairs = "groups", index: int = 1):
    if not teacher_acts:
        return None
    ((s, t),) = _pairs(student_acts, teacher_acts, pairs, index)
    s_shape, t_shape = student_acts[s].shape, teacher_acts[t].shape
    return FitNetRegressor(s, t_shape[-1], tuple(s_shape[1:3]), tuple(t_shape[1:3]))


@register_term("fitnet", needs_teacher=True, module=fitnet_module)
def fitnet_term(out: StepOutputs, pairs: losses.Pairs = "groups", index: int = 1) -> jax.Array:
    """:func:`~at_jax.distill.features.hint_loss` of the regressed student hint (the ``index``-th
    of ``pairs``; the reference's ``hint_layer=2``: the second group) and the teacher's."""
    out.require_teacher("fitnet")
    ((_, t),) = _pairs(out.student_acts, out.teacher_acts, pairs, index)
    regress = out.term_module("fitnet")
    assert regress is not None
    return features.hint_loss(regress(out.student_acts), out.teacher_acts[t])


def _check_pairs(student_acts, teacher_acts, pairs: losses.Pairs = "groups", index=None, **_):
    _pairs(student_acts, teacher_acts, pairs, index)


def _check_feature(student_acts, teacher_acts, feature: str = "features", **_: Any) -> None:
    s, _sep, t = feature.partition(":")
    missing = [
        f"{side} has no {name!r} (it has: {', '.join(sorted(acts))})"
        for side, name, acts in (("student", s, student_acts), ("teacher", t or s, teacher_acts))
        if name not in acts
    ]
    if missing:
        raise ValueError(
            f"feature {feature!r}: " + "; ".join(missing) + " (set the term's feature=)"
        )


@register_term("sp", needs_teacher=True, check=_check_pairs)
def sp_term(out: StepOutputs, pairs: losses.Pairs = "groups", index: Optional[int] = -1):
    """:func:`~at_jax.distill.relational.sp_loss` summed over the pairs (the reference: the last
    group's output only, ``index=-1``; ``index=None``: every pair)."""
    out.require_teacher("sp")
    return _total(
        relational.sp_loss(out.student_acts[s], out.teacher_acts[t])
        for s, t in _pairs(out.student_acts, out.teacher_acts, pairs, index)
    )


class TermEmbeddings(nn.Module):
    """CC's two linear embeddings (RepDistiller's ``LinearEmbed``, ``dim`` 128) of the student's
    and the teacher's ``feature``; both trained (the teacher's features stay fixed)."""

    feature: str
    dim: int = 128
    reads_teacher = True

    @nn.compact
    def __call__(self, student_acts, teacher_acts) -> tuple[jax.Array, jax.Array]:
        s, _, t = self.feature.partition(":")
        f_s, f_t = student_acts[s], jax.lax.stop_gradient(teacher_acts[t or s])
        flat = lambda f: f.reshape(f.shape[0], -1)  # noqa: E731
        return nn.Dense(self.dim, name="embed_s")(flat(f_s)), nn.Dense(self.dim, name="embed_t")(
            flat(f_t)
        )


def cc_module(student_acts, teacher_acts, feature: str = "features", dim: int = 128, **_: Any):
    return TermEmbeddings(feature, dim) if teacher_acts else None


@register_term("cc", needs_teacher=True, module=cc_module)
def cc_term(
    out: StepOutputs,
    feature: str = "features",
    dim: int = 128,
    form: str = "reference",
    gamma: float = 0.4,
    order: int = 2,
) -> jax.Array:
    """:func:`~at_jax.distill.relational.cc_loss` of the two embeddings of ``feature``."""
    out.require_teacher("cc")
    _feature(out, feature, "cc")
    embed = out.term_module("cc")
    assert embed is not None
    e_s, e_t = embed(out.student_acts, out.teacher_acts)
    return relational.cc_loss(e_s, e_t, form, gamma, order)


class VIDRegressors(nn.Module):
    """VID's :class:`~at_jax.distill.features.VIDRegressor` per pair (``mid``: the teacher's
    channels, as the reference's ``VIDLoss(s, t, t)``), on the maps pooled to one size."""

    pairs: tuple[tuple[str, str, int], ...]  # (student, teacher, teacher channels)
    init_pred_var: float = 5.0
    reads_teacher = True

    @nn.compact
    def __call__(self, student_acts, teacher_acts) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
        result = []
        for i, (s, t, c) in enumerate(self.pairs):
            f_s, f_t = pool_to_smaller(student_acts[s], teacher_acts[t])
            mean, var = features.VIDRegressor(c, c, self.init_pred_var, name=f"pair{i}")(f_s)
            result.append((mean, var, f_t))
        return result


def vid_module(student_acts, teacher_acts, pairs: losses.Pairs = "groups", init_pred_var=5.0):
    if not teacher_acts:
        return None
    found = _pairs(student_acts, teacher_acts, pairs)
    return VIDRegressors(tuple((s, t, teacher_acts[t].shape[-1]) for s, t in found), init_pred_var)


@register_term("vid", needs_teacher=True, module=vid_module)
def vid_term(
    out: StepOutputs, pairs: losses.Pairs = "groups", init_pred_var: float = 5.0
) -> jax.Array:
    """:func:`~at_jax.distill.features.vid_loss` summed over the pairs (the reference: every
    group's output, ``feat[1:-1]``)."""
    out.require_teacher("vid")
    regress = out.term_module("vid")
    assert regress is not None
    return _total(features.vid_loss(*p) for p in regress(out.student_acts, out.teacher_acts))


@register_term("rkd", needs_teacher=True, check=_check_feature)
def rkd_term(
    out: StepOutputs,
    feature: str = "features",
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> jax.Array:
    """:func:`~at_jax.distill.relational.rkd_loss` of ``feature`` (the pooled vector)."""
    out.require_teacher("rkd")
    return relational.rkd_loss(*_feature(out, feature, "rkd"), distance_weight, angle_weight)


@register_term("pkt", needs_teacher=True, check=_check_feature)
def pkt_term(out: StepOutputs, feature: str = "features") -> jax.Array:
    """:func:`~at_jax.distill.relational.pkt_loss` of ``feature`` (the pooled vector)."""
    out.require_teacher("pkt")
    return relational.pkt_loss(*_feature(out, feature, "pkt"))


@register_term("nst", needs_teacher=True, check=_check_pairs)
def nst_term(out: StepOutputs, pairs: losses.Pairs = "groups") -> jax.Array:
    """:func:`~at_jax.distill.features.nst_loss` summed over the pairs (every group)."""
    out.require_teacher("nst")
    return _total(
        features.nst_loss(out.student_acts[s], out.teacher_acts[t])
        for s, t in _pairs(out.student_acts, out.teacher_acts, pairs)
    )


@register_term("dkd", needs_teacher=True)
def dkd_term(
    out: StepOutputs,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    warmup: int = 20,
) -> jax.Array:
    """:func:`~at_jax.distill.logits.dkd_loss` × :func:`~at_jax.distill.logits.dkd_warmup` of
    the epoch (mdistiller's CIFAR-100 values; its CE weight 1.0 is the ``ce`` term's)."""
    out.require_teacher("dkd")
    assert out.teacher_logits is not None
    value = logits.dkd_loss(
        out.student_logits, out.teacher_logits, out.labels, alpha, beta, temperature
    )
    return logits.dkd_warmup(out.epoch, warmup) * value
