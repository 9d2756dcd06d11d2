"""Attention-map figures: call :func:`attention_figure` to save input images beside each model's
attention maps at its transfer points, as a PNG (matplotlib)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import jax.numpy as jnp
import numpy as np

from at_jax.analysis import as_model_fn
from at_jax.attention import spatial_map
from at_jax.data.augment import normalize

__all__ = ["attention_figure"]

Points = Union[Sequence[str], Mapping[str, Sequence[str]]]


def attention_figure(
    path: str,
    images_u8: np.ndarray,
    models: Mapping[str, Any],
    mean: Any = None,
    std: Any = None,
    points: Points = ("group0", "group1", "group2"),
    *,
    preprocess: Optional[Callable[[Any], Any]] = None,
) -> str:
    """Save a grid: one row per image, the image then each model's attention at its points.

    Args:
      path: the PNG to write.
      images_u8: (N, H, W, C) uint8 images (C = 1 or 3).
      models: label -> a function ``x -> (logits, acts)`` (:func:`at_jax.capture.model_fn`, a
        :class:`at_jax.runs.Teacher`) or an at_jax ``(module, variables)`` pair.
      mean, std: normalise the images with them first (at_jax's preprocessing); or
        ``preprocess``: any function applied to the images first; or neither (a Teacher
        preprocesses uint8 images itself).
      points: the activation names shown for every model, or label -> that model's names
        (models with different names: ``{"teacher": ["group1", "group2"], "mine": ["stage1",
        "stage2"]}``). An unknown name raises with the model's names.

    Maps are F_sum² with the mean reduction (the reference code's), unnormalised. Returns
    ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if mean is not None:
        x: Any = normalize(jnp.asarray(images_u8), mean, std)
    else:
        x = preprocess(images_u8) if preprocess is not None else images_u8
    maps = {}
    for label, model in models.items():
        names = list(points[label] if isinstance(points, Mapping) else points)
        _, acts = as_model_fn(model)(x)
        missing = [n for n in names if n not in acts]
        if missing:
            raise ValueError(f"model {label!r} has no activation {missing}; it has {sorted(acts)}")
        maps[label] = [(n, np.asarray(spatial_map(acts[n]))) for n in names]
    n_img = len(images_u8)
    n_cols = 1 + sum(len(m) for m in maps.values())
    fig, axes = plt.subplots(n_img, n_cols, figsize=(1.3 * n_cols, 1.4 * n_img), squeeze=False)
    for i in range(n_img):
        axes[i, 0].imshow(images_u8[i].squeeze(), cmap="gray" if images_u8.shape[-1] == 1 else None)
        col = 1
        for label, model_maps in maps.items():
            for name, m in model_maps:
                axes[i, col].imshow(m[i], cmap="jet")
                if i == 0:
                    axes[i, col].set_title(f"{label}\n{name}", fontsize=7)
                col += 1
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
