"""What the training batches met on the way: :class:`DataReport` (broken images skipped,
bounding boxes outside their image). Streamed batches fill it; in memory it stays empty."""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["DataReport"]


@dataclasses.dataclass
class DataReport:
    """What the batches handed out so far met: the source indices of broken images that were
    skipped (``config.data.on_bad_image="skip"``) and the number of bounding boxes that lay
    outside their image (the whole image was used)."""

    skipped: list[int] = dataclasses.field(default_factory=list)
    box_outside: int = 0

    def add(self, batch: dict) -> None:
        self.skipped += [int(i) for i in np.asarray(batch["skipped_index"]).ravel() if i >= 0]
        self.box_outside += int(np.sum(batch["box_outside"]))

    def __bool__(self) -> bool:
        return bool(self.skipped or self.box_outside)
