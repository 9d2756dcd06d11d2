"""The baselines with a stage of their own (``ab``, ``fsp``, ``ft``: RepDistiller's
``init_epochs``, :mod:`at_jax.stages`) and the one with a memory (``crd``), as objective terms
on the array functions of :mod:`at_jax.distill.stagewise` and :mod:`at_jax.distill.contrastive`.

Feature points, as RepDistiller's: AB the groups' pre-activations (``pairs="preact"``:
``group{g}.preact`` of at_jax's WRN, ``layer{k}.preact`` of its ResNet; the reference's
``feat[1:-1]`` with ``preact=True``); FSP the stem and every group (``points="stem,groups"``,
``feat[:-1]``); FT the last group's output (``feat[-2]``); CRD the pooled vector
(``features``, ``feat[-1]``). Stages: ``ab`` and ``fsp`` train only in their first stage (the
student's layers but the classifier, with AB's connectors), then the student trains with
cross-entropy alone (the reference's ``loss_kd = 0``); ``ft`` trains its paraphraser alone
first (``init_lr`` 0.01, the reference's for its CIFAR ResNets and WRNs; the student frozen),
then the student and the translator with the factor loss, the paraphraser frozen.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from at_jax import losses
from at_jax.distill import contrastive, stagewise
from at_jax.terms import InitStage, StepOutputs, TermData, register_term

__all__ = ["ABConnectors", "FTModules", "CRDEmbeddings", "REFERENCE_WEIGHTS", "fsp_points"]

# β of the reference's scripts/run_cifar_distill.sh (AB and FSP: the first stage's loss has
# weight 1 and the main stage none, whatever β is)
REFERENCE_WEIGHTS = {"ab": 1.0, "fsp": 50.0, "ft": 200.0, "crd": 0.8}


class ABConnectors(nn.Module):
    """AB's :class:`~at_jax.distill.stagewise.Connector` per pair of pre-activations."""

    pairs: tuple[tuple[str, str, int, tuple[int, int], tuple[int, int]], ...]
    reads_teacher = False

    @nn.compact
    def __call__(self, student_acts: Mapping[str, jax.Array]) -> list[jax.Array]:
        return [
            stagewise.Connector(c, s_size, t_size, name=f"pair{i}")(student_acts[s])
            for i, (s, _, c, s_size, t_size) in enumerate(self.pairs)
        ]


def ab_module(student_acts, teacher_acts, pairs: losses.Pairs = "preact", margin: float = 1.0):
    if not teacher_acts:
        return None
    found = losses.pair_activations(student_acts, teacher_acts, pairs)
    return ABConnectors(
        tuple(
            (
                s,
                t,
                teacher_acts[t].shape[-1],
                tuple(student_acts[s].shape[1:3]),
                tuple(teacher_acts[t].shape[1:3]),
            )
            for s, t in found
        )
    )


@register_term("ab", needs_teacher=True, module=ab_module, init_stage=InitStage(trains="features"))
def ab_term(out: StepOutputs, pairs: losses.Pairs = "preact", margin: float = 1.0) -> jax.Array:
    """:func:`~at_jax.distill.stagewise.ab_loss` of the connected student pre-activations and
    the teacher's (every group's, ``pairs="preact"``); trained in AB's first stage only."""
    out.require_teacher("ab")
    connect = out.term_module("ab")
    assert connect is not None
    found = losses.pair_activations(out.student_acts, out.teacher_acts, pairs)
    return stagewise.ab_loss(
        connect(out.student_acts), [out.teacher_acts[t] for _, t in found], margin
    )


def fsp_points(acts: Mapping[str, Any], points: str) -> list[str]:
    """The names of FSP's feature points in ``acts``: ``"stem,groups"`` (the stem, then every
    group: the reference's ``feat[:-1]``) or comma-separated names."""
    names: list[str] = []
    for part in (p.strip() for p in points.split(",")):
        if part == "groups":
            names += [s for s, _ in losses.pair_activations(acts, acts, "groups")]
        elif part in acts:
            names.append(part)
        else:
            raise ValueError(
                f"loss term 'fsp': no feature point {part!r} (there are: {', '.join(sorted(acts))})"
            )
    return names


def _check_fsp(student_acts, teacher_acts, points: str = "stem,groups") -> None:
    s_names, t_names = fsp_points(student_acts, points), fsp_points(teacher_acts, points)
    s_ch = [student_acts[n].shape[-1] for n in s_names]
    t_ch = [teacher_acts[n].shape[-1] for n in t_names]
    if s_ch != t_ch:
        raise ValueError(
            f"loss term 'fsp' pairs networks of the same widths at {points!r}: the student has "
            f"{s_ch} channels there, the teacher {t_ch}"
        )


@register_term("fsp", needs_teacher=True, init_stage=InitStage(trains="features"), check=_check_fsp)
def fsp_term(out: StepOutputs, points: str = "stem,groups") -> jax.Array:
    """:func:`~at_jax.distill.stagewise.fsp_loss` between consecutive ``points``; trained in
    FSP's first stage only (the student's layers)."""
    out.require_teacher("fsp")
    s_names, t_names = fsp_points(out.student_acts, points), fsp_points(out.teacher_acts, points)
    return stagewise.fsp_loss(
        [out.student_acts[n] for n in s_names], [out.teacher_acts[n] for n in t_names]
    )


class FTModules(nn.Module):
    """FT's paraphraser (of the teacher's map ``teacher``) and translator (of the student's
    ``student``): ``(translated factor, paraphrased factor, reconstruction)``."""

    student: str
    teacher: str
    teacher_channels: int
    rate: float = 0.5
    reads_teacher = True

    @nn.compact
    def __call__(self, student_acts, teacher_acts):
        f_t = jax.lax.stop_gradient(teacher_acts[self.teacher])
        factor_t, reconstruction = stagewise.Paraphraser(
            self.teacher_channels, self.rate, name="paraphraser"
        )(f_t)
        factor_s = stagewise.Translator(self.teacher_channels, self.rate, name="translator")(
            student_acts[self.student]
        )
        return factor_s, factor_t, reconstruction


def _ft_pair(student_acts, teacher_acts, pairs: losses.Pairs) -> tuple[str, str]:
    return losses.pair_activations(student_acts, teacher_acts, pairs)[-1]


def ft_module(student_acts, teacher_acts, pairs="groups", p1=2.0, p2=1.0, rate=0.5, stage="main"):
    if not teacher_acts:
        return None
    s, t = _ft_pair(student_acts, teacher_acts, pairs)
    return FTModules(s, t, teacher_acts[t].shape[-1], rate)


@register_term(
    "ft",
    needs_teacher=True,
    module=ft_module,
    init_stage=InitStage(trains="term", main=True, keeps=("paraphraser",), init_lr=0.01),
)
def ft_term(
    out: StepOutputs,
    pairs: losses.Pairs = "groups",
    p1: float = 2.0,
    p2: float = 1.0,
    rate: float = 0.5,
    stage: str = "main",
) -> jax.Array:
    """FT on the last of ``pairs`` (the last group): in its first stage (``stage="init"``) the
    paraphraser's :func:`~at_jax.distill.stagewise.reconstruction_loss` of the teacher's map,
    then :func:`~at_jax.distill.stagewise.factor_loss` of the translated student map and the
    paraphrased teacher's."""
    out.require_teacher("ft")
    if stage not in ("init", "main"):
        raise ValueError(f"loss term 'ft': stage must be 'init' or 'main', got {stage!r}")
    modules = out.term_module("ft")
    assert modules is not None
    factor_s, factor_t, reconstruction = modules(out.student_acts, out.teacher_acts)
    if stage == "init":
        _, t = _ft_pair(out.student_acts, out.teacher_acts, pairs)
        return stagewise.reconstruction_loss(reconstruction, out.teacher_acts[t])
    return stagewise.factor_loss(factor_s, jax.lax.stop_gradient(factor_t), p1, p2)


class CRDEmbeddings(nn.Module):
    """CRD's two :class:`~at_jax.distill.contrastive.Embed` heads (``embed_s``, ``embed_t``) of
    the student's and the teacher's ``feature``, both trained."""

    feature: str
    dim: int = contrastive.FEAT_DIM
    reads_teacher = True

    @nn.compact
    def __call__(self, student_acts, teacher_acts) -> tuple[jax.Array, jax.Array]:
        s, _, t = self.feature.partition(":")
        f_t = jax.lax.stop_gradient(teacher_acts[t or s])
        embed = lambda name: contrastive.Embed(self.dim, name=name)  # noqa: E731
        return embed("embed_s")(student_acts[s]), embed("embed_t")(f_t)


def crd_module(student_acts, teacher_acts, feature="features", dim=contrastive.FEAT_DIM, **_):
    return CRDEmbeddings(feature, dim) if teacher_acts else None


def crd_state(student_acts, teacher_acts, data: TermData, dim=contrastive.FEAT_DIM, **_):
    """``key -> {"memory": CRDState, "classes": ClassIndex}`` for the training set ``data``."""
    if data.labels is None:
        raise ValueError(
            "loss term 'crd' draws its negatives from other classes: it needs the training "
            "set's labels (Networks(term_data=TermData(n_train, labels)))"
        )
    labels = np.asarray(data.labels)
    if len(labels) != data.n_train:
        raise ValueError(f"crd: {len(labels)} labels for a training set of {data.n_train}")
    classes = contrastive.class_index(labels)
    return lambda key: {
        "memory": contrastive.init_crd_state(key, data.n_train, dim),
        "classes": classes,
    }


@register_term("crd", needs_teacher=True, module=crd_module, state=crd_state)
def crd_term(
    out: StepOutputs,
    feature: str = "features",
    dim: int = contrastive.FEAT_DIM,
    k: int = contrastive.NCE_K,
    temperature: float = contrastive.NCE_T,
    momentum: float = contrastive.NCE_M,
) -> tuple[jax.Array, dict]:
    """:func:`~at_jax.distill.contrastive.crd_loss` of the embedded ``feature`` (the pooled
    vector) against ``k`` negatives of other classes drawn from the memory banks (the
    reference's 16384, T 0.07, momentum 0.5), and the banks updated at the batch's indices."""
    out.require_teacher("crd")
    state = out.term_state("crd")
    indices = out.require_example_index("crd")
    embed = out.term_module("crd")
    assert embed is not None
    v_s, v_t = embed(out.student_acts, out.teacher_acts)
    contrast = contrastive.sample_contrast_indices(
        out.term_key("crd"), state["classes"], indices, out.labels, k
    )
    loss, memory = contrastive.crd_loss(v_s, v_t, state["memory"], contrast, temperature, momentum)
    return loss, {**state, "memory": memory}
