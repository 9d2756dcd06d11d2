"""How close a student's attention maps are to its teacher's, on held-out images.

``attention_distance`` is the quantity AT minimises, measured without augmentation on any set of
images: for each paired transfer point, the mean over images of
``|| Q_S/||Q_S|| - Q_T/||Q_T|| ||_2`` (paper eq. 2, p = 2), with the maps of
:func:`at_jax.attention.attention_map`. 0 means identical maps; orthogonal maps give sqrt(2).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from at_jax.attention import attention_map
from at_jax.data.augment import normalize
from at_jax.losses import Pairs, pair_activations
from at_jax.models import forward


def pair_distances(student_acts: Mapping[str, jax.Array], teacher_acts: Mapping[str, jax.Array],
                   pairs: Pairs = "groups", p: float = 2.0, reduce: str = "mean"
                   ) -> dict[str, jax.Array]:
    """Per example, ``|| Q_S/||Q_S|| - Q_T/||Q_T|| ||_2`` for each paired transfer point, keyed
    ``"student<-teacher"`` (the teacher's map resized to the student's where they differ)."""
    out = {}
    for s, t in pair_activations(student_acts, teacher_acts, pairs):
        q_s = attention_map(student_acts[s], p, reduce)
        q_t = attention_map(teacher_acts[t], p, reduce, size=student_acts[s].shape[1:3])
        out[f"{s}<-{t}"] = jnp.linalg.norm(q_s - q_t, axis=-1)
    return out


def attention_distance(student: tuple, teacher: tuple, images_u8: np.ndarray, mean, std,
                       pairs: Pairs = "groups", p: float = 2.0, reduce: str = "mean",
                       batch_size: int = 500) -> Mapping[str, float]:
    """Mean L2 distance between normalised student and teacher attention maps.

    ``student`` and ``teacher`` are ``(flax_module, variables)``, run in eval mode on uint8
    ``images_u8`` (normalised with ``mean``/``std``). Returns ``{"student<-teacher": distance}``
    per pair (maps resized to the student's size where they differ) and their average as
    ``"mean"``. Training runs with a teacher log the same quantity on the test set at every
    evaluation (``test/attention/...`` in metrics.jsonl).
    """
    if len(images_u8) == 0:
        raise ValueError("attention_distance needs at least one image")

    (s_model, s_vars), (t_model, t_vars) = student, teacher

    @jax.jit
    def batch_sums(s_vars, t_vars, x):
        x = normalize(x, mean, std)
        _, s_acts, _ = forward(s_model, s_vars, x)
        _, t_acts, _ = forward(t_model, t_vars, x)
        return {k: jnp.sum(v) for k, v in pair_distances(s_acts, t_acts, pairs, p, reduce).items()}

    totals = None
    for start in range(0, len(images_u8), batch_size):
        sums = jax.device_get(batch_sums(s_vars, t_vars, images_u8[start:start + batch_size]))
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
    result = {k: float(v) / len(images_u8) for k, v in totals.items()}
    result["mean"] = float(np.mean(list(result.values())))
    return result
