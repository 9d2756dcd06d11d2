"""Evaluation batches of arrays held in memory: :func:`array_batches`, :func:`eval_batch_size`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import numpy as np
from jax.sharding import Mesh

from at_jax.sharding import global_array, sharded

__all__ = ["array_batches", "eval_batch_size"]


def eval_batch_size(requested: int, n_examples: int, n_devices: int) -> int:
    """An evaluation batch no larger than needed, split evenly over ``n_devices``."""
    size = min(int(requested), n_examples)
    return max(n_devices, size - size % n_devices)


def array_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int, mesh: Optional[Mesh] = None
) -> Iterator[dict]:
    """Evaluation batches ``{"image", "label", "mask"}`` of in-memory arrays; the last one padded
    (``mask`` 0) to ``batch_size``. With a ``mesh`` they are sharded over its ``data`` axis."""
    sharding = sharded(mesh) if mesh is not None else None
    for start in range(0, len(labels), batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        mask = np.ones(len(y), np.float32)
        if len(y) < batch_size:
            pad = batch_size - len(y)
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            y, mask = np.pad(y, (0, pad)), np.pad(mask, (0, pad))
        batch = {"image": x, "label": y, "mask": mask}
        if sharding is None:
            yield batch
        else:
            yield {k: global_array(v, sharding) for k, v in batch.items()}
