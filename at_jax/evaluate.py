"""One batched evaluator for students (every seed at once) and teachers: top-1/top-5 error.

Evaluation batches are ``{"image": uint8 (B, H, W, C), "label": (B,), "mask": (B,)}`` global
arrays (``mask`` 0 marks the padding that gives every batch the same shape), from the in-memory
path (:func:`at_jax.data.batching.array_batches`) or the streamed one
(:mod:`at_jax.data.pipeline`). Errors are summed on the device; the host syncs once per
evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from at_jax.analysis import pair_distances
from at_jax.attention_copy import NO_COPY, VIT_PAIRS, AttentionCopy, attention_distances
from at_jax.metrics import error_counts
from at_jax.models import forward
from at_jax.preprocess import normalize
from at_jax.seeds import map_seeds

__all__ = ["make_eval_fn", "student_eval_fn", "evaluate", "student_variables"]


def make_eval_fn(
    model: nn.Module,
    mean,
    std,
    dtype=jnp.float32,
    seeds: int = 0,
    teacher_model: Optional[nn.Module] = None,
    pairs: Any = None,
    seed_strategy: str = "vmap",
    copy: AttentionCopy = NO_COPY,
    pool: str = "map",
) -> Callable:
    """``jit((variables, batch, teacher_variables) -> sums)`` in eval mode.

    Sums over the batch's unmasked examples: ``errors``, ``top5_errors``, ``count`` and, with a
    ``teacher_model`` and ``pairs`` (see :func:`at_jax.losses.pair_activations`), the attention
    distance to the teacher per pair (``attention/<student><-<teacher>``, see
    :func:`at_jax.analysis.pair_distances`; for ``pairs`` =
    :data:`~at_jax.attention_copy.VIT_PAIRS`, two ViTs' attention KL per block,
    :func:`~at_jax.attention_copy.attention_distances`; ``pool`` as the AT term's). With
    ``copy`` on, the student runs with the teacher's attention, as it trained. With ``seeds``
    (their number), ``variables`` have a leading seed axis and every sum has one too;
    ``seed_strategy`` "vmap" or "unroll" as the train step's
    (:meth:`at_jax.step.Step.seed_strategy`)."""

    def single(variables, batch, teacher_variables):
        x = normalize(batch["image"], mean, std, dtype)
        if teacher_model is None or (pairs is None and not copy.on):
            logits, _, _ = forward(model, variables, x)
            return error_counts(logits, batch["label"], batch["mask"])
        _, t_acts, _ = forward(teacher_model, teacher_variables, x.astype(jnp.float32))
        logits, s_acts, _ = forward(model, variables, x, **copy.student_inputs(t_acts))
        out = error_counts(logits, batch["label"], batch["mask"])
        mask = batch["mask"].astype(jnp.float32)
        if pairs is None:
            return out
        if pairs == VIT_PAIRS:
            distances = attention_distances(s_acts, t_acts)
        else:
            distances = pair_distances(s_acts, t_acts, pairs, pool=pool)
        for name, dist in distances.items():
            out[f"attention/{name}"] = jnp.sum(dist * mask)
        return out

    if not seeds:
        return jax.jit(single)
    return jax.jit(map_seeds(single, seeds, seed_strategy, (0, None, None)))


def student_variables(state) -> dict:
    """Eval-mode variables of a train state's student(s)."""
    variables = {"params": state.params["student"]}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    return variables


def evaluate(
    eval_fn: Callable, variables: Any, batches: Iterable[dict], teacher_variables: Any = None
) -> dict[str, np.ndarray]:
    """Test ``error`` and ``top5_error`` in %, and the attention distances the eval function
    measures (``attention/...`` and their average ``attention/mean``) — per seed when the
    variables have a seed axis."""
    totals = None
    for batch in batches:
        sums = eval_fn(variables, batch, teacher_variables if teacher_variables is not None else {})
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
        raise ValueError("evaluation got no batch: the test set is empty")
    totals = jax.device_get(totals)
    count = np.maximum(totals["count"], 1)
    result = {
        "error": 100.0 * totals["errors"] / count,
        "top5_error": 100.0 * totals["top5_errors"] / count,
    }
    distances = {k: v / count for k, v in totals.items() if k.startswith("attention/")}
    if distances:
        result.update(distances)
        result["attention/mean"] = np.mean(np.stack(list(distances.values())), axis=0)
    return result


def student_eval_fn(step: Any) -> Callable:
    """The evaluator of a run's :class:`~at_jax.step.Step`: every seed of its student, and the
    attention distance to its teacher at the step's transfer points (when it has a teacher)."""
    return make_eval_fn(
        step.model,
        step.spec.mean,
        step.spec.std,
        step.dtype,
        seeds=step.num_seeds,
        teacher_model=step.teacher_model,
        pairs=step.attention_pairs(),
        seed_strategy=step.seed_strategy(),
        copy=step.networks.copy,
        pool=step.networks.pool,
    )
