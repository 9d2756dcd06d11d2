"""TFDS datasets through ``tfds.data_source`` (random access, no TensorFlow needed)."""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["data_source", "load_tfds"]


def data_source(name: str, split: str, data_dir: Optional[str] = None):
    """A prepared TFDS split as a random-access source (nothing is downloaded)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError(
            "tensorflow-datasets is not installed: pip install 'at_jax[tfds]', or "
            "point config.data.data_dir at local files"
        ) from None
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)


def load_tfds(
    name: str, split: str, data_dir: Optional[str] = None
) -> tuple[np.ndarray, np.ndarray]:
    """All examples of a TFDS split as (uint8 NHWC images, int32 labels)."""
    source = data_source(name, split, data_dir)
    examples = [source[i] for i in range(len(source))]
    images = np.stack([np.asarray(e["image"], dtype=np.uint8) for e in examples])
    labels = np.asarray([int(e["label"]) for e in examples], dtype=np.int32)
    return images, labels
