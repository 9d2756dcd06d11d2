"""Host-side image transforms of the streamed pipeline (run in Grain worker processes).

A record is ``{"image": path | encoded bytes | uint8 array (H, W, 3), "label": int,
"bbox": optional (x0, y0, x1, y1) in pixels}``. Transforms return ``{"image": uint8 (S, S, 3),
"label": int32}``; normalisation to float happens on the device, inside the train step.

* train (ImageNet style, torchvision's ``RandomResizedCrop`` + flip): a random box of 8%–100% of
  the area with aspect ratio in [3/4, 4/3] (10 tries, then the central box with the ratio
  clamped), resized to S×S (bilinear), flipped with probability 1/2;
* eval: the short side resized to ``S·256/224``, then the central S×S;
* bounding-box datasets (CUB, as the paper): crop the box first, then train = short side to
  ``S·256/224`` + random S×S crop + flip, eval = the same resize + central crop.

JPEGs are decoded at a reduced DCT scale (PIL's ``draft``) whenever the region used still has at
least the output's resolution: the same crop, decoded 2–8× faster on large images. 16-bit images
(PIL modes ``I;16``, ``I;16B``, ``I``) are scaled to 8 bits (65535 -> 255), not clipped.

Broken files (truncated, empty, not an image) raise :class:`BadImageError`, which names the file
and the decoder's reason. With ``on_bad_image="skip"`` the index-based records
(:class:`TrainRecord`, :class:`EvalRecord`) replace a training example by another one drawn from
the example's own random stream (so reruns and resumed runs see the same batches) and mask a test
example out; each output reports what it skipped (``skipped_count``, ``skipped_index``) and
whether its bounding box lay outside the image (``box_outside``), for the main process to count
and name.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np
from PIL import Image

__all__ = [
    "TrainRecord",
    "EvalRecord",
    "TrainTransform",
    "EvalTransform",
    "BadImageError",
    "decode_image",
    "open_image",
    "random_resized_crop_box",
    "ON_BAD_IMAGE",
]

ON_BAD_IMAGE = ("error", "skip")
# replacements tried for one training example before giving up (each one another random record)
MAX_REPLACEMENTS = 16

RESIZE_RATIO = 256 / 224
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)


class BadImageError(ValueError):
    """An image that cannot be decoded: ``path`` (or a description of the record) and the
    decoder's ``reason``."""

    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)
        self.path, self.reason = path, reason

    def __str__(self) -> str:
        return f"cannot decode {self.path}: {self.reason}"


def _name(image: Any) -> str:
    return image if isinstance(image, str) else f"an in-memory {type(image).__name__} image"


@contextlib.contextmanager
def _decoding(image: Any) -> Iterator[None]:
    """Turn any failure of the decoder into a :class:`BadImageError` naming ``image``."""
    try:
        yield
    except BadImageError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise BadImageError(_name(image), reason) from None


def open_image(image: Any) -> Image.Image:
    """A PIL image (not yet decoded, when it comes from a file or bytes)."""
    if isinstance(image, np.ndarray):
        if image.ndim == 2 or image.shape[-1] == 1:
            image = np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=-1)
        return Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    with _decoding(image):
        if isinstance(image, (bytes, bytearray)):
            return Image.open(io.BytesIO(image))
        return Image.open(image)


_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB; 16-bit grey levels are scaled (65535 -> 255), not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT:
        levels = np.asarray(img, dtype=np.float64)
        grey = np.clip(np.rint(levels / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return img.convert("RGB")


def decode_image(image: Any) -> np.ndarray:
    """Fully decode ``image`` (a path, encoded bytes or an array) to uint8 RGB (H, W, 3), as the
    pipeline would; raises :class:`BadImageError` with the reason. What
    ``python -m at_jax.data.verify`` runs on every file."""
    img = open_image(image)
    with _decoding(image):
        return np.asarray(_rgb(img), dtype=np.uint8)


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator, scale=SCALE, ratio=RATIO
) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``: ``(x, y, w, h)`` of the crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _decode_region(
    img: Image.Image, box: tuple[float, float, float, float], out_w: int, out_h: int
) -> tuple[Image.Image, tuple[float, ...]]:
    """Decode ``img`` (RGB), at a reduced JPEG scale when ``box`` keeps ≥ (out_w, out_h)
    pixels; returns the image and ``box`` in its coordinates."""
    width, height = img.size
    x0, y0, x1, y1 = box
    if img.format == "JPEG":
        factor = min((x1 - x0) / out_w, (y1 - y0) / out_h)
        if factor >= 2:
            img.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
    img = _rgb(img)
    sx, sy = img.size[0] / width, img.size[1] / height
    return img, (x0 * sx, y0 * sy, x1 * sx, y1 * sy)


def _resized(img: Image.Image, box, size: tuple[int, int], image: Any) -> Image.Image:
    with _decoding(image):
        img, box = _decode_region(img, box, *size)
        return img.resize(size, Image.Resampling.BILINEAR, box=box)


def _short_side_box(box, short: float, size: int, rng: Optional[np.random.Generator]):
    """The S×S window of ``box`` rescaled so that its short side is ``short`` (random position
    with ``rng``, else central), in ``box``'s own coordinates."""
    x0, y0, x1, y1 = box
    scale = short / min(x1 - x0, y1 - y0)
    span = size / scale  # the window's side in source pixels
    free_x, free_y = max(0.0, (x1 - x0) - span), max(0.0, (y1 - y0) - span)
    if rng is None:
        ox, oy = free_x / 2, free_y / 2
    else:  # whole resized pixels, as a random crop of the resized image
        ox = rng.integers(0, round(free_x * scale) + 1) / scale
        oy = rng.integers(0, round(free_y * scale) + 1) / scale
    return (x0 + ox, y0 + oy, x0 + ox + span, y0 + oy + span)


def _bbox(record, width: int, height: int):
    """The record's bounding box clipped to the image, or None (no box, or one that lies wholly
    outside the image: the whole image is used then, and the output says so)."""
    box = record.get("bbox")
    if box is None:
        return None
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, y0 = max(0.0, x0), max(0.0, y0)
    x1, y1 = min(float(width), x1), min(float(height), y1)
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None
    return (x0, y0, x1, y1)


def _output(img: Image.Image, record: dict, bbox: Any) -> dict:
    outside = record.get("bbox") is not None and bbox is None
    return {
        "image": np.asarray(img, dtype=np.uint8),
        "label": np.int32(record["label"]),
        "box_outside": np.int32(outside),
    }


class TrainTransform:
    """Grain ``random_map``: a record -> a randomly cropped, flipped S×S uint8 image, then
    RandAugment where ``randaugment`` (a :class:`~at_jax.data.randaugment.RandAugment`) is
    given (timm's order)."""

    def __init__(self, size: int, flip: bool = True, randaugment: Optional[Any] = None):
        self.size = int(size)
        self.flip = flip
        self.randaugment = randaugment

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:
        img = open_image(record["image"])
        width, height = img.size
        bbox = _bbox(record, width, height)
        if bbox is not None:  # CUB: the bird's box, short side to S·256/224, random S×S crop
            box = _short_side_box(bbox, self.size * RESIZE_RATIO, self.size, rng)
        else:
            x, y, w, h = random_resized_crop_box(width, height, rng)
            box = (x, y, x + w, y + h)
        img = _resized(img, box, (self.size, self.size), record["image"])
        if self.flip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.randaugment is not None:
            img = self.randaugment(img, rng)
        return _output(img, record, bbox)


class EvalTransform:
    """Grain ``map``: a record -> the central S×S of the image resized to short side S·256/224
    (of its bounding box, where it has one)."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, record: dict) -> dict:
        img = open_image(record["image"])
        width, height = img.size
        bbox = _bbox(record, width, height)
        box = bbox or (0.0, 0.0, float(width), float(height))
        box = _short_side_box(box, self.size * RESIZE_RATIO, self.size, None)
        return _output(_resized(img, box, (self.size, self.size), record["image"]), record, bbox)


def _check_policy(on_bad_image: str) -> str:
    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(
            f"config.data.on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}"
        )
    return on_bad_image


class TrainRecord:
    """Grain ``random_map`` over record indices: index -> the training view of that record.

    ``on_bad_image="error"``: a broken image raises :class:`BadImageError`. ``"skip"``: it is
    replaced by another record drawn from the example's own random stream (deterministic:
    reruns and resumed runs see the same batches); ``skipped_count`` and ``skipped_index`` (the
    first replaced index, or -1) report it. ``example_index``: the index of the record used."""

    def __init__(
        self,
        source: Any,
        size: int,
        flip: bool = True,
        on_bad_image: str = "error",
        randaugment: Optional[Any] = None,
    ):
        self.source = source
        self.transform = TrainTransform(size, flip, randaugment)
        self.on_bad_image = _check_policy(on_bad_image)

    def __call__(self, index: int, rng: np.random.Generator) -> dict:
        skipped: list[int] = []
        index = int(index)
        while True:
            try:
                out = self.transform(self.source[index], rng)
                break
            except BadImageError:
                if self.on_bad_image != "skip" or len(skipped) >= MAX_REPLACEMENTS:
                    raise
                skipped.append(index)
                index = int(rng.integers(len(self.source)))
        out["skipped_count"] = np.int32(len(skipped))
        out["skipped_index"] = np.int64(skipped[0] if skipped else -1)
        out["example_index"] = np.int32(index)  # the record used (CRD's memory row)
        return out


class EvalRecord:
    """Index -> the eval view of test record ``index``, or a masked blank past the end (and, with
    ``on_bad_image="skip"``, in place of a broken image: reported in ``skipped_count`` and
    ``skipped_index``)."""

    def __init__(self, source: Any, size: int, on_bad_image: str = "error"):
        self.source, self.size = source, int(size)
        self.transform = EvalTransform(size)
        self.on_bad_image = _check_policy(on_bad_image)

    def _blank(self, skipped_index: int = -1) -> dict:
        return {
            "image": np.zeros((self.size, self.size, 3), np.uint8),
            "label": np.int32(0),
            "box_outside": np.int32(0),
            "mask": np.float32(0),
            "skipped_count": np.int32(skipped_index >= 0),
            "skipped_index": np.int64(skipped_index),
        }

    def __call__(self, index: int) -> dict:
        index = int(index)
        if index >= len(self.source):
            return self._blank()
        try:
            out = self.transform(self.source[index])
        except BadImageError:
            if self.on_bad_image != "skip":
                raise
            return self._blank(index)
        out.update(mask=np.float32(1), skipped_count=np.int32(0), skipped_index=np.int64(-1))
        return out
