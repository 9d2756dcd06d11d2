"""The in-memory path for small datasets (CIFAR, Fashion-MNIST): the whole training set lives on
the devices and the train step gathers and augments its batch inside the jitted program."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from jax.sharding import Mesh

from at_jax.data.batching import array_batches, eval_batch_size
from at_jax.data.catalog import load_dataset
from at_jax.sharding import global_array, replicated, sharded

__all__ = ["InMemoryData", "epoch_indices"]


def epoch_indices(config, epoch: int, n_train: int, steps: int) -> np.ndarray:
    """(steps, seeds, batch) example indices: a fresh permutation per seed and epoch, derived
    from (seed, epoch) alone so that a resumed run sees exactly the batches an uninterrupted one
    would."""
    b = config.batch_size
    perms = [
        np.random.default_rng([int(config.seed) + s, epoch]).permutation(n_train)[: steps * b]
        for s in range(int(config.num_seeds))
    ]
    return np.stack(perms).reshape(len(perms), steps, b).transpose(1, 0, 2).astype(np.int32)


class InMemoryData:
    """An in-memory dataset of ``config.data`` for ``mesh``: batches, sizes and normalisation."""

    streamed = False

    def __init__(self, config, mesh: Mesh):
        data = config.data
        self.config, self.mesh = config, mesh
        self.dataset = load_dataset(
            data.name, data.source, data.data_dir or None, data.train_size, data.test_size
        )
        ds = self.dataset
        self.num_classes, self.image_shape = ds.num_classes, ds.image_shape
        self.mean, self.std = ds.mean, ds.std
        self.n_train, self.n_test = len(ds.train_labels), len(ds.test_labels)
        self.description = ds.source
        self.steps_per_epoch = self.n_train // int(config.batch_size)
        self._pool: dict | None = None

    def _pool_arrays(self) -> dict:
        if self._pool is None:
            everywhere = replicated(self.mesh)
            self._pool = {
                "pool_image": global_array(self.dataset.train_images, everywhere),
                "pool_label": global_array(self.dataset.train_labels, everywhere),
            }
        return self._pool

    def train_batches(self, start_step: int) -> Iterator[dict]:
        """Global batches ``{"index": (seeds, B), "pool_image", "pool_label"}`` from
        ``start_step`` to the end of the run."""
        steps = self.steps_per_epoch
        sharding = sharded(self.mesh, None, None, "data")
        pool = self._pool_arrays()
        for epoch in range(start_step // steps + 1, int(self.config.num_epochs) + 1):
            idx = global_array(epoch_indices(self.config, epoch, self.n_train, steps), sharding)
            for i in range(max(0, start_step - (epoch - 1) * steps), steps):
                yield {"index": idx[i], **pool}

    def eval_batches(self) -> Iterator[dict]:
        size = eval_batch_size(self.config.eval_batch_size, self.n_test, self.mesh.size)
        return array_batches(self.dataset.test_images, self.dataset.test_labels, size, self.mesh)
