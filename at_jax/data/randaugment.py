"""RandAugment on the host (PIL), as timm's ``rand_augment_transform`` that MAE's and the
attention-transfer port's fine-tuning use (``--aa rand-m9-mstd0.5-inc1``): for each training
image, ``n`` operations drawn uniformly with replacement, each applied with probability ``p`` at
a magnitude drawn from N(m, mstd) clipped to [0, mmax].

Policy strings are timm's: ``rand`` then ``-`` separated fields ``m`` (magnitude, 0–10), ``n``
(operations per image, 2), ``mstd`` (0.5 above; ``inf``: uniform in [0, m]), ``mmax`` (10),
``inc`` (1: the "increasing" operations, whose strength grows with the magnitude; 0: the original
set) and ``p`` (0.5). The 15 operations and their magnitude → argument maps are timm's:
AutoContrast, Equalize, Invert, Rotate (±30°), Posterize, Solarize, SolarizeAdd (+110),
Color/Contrast/Brightness/Sharpness (1 ± 0.9·m/10, or 0.1 + 1.8·m/10 without ``inc``), ShearX/Y
(±0.3), TranslateX/YRel (±45% of the side); geometric ones fill with the dataset's mean colour
and resample bicubically (MAE's ``interpolation="bicubic"``). The random draws come from the
example's own NumPy stream (Grain's ``random_map``), so reruns and resumed runs see the same
images; they are not timm's Python ``random`` draws, so single images differ from timm's.

Written here: timm's implementation imports PyTorch, and the image-augmentation libraries that
have a RandAugment either need PyTorch or TensorFlow graphs, or are unmaintained; this one is
~100 lines of PIL in the Grain workers, which import no JAX.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

__all__ = ["RandAugment", "parse_policy", "INCREASING_OPS", "ORIGINAL_OPS"]

INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip
ORIGINAL_OPS = tuple(op.replace("Increasing", "") for op in INCREASING_OPS)
_FIELD = re.compile(r"^(mstd|mmax|inc|m|n|p)(.+)$")


def parse_policy(policy: str) -> dict:
    """``{"magnitude", "num_ops", "magnitude_std", "magnitude_max", "increasing", "prob"}`` of a
    timm policy string (``rand-m9-mstd0.5-inc1``); raises naming the field it cannot read."""
    parts = policy.split("-")
    if parts[0] != "rand":
        raise ValueError(
            f"a RandAugment policy starts with 'rand' (e.g. rand-m9-mstd0.5-inc1), got {policy!r}"
        )
    out = {"magnitude": 10.0, "num_ops": 2, "magnitude_std": 0.0, "magnitude_max": 10.0,
           "increasing": False, "prob": 0.5}  # fmt: skip
    names = {"m": "magnitude", "n": "num_ops", "mstd": "magnitude_std", "mmax": "magnitude_max",
             "inc": "increasing", "p": "prob"}  # fmt: skip
    for part in parts[1:]:
        match = _FIELD.match(part)
        try:
            key, value = names[match.group(1)], float(match.group(2))  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            raise ValueError(
                f"cannot read {part!r} of the RandAugment policy {policy!r} "
                "(fields: m, n, mstd, mmax, inc, p)"
            ) from None
        out[key] = int(value) if key == "num_ops" else bool(value) if key == "increasing" else value
    return out


def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() < 0.5 else value


def _affine(img: Image.Image, matrix: Sequence[float], fill: tuple) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, tuple(matrix),
                         resample=Image.Resampling.BICUBIC, fillcolor=fill)  # fmt: skip


def _enhance(kind: Callable, increasing: bool) -> Callable:
    def apply(img, level, rng, fill):
        factor = 1.0 + _signed(level * 0.9, rng) if increasing else level * 1.8 + 0.1
        return kind(img).enhance(factor)

    return apply


def _solarize_add(img, level, rng, fill):
    add = int(level * 110)
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _ops() -> dict[str, Callable]:
    """name -> ``(img, level in [0, 1], rng, fill) -> img``."""
    ops: dict[str, Callable] = {
        "AutoContrast": lambda img, level, rng, fill: ImageOps.autocontrast(img),
        "Equalize": lambda img, level, rng, fill: ImageOps.equalize(img),
        "Invert": lambda img, level, rng, fill: ImageOps.invert(img),
        "Rotate": lambda img, level, rng, fill: img.rotate(
            _signed(level * 30.0, rng), resample=Image.Resampling.BICUBIC, fillcolor=fill
        ),
        "PosterizeIncreasing": lambda img, level, rng, fill: ImageOps.posterize(
            img, 4 - int(level * 4)
        ),
        "Posterize": lambda img, level, rng, fill: (
            img if int(level * 4) >= 8 else ImageOps.posterize(img, int(level * 4))
        ),
        "SolarizeIncreasing": lambda img, level, rng, fill: ImageOps.solarize(
            img, 256 - int(level * 256)
        ),
        "Solarize": lambda img, level, rng, fill: ImageOps.solarize(img, int(level * 256)),
        "SolarizeAdd": _solarize_add,
        "ShearX": lambda img, level, rng, fill: _affine(
            img, (1, _signed(level * 0.3, rng), 0, 0, 1, 0), fill
        ),
        "ShearY": lambda img, level, rng, fill: _affine(
            img, (1, 0, 0, _signed(level * 0.3, rng), 1, 0), fill
        ),
        "TranslateXRel": lambda img, level, rng, fill: _affine(
            img, (1, 0, _signed(level * 0.45, rng) * img.size[0], 0, 1, 0), fill
        ),
        "TranslateYRel": lambda img, level, rng, fill: _affine(
            img, (1, 0, 0, 0, 1, _signed(level * 0.45, rng) * img.size[1]), fill
        ),
    }
    for name, kind in (("Color", ImageEnhance.Color), ("Contrast", ImageEnhance.Contrast),
                       ("Brightness", ImageEnhance.Brightness),
                       ("Sharpness", ImageEnhance.Sharpness)):  # fmt: skip
        ops[name + "Increasing"], ops[name] = _enhance(kind, True), _enhance(kind, False)
    return ops


_OPS = _ops()


class RandAugment:
    """``(PIL image, rng) -> PIL image`` for a timm policy string; ``fill``: the dataset's mean
    colour (0–255 per channel) for the pixels that geometric operations uncover."""

    def __init__(self, policy: str, fill: Sequence[int] = (124, 116, 104)):
        self.policy = policy
        params = parse_policy(policy)
        self.magnitude: float = params["magnitude"]
        self.num_ops: int = params["num_ops"]
        self.magnitude_std: float = params["magnitude_std"]
        self.magnitude_max: float = params["magnitude_max"]
        self.increasing: bool = params["increasing"]
        self.prob: float = params["prob"]
        self.names = INCREASING_OPS if self.increasing else ORIGINAL_OPS
        self.fill = tuple(int(v) for v in fill)

    def _magnitude(self, rng: np.random.Generator) -> float:
        m = self.magnitude
        if math.isinf(self.magnitude_std):
            m = rng.uniform(0, m)
        elif self.magnitude_std > 0:
            m = rng.normal(m, self.magnitude_std)
        return max(0.0, min(m, self.magnitude_max))

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        fill = self.fill[0] if img.mode == "L" else self.fill
        for index in rng.integers(len(self.names), size=self.num_ops):
            if self.prob < 1.0 and rng.random() > self.prob:
                continue
            img = _OPS[self.names[index]](img, self._magnitude(rng) / 10.0, rng, fill)
        return img
