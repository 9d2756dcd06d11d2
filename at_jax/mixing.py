"""The MAE fine-tuning recipe's batch regularisers, on the device inside the train step: label
smoothing (:func:`smooth_targets`), mixup/CutMix (:func:`mix_batch`) and random erasing
(:func:`random_erasing`). Pure functions of a key and arrays.

They follow timm's, which MAE and the attention-transfer port call (``timm.data.Mixup`` with
``mode="batch"``, ``timm.data.RandomErasing`` with ``mode="pixel"``), and are tested against
PyTorch versions written from them in the tests: one λ ~ Beta(α, α) per batch, mixing each image
with the batch reversed; with both mixup and CutMix on, CutMix with ``switch_prob``; the CutMix
box of side ratio √(1 − λ) centred uniformly and clipped, λ then corrected to the box's area; the
targets ``λ·y + (1 − λ)·flip(y)`` of labels smoothed to ``1 − s + s/C`` and ``s/C``. Random
erasing: per image with probability ``prob``, up to 10 tries of an area in [0.02, 1/3] of the
image and an aspect ratio in [0.3, 1/0.3] (log-uniform) until the box fits, filled with N(0, 1)
noise per pixel and channel (the images are normalised by then).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

__all__ = ["smooth_targets", "mix_batch", "cutmix_box", "random_erasing", "regularize"]


def smooth_targets(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """(B, C) one-hot targets smoothed to ``1 − s + s/C`` and ``s/C`` (timm's)."""
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def cutmix_box(key: jax.Array, lam: jax.Array, height: int, width: int) -> tuple:
    """``(top, bottom, left, right)`` of timm's ``rand_bbox``: sides ``int(side·√(1 − λ))``, a
    centre drawn uniformly over the image, clipped to it."""
    ratio = jnp.sqrt(1.0 - lam)
    cut_h, cut_w = (jnp.floor(side * ratio).astype(jnp.int32) for side in (height, width))
    ky, kx = jax.random.split(key)
    cy = jax.random.randint(ky, (), 0, height)
    cx = jax.random.randint(kx, (), 0, width)
    top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    return top, bottom, left, right


def mix_batch(
    key: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    num_classes: int,
    *,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(images, targets, λ)`` of one (B, H, W, C) batch mixed as timm's ``Mixup(mode="batch")``
    (see the module doc); with both α 0, the images as given and the smoothed targets."""
    targets = smooth_targets(labels, num_classes, smoothing)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, targets, jnp.ones((), jnp.float32)
    k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(key, 5)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.ones(())
    lam_cut = (
        jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.ones(())
    )
    applied = jax.random.uniform(k_apply) < prob
    lam = jnp.where(applied, jnp.where(use_cutmix, lam_cut, lam_mix), 1.0).astype(jnp.float32)
    height, width = images.shape[1:3]
    top, bottom, left, right = cutmix_box(k_box, lam, height, width)
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    cut = applied & use_cutmix
    flipped = images[::-1]
    cut_images = jnp.where(box[None, :, :, None], flipped, images)
    mixed_images = images * lam.astype(images.dtype) + flipped * (1 - lam).astype(images.dtype)
    lam = jnp.where(cut, 1.0 - (bottom - top) * (right - left) / (height * width), lam)
    out = jnp.where(cut, cut_images, jnp.where(applied, mixed_images, images))
    return out, targets * lam + targets[::-1] * (1.0 - lam), lam


def _erase_one(key: jax.Array, image: jax.Array, prob: float) -> jax.Array:
    height, width = image.shape[:2]
    k_apply, k_area, k_ratio, k_top, k_left, k_fill = jax.random.split(key, 6)
    tries = 10
    area = jax.random.uniform(k_area, (tries,), minval=0.02, maxval=1 / 3) * height * width
    ratio = jnp.exp(
        jax.random.uniform(k_ratio, (tries,), minval=math.log(0.3), maxval=-math.log(0.3))
    )
    h = jnp.round(jnp.sqrt(area * ratio)).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(area / ratio)).astype(jnp.int32)
    fits = (w < width) & (h < height)
    first = jnp.argmax(fits)  # the first try that fits, as timm's loop
    h, w = h[first], w[first]
    top = jnp.floor(jax.random.uniform(k_top) * (height - h + 1)).astype(jnp.int32)
    left = jnp.floor(jax.random.uniform(k_left) * (width - w + 1)).astype(jnp.int32)
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    box = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    erase = box & fits.any() & (jax.random.uniform(k_apply) < prob)
    noise = jax.random.normal(k_fill, image.shape, jnp.float32).astype(image.dtype)
    return jnp.where(erase[:, :, None], noise, image)


def random_erasing(key: jax.Array, images: jax.Array, prob: float) -> jax.Array:
    """timm's ``RandomErasing(prob, mode="pixel")`` on each normalised image of (B, H, W, C)."""
    if prob <= 0:
        return images
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(_erase_one, in_axes=(0, 0, None))(keys, images, prob)


def regularize(
    key: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int, augment: Any
) -> tuple[jax.Array, Optional[jax.Array]]:
    """``(images, soft targets or None)`` of a normalised training batch, as
    ``config.data.augment`` asks (``random_erasing``: its probability; ``mixup`` and
    ``cutmix``: their α; ``mixup_prob``, ``mixup_switch_prob``): erasing first, then mixing, as
    MAE's per-image transforms come before its batch ``Mixup``. Targets are None without
    mixing (the labels stand); label smoothing is the ``ce`` term's (``label_smoothing``)."""
    k_erase, k_mix = jax.random.split(key)
    images = random_erasing(k_erase, images, augment.get("random_erasing", 0.0))
    mixup, cutmix = augment.get("mixup", 0.0), augment.get("cutmix", 0.0)
    if mixup <= 0 and cutmix <= 0:
        return images, None
    images, targets, _ = mix_batch(
        k_mix,
        images,
        labels,
        num_classes,
        mixup_alpha=mixup,
        cutmix_alpha=cutmix,
        prob=augment.get("mixup_prob", 1.0),
        switch_prob=augment.get("mixup_switch_prob", 0.5),
    )
    return images, targets
