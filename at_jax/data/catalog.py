"""The datasets the library knows, and loading the small ones into memory: :func:`load_dataset`.

In memory (``cifar10``, ``cifar100``, ``fashion_mnist``, ``mnist``): from files users already
have (CIFAR python archives, IDX files; :mod:`at_jax.data.local`) or from TFDS. Streamed
(``imagefolder``, ``cub``, ``scenes``, ``imagenet2012``, ``caltech_birds2011``): see
:mod:`at_jax.data.pipeline`. :func:`dataset_spec` gives what a run's model and preprocessing need
(a :class:`~at_jax.data.spec.DataSpec`: class count, image shape, mean/std) from a config alone.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import numpy as np

from at_jax.data.local import find_cifar, find_idx
from at_jax.data.spec import DataSpec
from at_jax.data.tfds_source import load_tfds

__all__ = [
    "load_dataset",
    "dataset_spec",
    "dataset_info",
    "dataset_num_classes",
    "Dataset",
    "DATASETS",
    "STREAMED",
    "STREAMED_CLASSES",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

CIFAR_MEAN = tuple(v / 255 for v in (125.3, 123.0, 113.9))
CIFAR_STD = tuple(v / 255 for v in (63.0, 62.1, 66.7))

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DATASETS: dict[str, dict[str, Any]] = {
    "cifar10": dict(
        num_classes=10, mean=CIFAR_MEAN, std=CIFAR_STD, kind="cifar", image_shape=(32, 32, 3)
    ),
    "cifar100": dict(
        num_classes=100, mean=CIFAR_MEAN, std=CIFAR_STD, kind="cifar", image_shape=(32, 32, 3)
    ),
    "fashion_mnist": dict(
        num_classes=10,
        mean=(0.2860,),
        std=(0.3530,),
        kind="idx",
        image_shape=(28, 28, 1),
        default_dirs=("/usr/share/datasets/fashion-mnist",),
    ),
    "mnist": dict(
        num_classes=10,
        mean=(0.1307,),
        std=(0.3081,),
        kind="idx",
        image_shape=(28, 28, 1),
        default_dirs=("/usr/share/datasets/mnist",),
    ),
}
# Streamed datasets: images normalised with the ImageNet mean/std (as torchvision's models);
# class counts of the TFDS ones (the local layouts count their class folders).
STREAMED = ("imagefolder", "cub", "scenes", "imagenet2012", "caltech_birds2011")
STREAMED_CLASSES = {"imagenet2012": 1000, "caltech_birds2011": 200}

HOW_TO_GET = {
    "cifar": "download cifar-10-python.tar.gz / cifar-100-python.tar.gz from the CIFAR page into "
    "a folder and set config.data.data_dir to it, or prepare the TFDS dataset",
    "idx": "on Debian/Ubuntu: apt-get install dataset-fashion-mnist (Fashion-MNIST), or put the "
    "four IDX files (gzipped or not) in a folder and set config.data.data_dir",
}


@dataclasses.dataclass
class Dataset:
    train_images: np.ndarray  # (N, H, W, C) uint8
    train_labels: np.ndarray  # (N,) int32
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    mean: tuple
    std: tuple
    source: str

    @property
    def image_shape(self) -> tuple:
        return self.train_images.shape[1:]

    @property
    def spec(self) -> DataSpec:
        return DataSpec(self.num_classes, self.image_shape, self.mean, self.std)


def _search_dirs(name: str, data_dir: Optional[str]) -> list[str]:
    """An explicit ``data_dir`` is the only place searched; otherwise $AT_JAX_DATA_DIR and the
    dataset's default folders (e.g. Debian's /usr/share/datasets/fashion-mnist)."""
    if data_dir:
        return [data_dir, os.path.join(data_dir, name)]
    dirs = []
    env = os.environ.get("AT_JAX_DATA_DIR")
    if env:
        dirs += [env, os.path.join(env, name)]
    dirs += list(DATASETS[name].get("default_dirs", ()))
    return dirs


def load_dataset(
    name: str,
    source: str = "auto",
    data_dir: Optional[str] = None,
    train_size: int = 0,
    test_size: int = 0,
) -> Dataset:
    """Load a whole dataset into host memory. ``train_size``/``test_size`` > 0 keep a prefix."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if source not in ("auto", "local", "tfds"):
        raise ValueError(f"data source must be 'auto', 'local' or 'tfds', got {source!r}")
    info = DATASETS[name]
    reader, origin, looked = None, None, []
    if source in ("auto", "local"):
        finder = find_cifar if info["kind"] == "cifar" else (lambda _n, d: find_idx(d))
        for d in _search_dirs(name, data_dir):
            looked.append(d)
            if os.path.isdir(d):
                reader = finder(name, d)
                if reader is not None:
                    origin = f"local:{d}"
                    break
    if reader is None and source in ("auto", "tfds"):
        try:
            splits = {s: load_tfds(name, s, data_dir) for s in ("train", "test")}
            reader, origin = splits.__getitem__, f"tfds:{name}"
        except Exception as e:  # not prepared, not installed, no network
            if source == "tfds":
                raise
            looked.append(f"tfds:{name} ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if reader is None:
        raise FileNotFoundError(
            f"dataset {name!r} not found; looked in: {'; '.join(looked)}. "
            f"To get it: {HOW_TO_GET[info['kind']]}."
        )
    assert origin is not None
    train_images, train_labels = reader("train")
    test_images, test_labels = reader("test")
    if train_size:
        train_images, train_labels = train_images[:train_size], train_labels[:train_size]
    if test_size:
        test_images, test_labels = test_images[:test_size], test_labels[:test_size]
    if train_labels.max(initial=0) >= info["num_classes"]:
        raise ValueError(f"{origin}: label {train_labels.max()} out of range for {name}")
    return Dataset(
        train_images,
        train_labels,
        test_images,
        test_labels,
        info["num_classes"],
        info["mean"],
        info["std"],
        origin,
    )


def dataset_spec(config: Any) -> DataSpec:
    """What a run's model and preprocessing need, from its config alone (``num_classes`` None
    where the data on disk decides it: image folders)."""
    name = config.get("data", {}).get("name")
    if name in DATASETS:
        info = DATASETS[name]
        return DataSpec(info["num_classes"], info["image_shape"], info["mean"], info["std"])
    if name in STREAMED:
        size = int(config.data.image_size)
        return DataSpec(STREAMED_CLASSES.get(name), (size, size, 3), IMAGENET_MEAN, IMAGENET_STD)
    raise ValueError(
        f"unknown dataset {name!r}; known: {', '.join(DATASETS)} (in memory), "
        f"{', '.join(STREAMED)} (streamed)"
    )


def dataset_info(config: Any) -> dict[str, Any]:
    """:func:`dataset_spec` as a dict (``num_classes``, ``image_shape``, ``mean``, ``std``)."""
    return dataclasses.asdict(dataset_spec(config))


def dataset_num_classes(config: Any) -> Optional[int]:
    """The class count a config's dataset implies, where it is known without reading data."""
    name = config.get("data", {}).get("name")
    if name in DATASETS:
        return DATASETS[name]["num_classes"]
    return STREAMED_CLASSES.get(name)
