"""How close a student's attention maps are to its teacher's: call :func:`attention_distance`.

The distance is the quantity AT minimises, measured without augmentation on any set of images:
for each paired transfer point, the mean over images of ``|| Q_S/||Q_S|| - Q_T/||Q_T|| ||_2``
(paper eq. 2, p = 2), with the maps of :func:`at_jax.attention.attention_map`. 0 means identical
maps; orthogonal maps give sqrt(2). It works for any pair of models given as functions
``x -> (logits, acts)`` — built with :func:`at_jax.capture.model_fn`, a
:class:`at_jax.runs.Teacher`, or at_jax's own ``(module, variables)`` pairs::

    teacher = load_teacher("runs/fashion_mnist/wrn-16-2")
    student = model_fn(my_model, names=["stage1", "stage2"], variables=my_vars)
    attention_distance(student, teacher, test_images_u8, pairs=[("stage1", "group1"),
                                                                ("stage2", "group2")],
                       preprocess=teacher.preprocess)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from at_jax.attention import (
    attention_map,
    channels_last,
    common_size,
    pool_to_smaller,
    safe_norm,
)
from at_jax.losses import Pairs, pair_activations
from at_jax.models import forward
from at_jax.preprocess import normalize

__all__ = ["attention_distance", "pair_distances", "as_model_fn", "preprocess_for"]

ModelFn = Callable[[Any], tuple[Any, Mapping[str, jax.Array]]]
Preprocess = Union[None, Callable[[Any], Any], Mapping[str, Callable[[Any], Any]]]


def preprocess_for(preprocess: Preprocess, labels: Sequence[str]) -> dict[str, Any]:
    """``label -> function or None`` for each model: one function for every model, or a mapping
    ``label -> function`` (a model without an entry gets its input as it is). An entry for an
    unknown label raises, naming the labels."""
    if preprocess is None or callable(preprocess):
        return dict.fromkeys(labels, preprocess)
    if not isinstance(preprocess, Mapping):
        raise TypeError(
            "preprocess must be a function or a mapping label -> function, got "
            f"{type(preprocess).__name__}"
        )
    unknown = [k for k in preprocess if k not in labels]
    if unknown:
        raise ValueError(
            f"preprocess has entries for {unknown}, which are not models here: the labels are "
            f"{list(labels)}"
        )
    bad = [k for k, f in preprocess.items() if not callable(f)]
    if bad:
        raise TypeError(f"preprocess[{bad[0]!r}] is not a function")
    return {label: preprocess.get(label) for label in labels}


def as_model_fn(model: Any) -> ModelFn:
    """``x -> (logits, acts)`` of a model given as such a function (a :class:`Teacher`, or one
    built with :func:`at_jax.capture.model_fn`) or as an at_jax ``(module, variables)`` pair
    (eval mode, its sown transfer points)."""
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], nn.Module):
        module, variables = model
        return lambda x: forward(module, variables, x)[:2]
    if callable(model):
        return model
    raise TypeError(
        "a model here is a function x -> (logits, acts) (at_jax.capture.model_fn, "
        f"a Teacher) or an at_jax (module, variables) pair; got {type(model).__name__}"
    )


def pair_distances(
    student_acts: Mapping[str, jax.Array],
    teacher_acts: Mapping[str, jax.Array],
    pairs: Pairs = "groups",
    p: float = 2.0,
    reduce: str = "mean",
    channel_axis: int = -1,
    pool: str = "map",
) -> dict[str, jax.Array]:
    """Per example, ``|| Q_S/||Q_S|| - Q_T/||Q_T|| ||_2`` for each paired transfer point, keyed
    ``"student<-teacher"`` (maps of two sizes made comparable as ``pool`` says, see
    :func:`at_jax.losses.at_loss`: the larger map pooled by an integer factor, or the larger
    activation adaptively)."""
    out = {}
    for s, t in pair_activations(student_acts, teacher_acts, pairs):
        a_s, a_t, axis, size = student_acts[s], teacher_acts[t], channel_axis, None
        if pool == "activation":
            a_s, a_t = pool_to_smaller(channels_last(a_s, axis), channels_last(a_t, axis))
            axis = -1
        else:
            size = common_size(a_s.shape, a_t.shape, axis)
        q_s, q_t = (attention_map(a, p, reduce, size=size, channel_axis=axis) for a in (a_s, a_t))
        out[f"{s}<-{t}"] = safe_norm(q_s - q_t, 2, axis=-1)
    return out


def attention_distance(
    student: Any,
    teacher: Any,
    images: np.ndarray,
    mean: Any = None,
    std: Any = None,
    pairs: Pairs = "groups",
    p: float = 2.0,
    reduce: str = "mean",
    batch_size: int = 500,
    *,
    preprocess: Preprocess = None,
    channel_axis: int = -1,
    pool: str = "map",
) -> dict[str, float]:
    """Mean l2 distance between the normalised attention maps of a student and its teacher.

    Args:
      student, teacher: functions ``x -> (logits, acts)`` (:func:`at_jax.capture.model_fn`, a
        :class:`at_jax.runs.Teacher`) or at_jax ``(module, variables)`` pairs; run on the same
        input batches.
      images: the images, in batches of ``batch_size``.
      mean, std: if given, ``images`` are uint8 and are scaled to [0, 1] and normalised with
        them first (at_jax's preprocessing); ``preprocess``: any other function applied to each
        batch first (e.g. ``teacher.preprocess``), or one per model, ``{"student": f,
        "teacher": g}`` (two models that take different inputs; a model without an entry gets
        the batch as it is). Without either, batches go to the models as they are (a
        :class:`Teacher` preprocesses uint8 images itself).
      pairs: ``[(student_name, teacher_name), ...]``, ``"s:t"`` strings, or ``"groups"`` (at_jax's
        transfer points), as :func:`at_jax.losses.pair_activations`; an unknown name raises
        with both models' names.
      p, reduce, channel_axis: the attention maps (:func:`at_jax.attention.attention_map`).
      pool: how maps of two sizes are compared, as :func:`at_jax.losses.at_loss`'s.

    Returns:
      ``{"student<-teacher": distance}`` per pair and their average as ``"mean"``. Training runs
      with a teacher log the same quantity on the test set at every evaluation
      (``test/attention/...`` in metrics.jsonl).
    """
    if len(images) == 0:
        raise ValueError("attention_distance needs at least one image")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std (uint8 images), or neither")
    if mean is not None and preprocess is not None:
        raise ValueError("give mean/std or preprocess, not both")
    student_fn, teacher_fn = as_model_fn(student), as_model_fn(teacher)
    if mean is not None:

        def preprocess(x: jax.Array) -> jax.Array:
            return normalize(x, mean, std)

    prep = preprocess_for(preprocess, ("student", "teacher"))

    def model_input(label: str, x: jax.Array) -> jax.Array:
        f = prep[label]
        return x if f is None else f(x)

    @jax.jit
    def batch_sums(x: jax.Array) -> dict[str, jax.Array]:
        _, s_acts = student_fn(model_input("student", x))
        _, t_acts = teacher_fn(model_input("teacher", x))
        distances = pair_distances(s_acts, t_acts, pairs, p, reduce, channel_axis, pool)
        return {k: jnp.sum(v) for k, v in distances.items()}

    totals: Optional[dict] = None
    for start in range(0, len(images), batch_size):
        sums = jax.device_get(batch_sums(jnp.asarray(images[start : start + batch_size])))
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
    assert totals is not None
    result = {k: float(v) / len(images) for k, v in totals.items()}
    result["mean"] = float(np.mean(list(result.values())))
    return result
