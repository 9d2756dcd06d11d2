"""Attention-map figures, as PNGs (matplotlib): :func:`attention_figure` saves input images beside
each model's spatial attention maps at its transfer points (the 2017 paper's);
:func:`vit_attention_figure` beside ViTs' self-attention (the class token's attention over the
patches, per head: what Li et al. 2024 transfer)."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from at_jax.analysis import Preprocess, as_model_fn, preprocess_for
from at_jax.attention import spatial_map
from at_jax.naming import unknown_names_message
from at_jax.preprocess import normalize

__all__ = ["attention_figure", "vit_attention_figure"]

Points = Union[Sequence[str], Mapping[str, Sequence[str]]]

_TITLE_WIDTH = 14  # characters per title line, for a column 1.4 inches wide at 7 points


def _wrap(text: str, max_lines: int) -> list[str]:
    """``text`` in lines of at most ``_TITLE_WIDTH`` characters (broken after "/" and "_"
    where it has them); past ``max_lines``, the middle is cut ("…")."""
    spaced = text.replace("/", "/ ").replace("_", "_ ")
    wrapped = textwrap.wrap(spaced, _TITLE_WIDTH, break_on_hyphens=False)
    lines = [w.replace("/ ", "/").replace("_ ", "_").replace(" ", "") for w in wrapped]
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], "…" + lines[-1]]
    return lines


def _title(label: str, name: str) -> str:
    """A column title that fits its column: the model's label, then the point's name, each
    wrapped to at most two lines."""
    return "\n".join(_wrap(label, 2) + _wrap(name, 2))


def attention_figure(
    path: str,
    images_u8: np.ndarray,
    models: Mapping[str, Any],
    mean: Any = None,
    std: Any = None,
    points: Points = ("group0", "group1", "group2"),
    *,
    preprocess: Preprocess = None,
) -> str:
    """Save a grid: one row per image, the image then each model's attention at its points,
    with a colour scale under each column.

    Args:
      path: the PNG to write.
      images_u8: (N, H, W, C) uint8 images (C = 1 or 3).
      models: label -> a function ``x -> (logits, acts)`` (:func:`at_jax.capture.model_fn`, a
        :class:`at_jax.runs.Teacher`) or an at_jax ``(module, variables)`` pair.
      mean, std: normalise the images with them first (at_jax's preprocessing); or
        ``preprocess``: a function applied to the images first, or one per model
        (``{"teacher": teacher.preprocess, "mine": my_preprocess}``; a model without an entry
        gets the images as they are); or neither (a Teacher preprocesses uint8 images itself).
      points: the activation names shown for every model, or label -> that model's names
        (models with different names: ``{"teacher": ["group1", "group2"], "mine": ["stage1",
        "stage2"]}``). An unknown name raises with the model's closest names.

    Maps are F_sum² with the mean reduction (the reference code's), unnormalised; each column
    (one model at one point) has one colour scale over its images, from 0 to its largest value,
    drawn under it. Long labels and names are wrapped to their column. Returns ``path``.
    """
    if mean is not None:
        if preprocess is not None:
            raise ValueError("give mean/std or preprocess, not both")
        normalized = normalize(jnp.asarray(images_u8), mean, std)
        prep = dict.fromkeys(models, lambda _: normalized)
    else:
        prep = preprocess_for(preprocess, list(models))
    columns = []  # (label, name, (N, h, w) maps)
    for label, model in models.items():
        names = list(points[label] if isinstance(points, Mapping) else points)
        f = prep[label]
        _, acts = as_model_fn(model)(images_u8 if f is None else f(images_u8))
        missing = [n for n in names if n not in acts]
        if missing:
            raise ValueError(
                f"model {label!r} has no activation {missing}; "
                + unknown_names_message(missing, acts)
            )
        columns += [(label, n, np.asarray(spatial_map(acts[n]))) for n in names]
    return _save_columns(path, images_u8, columns)


def vit_attention_figure(
    path: str,
    images_u8: np.ndarray,
    models: Mapping[str, Any],
    block: int,
    heads: Sequence[int] = (0, 1),
    *,
    preprocess: Preprocess = None,
) -> str:
    """Save a grid: one row per image, the image then, for each ViT and head, the class token's
    attention over the patches in ``block`` (softmax of its sown ``block{i}.attention_logits``,
    as a patch grid, one colour scale per column). ``models`` and ``preprocess`` as
    :func:`attention_figure`'s. A copied student's sown attention is its own (what it would
    attend to), not the teacher's that it used. Returns ``path``."""
    prep = preprocess_for(preprocess, list(models))
    name = f"block{block}.attention_logits"
    columns = []
    for label, model in models.items():
        f = prep[label]
        _, acts = as_model_fn(model)(images_u8 if f is None else f(images_u8))
        if name not in acts:
            raise ValueError(
                f"model {label!r} has no {name}: " + unknown_names_message([name], acts)
            )
        attention = np.asarray(jnp.exp(jax.nn.log_softmax(acts[name], axis=-1)))
        grid = acts[f"block{block}"].shape[1:3]  # the patch grid (h, w)
        for head in heads:
            maps = attention[:, head, 0, 1:].reshape(-1, *grid)
            columns.append((label, f"block{block} head{head}", maps))
    return _save_columns(path, images_u8, columns)


def _save_columns(path: str, images_u8: np.ndarray, columns: list) -> str:
    """The figure of :func:`attention_figure`: images, then ``(label, name, (N, h, w) maps)``
    columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_img, n_cols = len(images_u8), 1 + len(columns)
    fig, axes = plt.subplots(
        n_img,
        n_cols,
        figsize=(1.4 * n_cols, 1.4 * n_img + 1.0),
        squeeze=False,
        layout="constrained",
    )
    for i in range(n_img):
        axes[i, 0].imshow(images_u8[i].squeeze(), cmap="gray" if images_u8.shape[-1] == 1 else None)
    axes[0, 0].set_title("image", fontsize=7)
    for col, (label, name, maps) in enumerate(columns, start=1):
        top = float(maps.max()) or 1.0
        for i in range(n_img):
            shown = axes[i, col].imshow(maps[i], cmap="jet", vmin=0.0, vmax=top)
        axes[0, col].set_title(_title(label, name), fontsize=7)
        bar = fig.colorbar(shown, ax=axes[:, col], location="bottom", shrink=0.9, aspect=12)
        bar.ax.tick_params(labelsize=5, rotation=90)
    for ax in axes.flat:
        ax.axis("off")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
