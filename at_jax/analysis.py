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


def attention_distance(student: tuple, teacher: tuple, images_u8: np.ndarray, mean, std,
                       pairs: Pairs = "groups", p: float = 2.0, reduce: str = "mean",
                       batch_size: int = 500) -> Mapping[str, float]:
    """Mean L2 distance between normalised student and teacher attention maps.

    ``student`` and ``teacher`` are ``(flax_module, variables)``, run in eval mode on uint8
    ``images_u8`` (normalised with ``mean``/``std``). Returns ``{"student<-teacher": distance}``
    per pair (maps resized to the student's size where they differ) and their average as
    ``"mean"``.
    """
    if len(images_u8) == 0:
        raise ValueError("attention_distance needs at least one image")

    (s_model, s_vars), (t_model, t_vars) = student, teacher

    @jax.jit
    def batch_sums(s_vars, t_vars, x):
        x = normalize(x, mean, std)
        _, s_acts, _ = forward(s_model, s_vars, x)
        _, t_acts, _ = forward(t_model, t_vars, x)
        out = {}
        for s, t in pair_activations(s_acts, t_acts, pairs):
            size = s_acts[s].shape[1:3]
            q_s = attention_map(s_acts[s], p, reduce)
            q_t = attention_map(t_acts[t], p, reduce, size=size)
            out[f"{s}<-{t}"] = jnp.sum(jnp.linalg.norm(q_s - q_t, axis=-1))
        return out

    totals = None
    for start in range(0, len(images_u8), batch_size):
        sums = jax.device_get(batch_sums(s_vars, t_vars, images_u8[start:start + batch_size]))
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
    result = {k: float(v) / len(images_u8) for k, v in totals.items()}
    result["mean"] = float(np.mean(list(result.values())))
    return result
