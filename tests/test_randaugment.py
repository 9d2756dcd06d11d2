"""RandAugment on the host (at_jax.data.randaugment) against timm's definitions: the policy
string, each operation's magnitude → argument map (written out here from timm's auto_augment.py
and applied with PIL), the per-example random stream, and its place in the streamed transform."""

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from at_jax.data.randaugment import INCREASING_OPS, ORIGINAL_OPS, RandAugment, parse_policy
from at_jax.data.transforms import TrainTransform

FILL = (124, 116, 104)
BICUBIC = Image.Resampling.BICUBIC


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))


def affine(img, matrix):
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=BICUBIC, fillcolor=FILL)


def timm_candidates(name, img, m):
    """What timm's op ``name`` makes of ``img`` at magnitude m (each sign where it draws one)."""
    level = m / 10
    signs = (1.0, -1.0)
    if name in ("AutoContrast", "Equalize", "Invert"):
        return [getattr(ImageOps, {"AutoContrast": "autocontrast"}.get(name, name.lower()))(img)]
    if name == "Rotate":
        return [img.rotate(s * level * 30, resample=BICUBIC, fillcolor=FILL) for s in signs]
    if name == "PosterizeIncreasing":
        return [ImageOps.posterize(img, 4 - int(level * 4))]
    if name == "Posterize":
        return [ImageOps.posterize(img, int(level * 4))]
    if name == "SolarizeIncreasing":
        return [ImageOps.solarize(img, 256 - int(level * 256))]
    if name == "Solarize":
        return [ImageOps.solarize(img, int(level * 256))]
    if name == "SolarizeAdd":
        lut = [min(255, i + int(level * 110)) if i < 128 else i for i in range(256)]
        return [img.point(lut * 3)]
    if name.startswith(("Color", "Contrast", "Brightness", "Sharpness")):
        kind = getattr(ImageEnhance, name.replace("Increasing", ""))
        factors = (
            [1 + s * level * 0.9 for s in signs] if "Increasing" in name else [level * 1.8 + 0.1]
        )
        return [kind(img).enhance(f) for f in factors]
    if name in ("ShearX", "ShearY"):
        return [
            affine(
                img,
                (1, s * level * 0.3, 0, 0, 1, 0)
                if name == "ShearX"
                else (1, 0, 0, s * level * 0.3, 1, 0),
            )
            for s in signs
        ]
    width, height = img.size
    if name == "TranslateXRel":
        return [affine(img, (1, 0, s * level * 0.45 * width, 0, 1, 0)) for s in signs]
    assert name == "TranslateYRel"
    return [affine(img, (1, 0, 0, 0, 1, s * level * 0.45 * height)) for s in signs]


def test_the_policy_string_is_timms():
    assert parse_policy("rand-m9-mstd0.5-inc1") == {
        "magnitude": 9.0,
        "num_ops": 2,
        "magnitude_std": 0.5,
        "magnitude_max": 10.0,
        "increasing": True,
        "prob": 0.5,
    }
    assert parse_policy("rand-m7-n3-p1.0-mmax12")["num_ops"] == 3
    assert not parse_policy("rand-m9")["increasing"]
    with pytest.raises(ValueError, match="starts with 'rand'"):
        parse_policy("auto-m9")
    with pytest.raises(ValueError, match="cannot read 'x9'"):
        parse_policy("rand-m9-x9")


@pytest.mark.parametrize("name", sorted(set(INCREASING_OPS) | set(ORIGINAL_OPS)))
def test_each_operation_is_timms_at_magnitude_9(image, name):
    augment = RandAugment("rand-m9-n1-p1.0", FILL)  # no magnitude noise, always applied
    augment.names = (name,)
    candidates = [np.asarray(c) for c in timm_candidates(name, image, 9.0)]
    for seed in range(4):
        out = np.asarray(augment(image, np.random.default_rng(seed)))
        assert any(np.array_equal(out, c) for c in candidates), seed
    assert not np.array_equal(np.asarray(image), candidates[0]) or name == "Posterize"


def test_random_stream_probability_and_grey_images(image):
    augment = RandAugment("rand-m9-mstd0.5-inc1", FILL)
    a = np.asarray(augment(image, np.random.default_rng(3)))
    b = np.asarray(augment(image, np.random.default_rng(3)))
    np.testing.assert_array_equal(a, b)
    outs = {np.asarray(augment(image, np.random.default_rng(s))).tobytes() for s in range(12)}
    assert len(outs) > 6
    never = RandAugment("rand-m9-p0.0", FILL)
    np.testing.assert_array_equal(np.asarray(never(image, np.random.default_rng(0))), image)
    grey = image.convert("L")
    assert augment(grey, np.random.default_rng(1)).mode == "L"
    transform = TrainTransform(16, flip=False, randaugment=RandAugment("rand-m9-n2-p1.0", FILL))
    plain = TrainTransform(16, flip=False)
    record = {"image": np.asarray(image), "label": 1}
    first = transform(record, np.random.default_rng(5))["image"]
    np.testing.assert_array_equal(first, transform(record, np.random.default_rng(5))["image"])
    assert first.shape == (16, 16, 3)
    assert not np.array_equal(first, plain(record, np.random.default_rng(5))["image"])


def test_config_checks_the_policy_and_where_it_runs():
    from at_jax.recipes import base_config, validate_config

    config = base_config()
    config.data.name = "imagefolder"
    config.data.augment.randaugment = "rand-m9-mstd0.5-inc1"
    validate_config(config)
    config.data.augment.randaugment = "rand-m9-q1"
    with pytest.raises(ValueError, match="randaugment: cannot read 'q1'"):
        validate_config(config)
    config.data.name, config.data.augment.randaugment = "cifar10", "rand-m9"
    with pytest.raises(ValueError, match="runs in the streamed pipeline"):
        validate_config(config)
