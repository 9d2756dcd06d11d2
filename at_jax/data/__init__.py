"""Datasets: :func:`open_data` gives a run its batches, in memory or streamed.

Small datasets (``cifar10``, ``cifar100``, ``fashion_mnist``, ``mnist``) are loaded whole
(:func:`load_dataset`) and live on the devices (:mod:`at_jax.data.memory`). Sources
(``config.data.source``): ``"local"`` files users already have (CIFAR python archives, IDX files),
``"tfds"`` (``tfds.data_source``), or ``"auto"``: local files first, then TFDS.

Large ones (``imagefolder``, ``cub``, ``scenes``, ``imagenet2012``, ``caltech_birds2011``) stream
through Grain (:mod:`at_jax.data.pipeline`, :mod:`at_jax.data.sources`).

Grain's worker processes import :mod:`at_jax.data.transforms` and :mod:`at_jax.data.sources`,
and with them this package: it imports no JAX (the two data paths are imported by
:func:`open_data` when a run opens its data).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional, Protocol

from at_jax.data.catalog import (
    CIFAR_MEAN,
    CIFAR_STD,
    DATASETS,
    STREAMED,
    Dataset,
    dataset_num_classes,
    dataset_spec,
    load_dataset,
)
from at_jax.data.report import DataReport
from at_jax.data.spec import DataSpec, Feed

__all__ = [
    "open_data",
    "RunData",
    "TrainBatches",
    "DataSpec",
    "Feed",
    "DataReport",
    "dataset_spec",
    "load_dataset",
    "dataset_num_classes",
    "Dataset",
    "DATASETS",
    "STREAMED",
    "CIFAR_MEAN",
    "CIFAR_STD",
]


class TrainBatches(Protocol):
    """A run's training batches, as :meth:`RunData.train_batches` gives them: an iterator of
    global batches that the loop closes, whose position a checkpoint keeps
    (``checkpoint_state``: an object for Grain's Orbax handler, or None where the step alone
    is the position), and what the batches met (``report``: broken images skipped)."""

    report: DataReport

    @property
    def checkpoint_state(self) -> Optional[Any]: ...

    def start_at(self, step: int) -> None: ...

    def __iter__(self) -> Iterator[dict]: ...

    def __next__(self) -> dict: ...

    def close(self) -> None: ...


class RunData(Protocol):
    """What a run's data offers the loop, in memory or streamed (:func:`open_data`)."""

    spec: DataSpec
    n_train: int
    n_test: int
    steps_per_epoch: int
    description: str
    warnings: list[str]  # about the sources, printed once before training
    counts_skipped: bool  # whether batches carry "skipped_count" (broken images replaced)
    eval_report: DataReport  # what the last evaluation met

    def train_batches(self, start_step: int = 0) -> TrainBatches: ...

    def eval_batches(self) -> Iterator[dict]: ...

    def describe_skipped(self, indices: list[int], split: str = ..., limit: int = ...) -> str: ...

    def image_names(self, indices: list[int], split: str = ...) -> list[str]: ...

    def train_labels(self) -> Any: ...


def open_data(config: Any, mesh: Any) -> RunData:
    """The run's data: :class:`~at_jax.data.memory.InMemoryData` for the small datasets,
    :class:`~at_jax.data.pipeline.StreamedData` for the streamed ones; each reads only
    ``config.data`` and the run's :class:`~at_jax.data.spec.Feed`."""
    name = config.data.name
    feed = Feed.from_config(config)
    if name in STREAMED:
        from at_jax.data.pipeline import StreamedData  # Grain and JAX: only when streaming

        return StreamedData(config.data, feed, mesh)
    if name not in DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}; known: {', '.join(DATASETS)} (in memory), "
            f"{', '.join(STREAMED)} (streamed)"
        )
    from at_jax.data.memory import InMemoryData  # JAX: not in Grain's worker processes

    return InMemoryData(config.data, feed, mesh)
