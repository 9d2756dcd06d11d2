"""Attention-map figures: input images and each model's per-group attention maps, as a PNG."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from at_jax.attention import spatial_map
from at_jax.data.augment import normalize
from at_jax.models import forward


def attention_figure(path: str, images_u8: np.ndarray, models: Mapping[str, tuple],
                     mean, std, points: Sequence[str] = ("group0", "group1", "group2")) -> str:
    """Save a grid: one row per (image, model), the image then its attention at ``points``.

    ``models`` maps a label to ``(flax_module, variables)``; maps are F_sum^2 (mean reduce).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = normalize(images_u8, mean, std)
    maps = {}
    for label, (model, variables) in models.items():
        _, acts, _ = forward(model, variables, x)
        maps[label] = [np.asarray(spatial_map(acts[p])) for p in points]
    n_img, n_models = len(images_u8), len(models)
    fig, axes = plt.subplots(n_img, 1 + n_models * len(points),
                             figsize=(1.3 * (1 + n_models * len(points)), 1.4 * n_img),
                             squeeze=False)
    for i in range(n_img):
        axes[i, 0].imshow(images_u8[i].squeeze(), cmap="gray" if images_u8.shape[-1] == 1 else None)
        for m, label in enumerate(models):
            for g, point in enumerate(points):
                ax = axes[i, 1 + m * len(points) + g]
                ax.imshow(maps[label][g][i], cmap="jet")
                if i == 0:
                    ax.set_title(f"{label}\n{point}", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
