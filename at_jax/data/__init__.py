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

from typing import Any

from at_jax.data.catalog import (
    CIFAR_MEAN,
    CIFAR_STD,
    DATASETS,
    STREAMED,
    Dataset,
    dataset_num_classes,
    load_dataset,
)

__all__ = [
    "open_data",
    "load_dataset",
    "dataset_num_classes",
    "Dataset",
    "DATASETS",
    "STREAMED",
    "CIFAR_MEAN",
    "CIFAR_STD",
]


def open_data(config: Any, mesh: Any) -> Any:
    """The run's data: :class:`~at_jax.data.memory.InMemoryData` for the small datasets,
    :class:`~at_jax.data.pipeline.StreamedData` for the streamed ones."""
    name = config.data.name
    if name in STREAMED:
        from at_jax.data.pipeline import StreamedData  # Grain and JAX: only when streaming

        return StreamedData(config, mesh)
    if name not in DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}; known: {', '.join(DATASETS)} (in memory), "
            f"{', '.join(STREAMED)} (streamed)"
        )
    from at_jax.data.memory import InMemoryData  # JAX: not in Grain's worker processes

    return InMemoryData(config, mesh)
