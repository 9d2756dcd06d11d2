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
least the output's resolution: the same crop, decoded 2–8× faster on large images.
"""

from __future__ import annotations

import io
import math
from typing import Any, Optional

import numpy as np
from PIL import Image

__all__ = ["TrainTransform", "EvalTransform", "EvalRecord", "open_image", "random_resized_crop_box"]

RESIZE_RATIO = 256 / 224
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)


def open_image(image: Any) -> Image.Image:
    """A PIL image (not yet decoded, when it comes from a file or bytes)."""
    if isinstance(image, np.ndarray):
        if image.ndim == 2 or image.shape[-1] == 1:
            image = np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=-1)
        return Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image))
    return Image.open(image)


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
    if img.mode != "RGB":
        img = img.convert("RGB")
    sx, sy = img.size[0] / width, img.size[1] / height
    return img, (x0 * sx, y0 * sy, x1 * sx, y1 * sy)


def _resized(img: Image.Image, box, size: tuple[int, int]) -> Image.Image:
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
    box = record.get("bbox")
    if box is None:
        return None
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, y0 = max(0.0, x0), max(0.0, y0)
    x1, y1 = min(float(width), x1), min(float(height), y1)
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None
    return (x0, y0, x1, y1)


def _output(img: Image.Image, label) -> dict:
    return {"image": np.asarray(img, dtype=np.uint8), "label": np.int32(label)}


class TrainTransform:
    """Grain ``random_map``: a record -> a randomly cropped, flipped S×S uint8 image."""

    def __init__(self, size: int, flip: bool = True):
        self.size = int(size)
        self.flip = flip

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:
        img = open_image(record["image"])
        width, height = img.size
        bbox = _bbox(record, width, height)
        if bbox is not None:  # CUB: the bird's box, short side to S·256/224, random S×S crop
            box = _short_side_box(bbox, self.size * RESIZE_RATIO, self.size, rng)
        else:
            x, y, w, h = random_resized_crop_box(width, height, rng)
            box = (x, y, x + w, y + h)
        img = _resized(img, box, (self.size, self.size))
        if self.flip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _output(img, record["label"])


class EvalTransform:
    """Grain ``map``: a record -> the central S×S of the image resized to short side S·256/224
    (of its bounding box, where it has one)."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, record: dict) -> dict:
        img = open_image(record["image"])
        width, height = img.size
        box = _bbox(record, width, height) or (0.0, 0.0, float(width), float(height))
        box = _short_side_box(box, self.size * RESIZE_RATIO, self.size, None)
        return _output(_resized(img, box, (self.size, self.size)), record["label"])


class EvalRecord:
    """Index -> the eval view of test record ``index``, or a masked blank past the end."""

    def __init__(self, source, size: int):
        self.source, self.size = source, int(size)
        self.transform = EvalTransform(size)

    def __call__(self, index: int) -> dict:
        index = int(index)
        if index < len(self.source):
            out = self.transform(self.source[index])
            out["mask"] = np.float32(1)
        else:
            out = {
                "image": np.zeros((self.size, self.size, 3), np.uint8),
                "label": np.int32(0),
                "mask": np.float32(0),
            }
        return out
