"""Transfer losses on arrays: call :func:`at_loss`, :func:`at_losses`, :func:`kd_kl`,
:func:`kd_loss`, :func:`factt_loss` from any training code (they compose with ``jax.jit``,
``jax.grad`` and ``jax.vmap``).

Formulas (docs/reference.md; Q = the attention map of :func:`at_jax.attention.attention_map`)::

    at_loss  "code":  mean over batch and positions of (Q_S/||Q_S|| − Q_T/||Q_T||)²
                      (the reference code's ``at_loss``; weight it with β = 1e3)
             "paper": mean over the batch of ||Q_S/||Q_S|| − Q_T/||Q_T|| ||_2 (eq. 2's norm;
                      eq. 2 weights it β/2)
    kd_kl    T² · mean_i KL(softmax(t_i/T) || softmax(s_i/T))
    kd_loss  α · kd_kl + (1 − α) · CE(s, y)   (the reference since 2018-07-11; ``legacy=True``:
             its earlier form, 2/C times the KL term)
    factt_loss  mean squared difference of per-sample l2-normalised full activations
    attention_distillation_loss  −Σ_keys softmax(t)·log_softmax(s) of one ViT block's attention
             logits, mean over batch, heads and queries (Li et al. 2024, the port's ``distill``)
    qkv_distillation_loss  mean squared difference of q, k or v (the port's ``distill_q/k/v``)

The teacher's side of every function is wrapped in ``jax.lax.stop_gradient``: differentiating
any of them gives no gradient to the teacher, whatever your code differentiates.

Activations are NHWC by default; ``channel_axis=1`` takes NCHW (PyTorch's layout) and gives the
same numbers. Feature maps of different resolutions are compared after average-pooling the larger
to the smaller, which must be the same integer multiple of it in height and width (else a
``ValueError`` names both shapes); ``at_loss(pool="activation")`` pools the larger activation
adaptively at any ratio, as RepDistiller. Activations are paired by name with
:func:`pair_activations`. The objective that the CLI trains, a weighted sum of named terms
built on these functions, is :mod:`at_jax.objective`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import optax

from at_jax.attention import (
    POOLS,
    attention_map,
    channels_last,
    common_size,
    normalize_rows,
    pool_map,
    pool_to_smaller,
    safe_norm,
)
from at_jax.naming import natural_key, natural_sorted, unknown_names_message
from at_jax.precision import upcast
from at_jax.vit_losses import attention_distillation_loss, qkv_distillation_loss

__all__ = [
    "at_loss",
    "at_losses",
    "kd_kl",
    "kd_loss",
    "factt_loss",
    "attention_distillation_loss",
    "qkv_distillation_loss",
    "cross_entropy",
    "pair_activations",
    "pair_name",
    "AT_MODES",
    "Pairs",
]

AT_MODES = ("code", "paper")

Pairs = Union[str, Sequence[Union[str, Sequence[str]]]]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of (B, K) logits with (B,) integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(upcast(logits), labels).mean()


def at_loss(
    student_act: jax.Array,
    teacher_act: jax.Array,
    p: float = 2.0,
    reduce: str = "mean",
    mode: str = "code",
    normalize: Optional[str] = "l2",
    *,
    channel_axis: int = -1,
    pool: str = "map",
) -> jax.Array:
    """Attention-transfer loss between one pair of activations (paper eq. 2).

    Args:
      student_act: (B, H, W, C_s) student activations (``channel_axis=1``: (B, C_s, H, W)).
      teacher_act: (B, H', W', C_t) teacher activations; channel counts may differ. If the
        spatial sizes differ, the larger map is average-pooled to the smaller (see
        :func:`at_jax.attention.common_size`).
      p, reduce, normalize: the attention map (:func:`at_jax.attention.attention_map`).
      mode: "code" — the reference code's mean over batch and positions of the squared
        difference of normalised maps (weight it β = 1e3, the published numbers); "paper" —
        eq. 2's per-sample l2 norm of the difference, averaged over the batch (eq. 2 weights it
        β/2).
      channel_axis: the channel axis of both arrays.
      pool: where maps of two sizes are made comparable: "map" (the default) average-pools
        the larger *map* by an integer factor and refuses other ratios (a wrong layout fails
        loudly); "activation" is RepDistiller's ``Attention.at_loss``: the *activation* of the
        larger height adaptive-average-pooled (PyTorch's ``adaptive_avg_pool2d``, any ratio) to
        the other's size before its map (:func:`at_jax.attention.pool_to_smaller`). The two
        agree where the sizes are equal (every pair of the 2017 paper).

    Returns:
      A float32 scalar. No gradient reaches ``teacher_act``.
    """
    if mode not in AT_MODES:
        raise ValueError(f"at_loss mode must be one of {AT_MODES}, got {mode!r}")
    if pool not in POOLS:
        raise ValueError(f"at_loss pool must be one of {POOLS}, got {pool!r}")
    if student_act.shape[0] != teacher_act.shape[0]:
        raise ValueError(
            f"student and teacher batch sizes differ: {tuple(student_act.shape)} "
            f"vs {tuple(teacher_act.shape)}"
        )
    teacher_act = jax.lax.stop_gradient(teacher_act)
    size = None
    if pool == "activation":
        student_act, teacher_act = pool_to_smaller(
            channels_last(student_act, channel_axis), channels_last(teacher_act, channel_axis)
        )
        channel_axis = -1
    else:
        size = common_size(student_act.shape, teacher_act.shape, channel_axis)
    qs, qt = (
        attention_map(a, p, reduce, normalize, size=size, channel_axis=channel_axis)
        for a in (student_act, teacher_act)
    )
    diff = qs - qt
    if mode == "code":
        return jnp.mean(diff * diff)
    return jnp.mean(safe_norm(diff, 2, axis=-1))


def pair_name(student: str, teacher: str) -> str:
    """The key of a (student, teacher) pair in :func:`at_losses`'s per-pair dict: ``"s:t"``."""
    return f"{student}:{teacher}"


def at_losses(
    student_acts: Mapping[str, jax.Array],
    teacher_acts: Mapping[str, jax.Array],
    pairs: Pairs,
    *,
    p: float = 2.0,
    reduce: str = "mean",
    mode: str = "code",
    normalize: Optional[str] = "l2",
    channel_axis: int = -1,
    pool: str = "map",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`at_loss` over several transfer points: ``(total, per_pair)``.

    Args:
      student_acts, teacher_acts: name -> activations (from :func:`at_jax.capture.capture`, or
        the sown activations of at_jax's models).
      pairs: ``[(student_name, teacher_name), ...]``, names present in both (``["layer3",
        "layer4"]``), ``"s:t"`` strings, a comma-separated string of those, or ``"groups"`` /
        ``"blocks"`` (see :func:`pair_activations`).
      p, reduce, mode, normalize, channel_axis, pool: as :func:`at_loss`.

    Returns:
      ``total``, the unweighted sum over pairs (the reference code's ``sum(at_losses)``; multiply
      it by β), and ``per_pair``, ``"s:t"`` -> that pair's value. No gradient reaches the teacher.

    Example::

        total, per_pair = at_losses(s_acts, t_acts, [("stage2", "layer3")])
        loss = ce + 1e3 * total
    """
    per_pair = {
        pair_name(s, t): at_loss(
            student_acts[s],
            teacher_acts[t],
            p,
            reduce,
            mode,
            normalize,
            channel_axis=channel_axis,
            pool=pool,
        )
        for s, t in pair_activations(student_acts, teacher_acts, pairs)
    }
    return sum(per_pair.values(), jnp.zeros((), jnp.float32)), per_pair


def kd_kl(
    student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 4.0
) -> jax.Array:
    """Hinton's distillation term without the cross-entropy: ``T² · mean_i KL(p_T,i || p_S,i)``
    with ``p = softmax(logits / T)``, summed over classes and averaged over the batch.

    Args:
      student_logits, teacher_logits: (B, K).
      temperature: T (the paper: 4 for its ResNet transfers).

    Returns:
      A float32 scalar. No gradient reaches ``teacher_logits``.
    """
    t = temperature
    log_p = jax.nn.log_softmax(upcast(student_logits) / t, axis=-1)
    log_q = jax.nn.log_softmax(upcast(jax.lax.stop_gradient(teacher_logits)) / t, axis=-1)
    return jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1).mean() * t * t


def kd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    temperature: float = 4.0,
    alpha: float = 0.9,
    legacy: bool = False,
) -> jax.Array:
    """Knowledge distillation exactly as the reference ``distillation()``:
    ``α · kd_kl + (1 − α) · CE(student_logits, labels)``.

    ``legacy=True`` is the reference before 2018-07-11: ``kl_div``'s old default averaged over
    every one of the B×C elements, so its KL term is ``2/C · kd_kl`` (5× smaller on CIFAR-10,
    50× on CIFAR-100) — the form the paper's CIFAR-10 numbers came from.

    Args:
      student_logits, teacher_logits: (B, C); labels: (B,) integers.

    Returns:
      A float32 scalar. No gradient reaches ``teacher_logits``.
    """
    kl = kd_kl(student_logits, teacher_logits, temperature)
    if legacy:
        kl = kl * 2.0 / student_logits.shape[-1]
    return alpha * kl + (1.0 - alpha) * cross_entropy(student_logits, labels)


def factt_loss(
    student_act: jax.Array, teacher_act: jax.Array, *, channel_axis: int = -1
) -> jax.Array:
    """F-ActT (full-activation transfer): the mean squared difference of per-sample
    l2-normalised activations (each flattened over H, W, C).

    Args:
      student_act: (B, H, W, C) — already with the teacher's channel count (adapt it with a 1×1
        convolution first, as :class:`at_jax.objective.FActTAdapters`).
      teacher_act: (B, H', W', C); the larger spatial size is average-pooled to the smaller.
      channel_axis: the channel axis of both arrays.

    Returns:
      A float32 scalar. No gradient reaches ``teacher_act``.
    """
    s = upcast(channels_last(student_act, channel_axis))
    t = upcast(channels_last(jax.lax.stop_gradient(teacher_act), channel_axis))
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(
            f"F-ActT needs equal channel counts (got {s.shape[-1]} and "
            f"{t.shape[-1]}); adapt the student with a 1x1 conv first"
        )
    size = common_size(s.shape, t.shape)
    s, t = (_pool_channels(x, size) for x in (s, t))
    b = s.shape[0]
    diff = normalize_rows(s.reshape(b, -1)) - normalize_rows(t.reshape(b, -1))
    return jnp.mean(diff * diff)


def _pool_channels(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Average-pool every channel of NHWC ``x`` to ``size``."""
    b, h, w, c = x.shape
    if (h, w) == tuple(size):
        return x
    maps = jnp.moveaxis(x, -1, 1).reshape(b * c, h, w)
    return jnp.moveaxis(pool_map(maps, size).reshape(b, c, *size), 1, -1)


# --------------------------------------------------------------------------- pairing activations

_TRANSFER_POINT = re.compile(r"^(group|block|layer)\d+$")
_WRN_BLOCK = re.compile(r"^group\d+\.block\d+$")
_PREACT = re.compile(r"^(group|block|layer)\d+\.preact$")
_NAMED_PAIRS = {"groups": _TRANSFER_POINT, "blocks": _WRN_BLOCK, "preact": _PREACT}


def _sorted_names(names: Any, pattern: re.Pattern) -> list[str]:
    return sorted((n for n in names if pattern.match(n)), key=natural_key)


def pair_activations(
    student_acts: Mapping[str, Any], teacher_acts: Mapping[str, Any], pairs: Pairs = "groups"
) -> list[tuple[str, str]]:
    """Choose (student_name, teacher_name) pairs of activations.

    ``"groups"``: at_jax's models' transfer points (WRN ``group*``, NIN ``block*``, ResNet
    ``layer*``), paired in order — the paper's one loss per group for networks of different
    depth. ``"blocks"``: every WRN block, for student and teacher of the same depth.
    ``"preact"``: each group's pre-activation (``group*.preact``, ``layer*.preact``: AB's).
    A sequence: names present in both (``["group1", "group2"]``), explicit pairs
    (``[("stage2", "layer3")]``) or ``"s:t"`` strings; or the same as one comma-separated
    string (``"layer3,layer4"``, ``"stage2:layer3,stage3:layer4"``), the form that a
    command-line override gives (``--config.loss.at.pairs=layer3,layer4``).

    Raises ``ValueError`` listing both sides' names when a name is missing.
    """
    if isinstance(pairs, str) and pairs not in _NAMED_PAIRS:
        if not pairs.strip() or not all(p.strip() for p in pairs.split(",")):
            raise ValueError(
                f"pairs must be 'groups', 'blocks' or names such as 'layer3,layer4', got {pairs!r}"
            )
        pairs = [p.strip() for p in pairs.split(",")]
    if isinstance(pairs, str):
        pattern = _NAMED_PAIRS[pairs]
        s_names = _sorted_names(student_acts, pattern)
        t_names = _sorted_names(teacher_acts, pattern)
        if not s_names or len(s_names) != len(t_names):
            raise ValueError(
                f"cannot pair {pairs!r}: student has {s_names}, teacher has {t_names} "
                f"(all student names: {natural_sorted(student_acts)}; teacher: "
                f"{natural_sorted(teacher_acts)})"
                + (
                    " (per-block pairing needs student and teacher of the same depth)"
                    if pairs == "blocks"
                    else ". 'groups' pairs at_jax's own transfer points (group*, block*, layer*); "
                    "for other models name the pairs, e.g. [('stage2', 'layer3')]"
                )
            )
        return list(zip(s_names, t_names, strict=True))
    result = []
    for item in pairs:
        if isinstance(item, str):
            s, t = (part.strip() for part in item.split(":", 1)) if ":" in item else (item, item)
        else:
            s, t = tuple(item)
        sides = [
            (side, n, acts)
            for side, n, acts in (("student", s, student_acts), ("teacher", t, teacher_acts))
            if n not in acts
        ]
        if sides:
            raise ValueError(
                f"cannot pair {s!r} with {t!r}: "
                + " and ".join(f"the {side} has no {n!r}" for side, n, _ in sides)
                + "".join(
                    f"; the {side}'s {unknown_names_message([n], acts)}" for side, n, acts in sides
                )
            )
        result.append((s, t))
    return result
