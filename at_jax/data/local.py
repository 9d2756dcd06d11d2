"""Readers for dataset files users already have on disk.

* CIFAR-10/100 "python version": ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` or the
  extracted ``cifar-10-batches-py`` / ``cifar-100-python`` folder (pickled dicts with ``data`` as
  N×3072 uint8 rows in CHW order and ``labels`` / ``fine_labels``).
* IDX files (MNIST, Fashion-MNIST): ``train-images-idx3-ubyte`` etc., gzipped or not.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import tarfile
from collections.abc import Callable
from typing import Any, Optional

import numpy as np

__all__ = ["find_cifar", "find_idx", "read_idx"]

CIFAR_LAYOUT: dict[str, dict[str, Any]] = {
    "cifar10": dict(
        archive="cifar-10-python.tar.gz",
        folder="cifar-10-batches-py",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        label_key="labels",
    ),
    "cifar100": dict(
        archive="cifar-100-python.tar.gz",
        folder="cifar-100-python",
        train=["train"],
        test=["test"],
        label_key="fine_labels",
    ),
}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _unpickle_cifar(raw: bytes, label_key: str, source: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = pickle.loads(raw, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key.encode()], dtype=np.int32)
    except Exception as e:  # a corrupted or foreign file: say which one
        raise ValueError(f"{source} is not a CIFAR python batch ({e})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(
            f"{source}: expected N×3072 images and N labels, got {data.shape} and {labels.shape}"
        )
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def find_cifar(name: str, directory: str) -> Optional[Callable[[str], tuple]]:
    """A reader ``split -> (images, labels)`` if ``directory`` holds the CIFAR archive or folder."""
    layout = CIFAR_LAYOUT[name]
    candidates = [os.path.join(directory, layout["folder"]), directory]
    for folder in candidates:
        if all(os.path.isfile(os.path.join(folder, f)) for f in layout["train"] + layout["test"]):

            def read_folder(split, folder=folder):
                parts = [
                    _unpickle_cifar(
                        _read_bytes(os.path.join(folder, f)),
                        layout["label_key"],
                        os.path.join(folder, f),
                    )
                    for f in layout[split]
                ]
                return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

            return read_folder
    archive = os.path.join(directory, layout["archive"])
    if os.path.isfile(archive):

        def read_archive(split):
            with tarfile.open(archive, "r:*") as tar:
                parts = []
                for f in layout[split]:
                    member = f"{layout['folder']}/{f}"
                    try:
                        stream = tar.extractfile(member)
                    except KeyError:
                        stream = None
                    if stream is None:
                        raise ValueError(f"{archive} has no member {member}")
                    raw = stream.read()
                    parts.append(_unpickle_cifar(raw, layout["label_key"], f"{archive}:{member}"))
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

        return read_archive
    return None


def _open_maybe_gz(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (unsigned-byte data), gzipped or not."""
    with _open_maybe_gz(path) as f:
        raw = f.read()
    if len(raw) < 4:
        raise ValueError(f"{path} is too short to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} values (truncated?)")
    return data.reshape(dims)


def find_idx(directory: str) -> Optional[Callable[[str], tuple]]:
    """A reader ``split -> (images NHWC, labels)`` if ``directory`` holds the four IDX files."""

    def locate(stem):
        for candidate in (stem + ".gz", stem):
            if os.path.isfile(os.path.join(directory, candidate)):
                return os.path.join(directory, candidate)
        return None

    paths = {split: tuple(locate(s) for s in stems) for split, stems in IDX_FILES.items()}
    if any(p is None for pair in paths.values() for p in pair):
        return None

    def read(split):
        images_path, labels_path = paths[split]
        images, labels = read_idx(images_path), read_idx(labels_path).astype(np.int32)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{images_path} / {labels_path}: expected N×H×W images and N labels, "
                f"got {images.shape} and {labels.shape}"
            )
        return images[..., None], labels

    return read
