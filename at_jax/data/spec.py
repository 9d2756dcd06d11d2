"""What a model needs to know of its data: :class:`DataSpec` (class count, image shape, mean and
std). The data layer makes one per run (:func:`at_jax.data.catalog.dataset_spec` from a config,
or the opened data's ``spec``); the train step, a teacher, ``data.json`` and ``convert`` use
it."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

__all__ = ["DataSpec", "SpecFields", "Feed"]


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """A dataset's facts. ``num_classes`` is None where only the data on disk can tell (image
    folders, before they are read); ``image_shape`` is (H, W, C); ``mean`` and ``std`` are per
    channel, for images scaled to [0, 1]."""

    num_classes: Optional[int]
    image_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        # normalise the field types once: JSON gives lists, NumPy gives its own scalars
        classes = None if self.num_classes is None else int(self.num_classes)
        object.__setattr__(self, "num_classes", classes)
        object.__setattr__(self, "image_shape", tuple(int(d) for d in self.image_shape))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        channels = self.image_shape[-1] if self.image_shape else 0
        if len(self.image_shape) != 3 or not len(self.mean) == len(self.std) == channels:
            raise ValueError(
                f"a DataSpec needs an image shape (H, W, C) and one mean and std per channel; "
                f"got image_shape={self.image_shape}, mean={self.mean}, std={self.std}"
            )

    def class_count(self) -> int:
        """``num_classes``, which must be known by now."""
        if self.num_classes is None:
            raise ValueError("the class count of this data is not known (image folders: open it)")
        return self.num_classes

    def with_classes(self, num_classes: int) -> DataSpec:
        return dataclasses.replace(self, num_classes=num_classes)

    def to_json(self) -> dict[str, Any]:
        """The ``data.json`` of a run directory."""
        return dataclasses.asdict(self) | {
            "image_shape": list(self.image_shape),
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> DataSpec:
        return cls(
            payload.get("num_classes"), payload["image_shape"], payload["mean"], payload["std"]
        )


class SpecFields:
    """The four facts of a data class's ``spec`` as its own attributes (``data.num_classes``,
    ``data.image_shape``, ``data.mean``, ``data.std``)."""

    spec: DataSpec

    @property
    def num_classes(self) -> int:
        return self.spec.class_count()

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self.spec.image_shape

    @property
    def mean(self) -> tuple[float, ...]:
        return self.spec.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.spec.std


@dataclasses.dataclass(frozen=True)
class Feed:
    """How a run reads its data, the parts of the run's config the data classes use: the global
    ``batch_size``, ``num_epochs``, the ``seed`` and ``num_seeds`` (in memory, each seed gets its
    own order), and ``eval_batch_size``."""

    batch_size: int
    num_epochs: int
    seed: int = 0
    num_seeds: int = 1
    eval_batch_size: int = 1000

    @classmethod
    def from_config(cls, config: Any) -> Feed:
        return cls(
            int(config.batch_size),
            int(config.num_epochs),
            int(config.seed),
            int(config.get("num_seeds", 1)),
            int(config.eval_batch_size),
        )
