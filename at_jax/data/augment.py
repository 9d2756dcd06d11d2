"""On-device augmentation and normalisation (runs inside the jitted step).

Training: reflect-pad by ``pad`` and take a random crop of the original size, random horizontal
flip, then normalise with the dataset's mean/std (:func:`at_jax.preprocess.normalize`) — the
reference CIFAR pipeline. Reflect padding commutes with the per-pixel normalisation, so the order
does not matter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from at_jax.preprocess import normalize

__all__ = ["augment", "random_crop", "random_flip"]


PAD_MODES = ("reflect", "zeros")


def random_crop(images: jax.Array, key: jax.Array, pad: int, mode: str = "reflect") -> jax.Array:
    """Pad (B, H, W, C) by ``pad`` and crop each image at a random offset. ``mode``: "reflect"
    (the AT paper's code) or "zeros" (torchvision's ``RandomCrop(padding=4)``, RepDistiller's:
    black borders, padded before normalisation)."""
    if mode not in PAD_MODES:
        raise ValueError(f"crop padding mode must be one of {PAD_MODES}, got {mode!r}")
    if pad == 0:
        return images
    b, h, w, c = images.shape
    widths = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    padded = jnp.pad(images, widths, mode="reflect" if mode == "reflect" else "constant")
    offsets = jax.random.randint(key, (b, 2), 0, 2 * pad + 1)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))  # noqa: E731
    return jax.vmap(crop)(padded, offsets)


def random_flip(images: jax.Array, key: jax.Array) -> jax.Array:
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1, :], images)


def augment(
    images_u8: jax.Array,
    key: jax.Array,
    mean,
    std,
    crop_pad: int = 4,
    flip: bool = True,
    dtype=jnp.float32,
    pad_mode: str = "reflect",
) -> jax.Array:
    """Training view of a uint8 batch: random crop (``pad_mode`` padding), normalise, random
    flip."""
    crop_key, flip_key = jax.random.split(key)
    x = random_crop(images_u8, crop_key, crop_pad, pad_mode)
    x = normalize(x, mean, std, dtype)
    return random_flip(x, flip_key) if flip else x
