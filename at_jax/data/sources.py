"""Random-access sources of the streamed datasets (what Grain calls a ``RandomAccessDataSource``).

Each source is a picklable sequence of records ``{"image": path | bytes | array, "label": int,
"bbox": optional}`` (see :mod:`at_jax.data.transforms`); images are decoded later, in the worker
processes. Local layouts, the ones users already have on disk:

* ``imagefolder``: ``DATA_DIR/train/<class>/*.{JPEG,jpg,jpeg,png}`` and ``DATA_DIR/val/<class>/...``
  (ImageNet's usual layout); classes sorted by name, the same list for both splits;
* ``cub``: the original ``CUB_200_2011/`` folder (``images.txt``, ``image_class_labels.txt``,
  ``train_test_split.txt``, ``bounding_boxes.txt``, ``images/``); ``DATA_DIR`` may be the folder
  itself or its parent;
* ``scenes``: MIT Indoor-67 (``Images/<class>/...``, ``TrainImages.txt``, ``TestImages.txt``).

``imagenet2012`` and ``caltech_birds2011`` are read with ``tfds.data_source`` when prepared by TFDS
(``DATA_DIR`` is then the TFDS data_dir).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from at_jax.data.tfds_source import data_source

__all__ = [
    "open_source",
    "image_folder",
    "cub",
    "scenes",
    "class_folder",
    "tfds_splits",
    "RecordSource",
    "Subset",
    "TfdsSource",
    "DataLayoutError",
    "LAYOUTS",
]

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")

LAYOUTS = {
    "imagefolder": "DATA_DIR/train/<class>/<image>.{JPEG,jpg,png} and DATA_DIR/val/<class>/...",
    "cub": "DATA_DIR/CUB_200_2011/ (or DATA_DIR itself) with images.txt, image_class_labels.txt, "
    "train_test_split.txt, bounding_boxes.txt and images/<class>/<image>.jpg",
    "scenes": "DATA_DIR/Images/<class>/<image>.jpg with DATA_DIR/TrainImages.txt and "
    "DATA_DIR/TestImages.txt (lines '<class>/<image>.jpg')",
}


class DataLayoutError(FileNotFoundError):
    """The data on disk is missing or not in the expected layout."""


class RecordSource:
    """A list of records as a Grain random-access source; ``warnings`` lists what looked wrong
    on disk but did not stop the run (empty class folders), for the run to print."""

    def __init__(self, records: Sequence[dict], description: str, warnings: Sequence[str] = ()):
        self.records = list(records)
        self.description = description
        self.warnings = list(warnings)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.records[int(index)]

    @property
    def labels(self) -> list[int]:
        """Every record's label, without reading an image."""
        return [int(r["label"]) for r in self.records]

    def __repr__(self) -> str:
        return f"RecordSource({self.description}, {len(self)} records)"


def _layout_error(name: str, path: str, problem: str) -> DataLayoutError:
    return DataLayoutError(
        f"{name}: {problem} (looked at {path}). Expected layout: "
        f"{LAYOUTS[name]}; set config.data.data_dir (--data_dir of the data tools) to its root."
    )


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _class_dirs(path: str) -> list[str]:
    return sorted(
        d
        for d in os.listdir(path)
        if os.path.isdir(os.path.join(path, d)) and not d.startswith(".")
    )


def class_folder(
    root: str, classes: Optional[list[str]] = None, name: str = "imagefolder"
) -> tuple[RecordSource, list[str]]:
    """The images of ``root/<class>/*`` (labels by ``classes``, default: the sorted folders)."""
    names = _class_dirs(root)
    if not names:
        raise _layout_error(name, root, "no class folders")
    classes = names if classes is None else classes
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise _layout_error(name, root, f"classes {unknown[:5]} are not in train/")
    index = {c: i for i, c in enumerate(classes)}
    records, empty = [], []
    for c in names:
        found = [
            {"image": os.path.join(root, c, f), "label": index[c]}
            for f in sorted(os.listdir(os.path.join(root, c)))
            if _is_image(f)
        ]
        records += found
        if not found:
            empty.append(c)
    if not records:
        raise _layout_error(name, root, "no images (.JPEG, .jpg, .png)")
    warnings = []
    if empty:
        warnings.append(
            f"{len(empty)} class folder(s) in {root} hold no image (.JPEG, .jpg, .png): "
            f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}; they stay classes "
            "(the class indices do not shift), with no examples"
        )
    return RecordSource(records, f"{name}:{root}", warnings), classes


def image_folder(data_dir: str) -> tuple[RecordSource, RecordSource, list[str]]:
    """``(train, val, class_names)`` of an image-folder tree."""
    splits = []
    classes: Optional[list[str]] = None
    for split in ("train", "val"):
        root = os.path.join(data_dir, split)
        if not os.path.isdir(root):
            raise _layout_error("imagefolder", root, f"no '{split}' folder")
        source, classes = class_folder(root, classes)
        splits.append(source)
    assert classes is not None
    return splits[0], splits[1], classes


def _read_table(path: str, name: str, columns: int) -> dict[str, list[str]]:
    """``id -> remaining fields`` of a whitespace-separated CUB/Scenes text file."""
    if not os.path.isfile(path):
        raise _layout_error(name, path, f"missing {os.path.basename(path)}")
    table = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != columns:
                raise _layout_error(
                    name,
                    path,
                    f"line {number} has {len(fields)} fields, expected {columns}: {line.strip()!r}",
                )
            table[fields[0]] = fields[1:]
    return table


def cub(data_dir: str) -> tuple[RecordSource, RecordSource, list[str]]:
    """CUB-200-2011 with bounding boxes (pixels, ``x y width height`` in the file)."""
    root = data_dir
    if not os.path.isfile(os.path.join(root, "images.txt")):
        root = os.path.join(data_dir, "CUB_200_2011")
    images = _read_table(os.path.join(root, "images.txt"), "cub", 2)
    labels = _read_table(os.path.join(root, "image_class_labels.txt"), "cub", 2)
    split = _read_table(os.path.join(root, "train_test_split.txt"), "cub", 2)
    boxes = _read_table(os.path.join(root, "bounding_boxes.txt"), "cub", 5)
    class_ids = sorted({int(v[0]) for v in labels.values()})
    classes = [str(c) for c in class_ids]
    class_file = os.path.join(root, "classes.txt")
    if os.path.isfile(class_file):
        names = _read_table(class_file, "cub", 2)
        classes = [names.get(str(c), [str(c)])[0] for c in class_ids]
    index = {c: i for i, c in enumerate(class_ids)}
    out: dict[str, list[dict]] = {"1": [], "0": []}
    for image_id, (relative,) in images.items():
        missing = [
            n
            for n, t in (
                ("image_class_labels.txt", labels),
                ("train_test_split.txt", split),
                ("bounding_boxes.txt", boxes),
            )
            if image_id not in t
        ]
        if missing:
            raise _layout_error("cub", root, f"image id {image_id} is not in {missing}")
        x, y, w, h = (float(v) for v in boxes[image_id])
        path = os.path.join(root, "images", relative)
        out[split[image_id][0]].append(
            {"image": path, "label": index[int(labels[image_id][0])], "bbox": (x, y, x + w, y + h)}
        )
    _check_files(out["1"][:1] + out["0"][:1], "cub", root)
    return (
        RecordSource(out["1"], f"cub:{root} train"),
        RecordSource(out["0"], f"cub:{root} test"),
        classes,
    )


def scenes(data_dir: str) -> tuple[RecordSource, RecordSource, list[str]]:
    """MIT Indoor-67: the official 80/20 per-class split of ``TrainImages.txt`` and
    ``TestImages.txt``."""
    images_dir = os.path.join(data_dir, "Images")
    if not os.path.isdir(images_dir):
        raise _layout_error("scenes", images_dir, "no Images/ folder")
    classes = _class_dirs(images_dir)
    index = {c: i for i, c in enumerate(classes)}
    splits = []
    for list_name in ("TrainImages.txt", "TestImages.txt"):
        path = os.path.join(data_dir, list_name)
        if not os.path.isfile(path):
            raise _layout_error("scenes", path, f"missing {list_name}")
        records = []
        with open(path) as f:
            for number, line in enumerate(f, 1):
                relative = line.strip()
                if not relative:
                    continue
                cls = relative.split("/")[0]
                if cls not in index:
                    raise _layout_error(
                        "scenes", path, f"line {number}: class {cls!r} has no folder in Images/"
                    )
                records.append({"image": os.path.join(images_dir, relative), "label": index[cls]})
        if not records:
            raise _layout_error("scenes", path, "empty image list")
        _check_files(records[:1], "scenes", path)
        splits.append(RecordSource(records, f"scenes:{path}"))
    return splits[0], splits[1], classes


def _check_files(records: list[dict], name: str, where: str) -> None:
    for record in records:
        if not os.path.isfile(record["image"]):
            raise _layout_error(name, record["image"], f"listed in {where} but missing")


class Subset:
    """A fixed random subset of a source (``config.data.train_size``/``test_size``)."""

    def __init__(self, source, size: int, seed: int = 0):
        self.source = source
        self.indices = np.sort(np.random.default_rng(seed).permutation(len(source))[:size])
        self.description = f"{getattr(source, 'description', source)} (subset of {size})"

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.source[int(self.indices[int(index)])]


class TfdsSource:
    """A TFDS split through ``tfds.data_source`` as records (images decoded by TFDS)."""

    def __init__(self, name: str, split: str, data_dir: Optional[str]):
        self.name, self.split, self.data_dir = name, split, data_dir
        self.source = data_source(name, split, data_dir)
        self.description = f"tfds:{name}/{split}"

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        example = self.source[int(index)]
        image = np.asarray(example["image"])
        record: dict[str, Any] = {"image": image, "label": int(example["label"])}
        if "bbox" in example:  # tfds BBoxFeature: normalised (ymin, xmin, ymax, xmax)
            h, w = image.shape[:2]
            ymin, xmin, ymax, xmax = np.asarray(example["bbox"], np.float64).reshape(-1)[:4]
            record["bbox"] = (xmin * w, ymin * h, xmax * w, ymax * h)
        return record


TFDS_SPLITS = {"imagenet2012": ("train", "validation"), "caltech_birds2011": ("train", "test")}


def tfds_splits(name: str, data_dir: Optional[str]) -> tuple[TfdsSource, TfdsSource, Any]:
    train, test = (TfdsSource(name, s, data_dir) for s in TFDS_SPLITS[name])
    return train, test, None


def open_source(name: str, data_dir: str):
    """``(train, test, class_names or None)`` of a streamed dataset."""
    if name in TFDS_SPLITS:
        return tfds_splits(name, data_dir or None)
    if not data_dir:
        raise DataLayoutError(
            f"{name}: config.data.data_dir is not set. Expected layout: {LAYOUTS[name]}."
        )
    if not os.path.isdir(data_dir):
        raise _layout_error(name, data_dir, "no such directory")
    return {"imagefolder": image_folder, "cub": cub, "scenes": scenes}[name](data_dir)
