"""TFDS datasets through ``tfds.data_source`` (random access, no TensorFlow needed): call
:func:`data_source` or :func:`load_tfds`.

``tfds.data_source`` reads a dataset prepared in a random-access file format (array_record); a
dataset that is not prepared, or prepared as TFRecord files, is reported in one line with the
path looked at and the command that prepares it.
"""

from __future__ import annotations

from typing import Any, Optional

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
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # not prepared, or not in a random-access format
        raise _not_readable(tfds, name, data_dir, e) from None


def _not_readable(tfds: Any, name: str, data_dir: Optional[str], error: Exception) -> Exception:
    """One line: what is (not) at the path TFDS looked at, and how to prepare the dataset."""
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
        where, prepared = builder.data_dir, builder.is_prepared()
        file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    except Exception:
        first = str(error).splitlines()[0] if str(error) else ""
        return FileNotFoundError(f"TFDS cannot read {name!r}: {type(error).__name__}: {first}")
    found = (
        f"{name} is prepared in {where} as {file_format} files, which tfds.data_source "
        "cannot read at random"
        if prepared
        else f"{name} is not prepared in {where}"
    )
    target = data_dir or "~/tensorflow_datasets"
    return FileNotFoundError(
        f"{found}: at_jax reads TFDS datasets with tfds.data_source, which needs them prepared "
        f"in a random-access format (array_record). Prepare it once with: tfds build {name} "
        f"--data_dir={target} --file_format=array_record"
        + (
            f" (ImageNet's archives go in {target}/downloads/manual first)"
            if name == "imagenet2012"
            else ""
        )
        + "; or use the files on disk with config.data.name=imagefolder/cub"
    )


def load_tfds(
    name: str, split: str, data_dir: Optional[str] = None
) -> tuple[np.ndarray, np.ndarray]:
    """All examples of a TFDS split as (uint8 NHWC images, int32 labels)."""
    source = data_source(name, split, data_dir)
    examples = [source[i] for i in range(len(source))]
    images = np.stack([np.asarray(e["image"], dtype=np.uint8) for e in examples])
    labels = np.asarray([int(e["label"]) for e in examples], dtype=np.int32)
    return images, labels
