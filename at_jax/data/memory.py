"""The in-memory path for small datasets (CIFAR, Fashion-MNIST): the whole training set lives on
the devices and the train step gathers and augments its batch inside the jitted program."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

import numpy as np
from jax.sharding import Mesh

from at_jax.data.batching import array_batches, eval_batch_size
from at_jax.data.catalog import load_dataset
from at_jax.data.report import DataReport
from at_jax.data.spec import Feed, SpecFields
from at_jax.sharding import global_array, replicated, sharded

__all__ = ["InMemoryData", "MemoryBatches", "epoch_indices"]


def epoch_indices(feed: Feed, epoch: int, n_train: int, steps: int) -> np.ndarray:
    """(steps, seeds, batch) example indices: a fresh permutation per seed and epoch, derived
    from (seed, epoch) alone so that a resumed run sees exactly the batches an uninterrupted one
    would."""
    b = feed.batch_size
    perms = [
        np.random.default_rng([feed.seed + s, epoch]).permutation(n_train)[: steps * b]
        for s in range(feed.num_seeds)
    ]
    return np.stack(perms).reshape(len(perms), steps, b).transpose(1, 0, 2).astype(np.int32)


class MemoryBatches:
    """The in-memory training batches of a run from a global step on (see
    :meth:`InMemoryData.train_batches`). Their position is the step itself, so their
    checkpointable state is empty (``checkpoint_state`` None) and nothing is ever skipped."""

    checkpoint_state: Any = None

    def __init__(self, data: InMemoryData, start_step: int = 0):
        self._data, self._start = data, start_step
        self._batches: Optional[Iterator[dict]] = None
        self.report = DataReport()

    def start_at(self, step: int) -> None:
        """Continue from global step ``step`` (before the first batch is drawn)."""
        if self._batches is not None:
            raise RuntimeError("start_at must come before the first batch")
        self._start = step

    def __iter__(self) -> MemoryBatches:
        return self

    def __next__(self) -> dict:
        if self._batches is None:
            self._batches = self._data.batches_from(self._start)
        return next(self._batches)

    def close(self) -> None:
        if self._batches is not None:
            self._batches.close()  # type: ignore[attr-defined]


class InMemoryData(SpecFields):
    """An in-memory dataset of ``data_config`` (``config.data``) for ``mesh``, read as ``feed``
    says: batches, sizes and the dataset's :class:`~at_jax.data.spec.DataSpec`."""

    counts_skipped = False  # no image is decoded during the run: nothing can be skipped

    def __init__(self, data_config: Any, feed: Feed, mesh: Mesh):
        data = data_config
        self.feed, self.mesh = feed, mesh
        self.dataset = load_dataset(
            data.name, data.source, data.data_dir or None, data.train_size, data.test_size
        )
        ds = self.dataset
        self.spec = ds.spec
        self.n_train, self.n_test = len(ds.train_labels), len(ds.test_labels)
        self.description = ds.source
        self.steps_per_epoch = self.n_train // feed.batch_size
        self.eval_report = DataReport()
        self.warnings: list[str] = []  # the files were read whole: nothing to warn about later
        self._pool: dict | None = None

    def train_labels(self) -> np.ndarray:
        """The training set's labels, in the order of the pool's rows."""
        return np.asarray(self.dataset.train_labels, np.int32)

    def _pool_arrays(self) -> dict:
        if self._pool is None:
            everywhere = replicated(self.mesh)
            self._pool = {
                "pool_image": global_array(self.dataset.train_images, everywhere),
                "pool_label": global_array(self.dataset.train_labels, everywhere),
            }
        return self._pool

    def train_batches(self, start_step: int = 0) -> MemoryBatches:
        """The run's training batches from global step ``start_step`` on: global arrays
        ``{"index": (seeds, B), "pool_image", "pool_label"}`` (the step gathers seed ``s``'s
        examples ``index[s]`` from the pool)."""
        return MemoryBatches(self, start_step)

    def batches_from(self, start_step: int) -> Iterator[dict]:
        steps = self.steps_per_epoch
        sharding = sharded(self.mesh, None, None, "data")
        pool = self._pool_arrays()
        for epoch in range(start_step // steps + 1, self.feed.num_epochs + 1):
            idx = global_array(epoch_indices(self.feed, epoch, self.n_train, steps), sharding)
            for i in range(max(0, start_step - (epoch - 1) * steps), steps):
                yield {"index": idx[i], **pool}

    def eval_batches(self) -> Iterator[dict]:
        size = eval_batch_size(self.feed.eval_batch_size, self.n_test, self.mesh.size)
        return array_batches(self.dataset.test_images, self.dataset.test_labels, size, self.mesh)

    def describe_skipped(self, indices: list[int], split: str = "train", limit: int = 10) -> str:
        """In memory nothing is skipped; the interface's description of examples by index."""
        shown = ", ".join(f"{split} example {i}" for i in sorted(set(indices))[:limit])
        more = len(set(indices)) - min(limit, len(set(indices)))
        return shown + (f"; and {more} more" if more > 0 else "")

    def image_names(self, indices: list[int], split: str = "train") -> list[str]:
        return [f"{split} example {i}" for i in indices]
