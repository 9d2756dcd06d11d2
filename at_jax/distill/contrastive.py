"""CRD, contrastive representation distillation (Tian, Krishnan, Isola, ICLR 2020), as
RepDistiller's ``crd/`` (b84f547): the student's and the teacher's pooled features embedded by
:class:`Embed` (linear, then L2-normalised, 128 dimensions), scored against a memory bank of
every training example's embedding from the other network (one positive, the example itself,
and K negatives of other classes, :func:`sample_contrast_indices`), the NCE loss of both
directions (:func:`contrast_loss`), and the banks updated with momentum from the batch
(:func:`update_memory`). The bank is state that is not trained (:class:`CRDState`): the train
state carries it, the step returns the new one.

Constants as the reference: K = 16384 negatives, temperature 0.07, momentum 0.5, banks drawn
uniformly in ±1/√(dim/3), the normalisation constants Z set from the first batch (its mean
score times the dataset size) and fixed after.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from at_jax.distill.relational import normalize_rows
from at_jax.precision import upcast

__all__ = [
    "CRDState",
    "ClassIndex",
    "class_index",
    "Embed",
    "init_crd_state",
    "sample_contrast_indices",
    "contrast_scores",
    "contrast_loss",
    "update_memory",
    "crd_loss",
    "NCE_K",
    "NCE_T",
    "NCE_M",
    "FEAT_DIM",
]

NCE_K, NCE_T, NCE_M, FEAT_DIM = 16384, 0.07, 0.5, 128
EPS = 1e-7


class CRDState(NamedTuple):
    """CRD's memory: ``memory_s``/``memory_t`` (N, dim), the student's and the teacher's
    embedding of every training example; ``z_s``/``z_t``: the normalisation constants, −1 until
    the first batch sets them."""

    memory_s: jax.Array
    memory_t: jax.Array
    z_s: jax.Array
    z_t: jax.Array


class ClassIndex(NamedTuple):
    """Where the negatives are drawn from, derived from the training set's labels (not state):
    ``by_class`` (N,), the dataset's indices grouped by class; ``class_start``/``class_count``
    (classes,), where each class's run begins and its length."""

    by_class: jax.Array
    class_start: jax.Array
    class_count: jax.Array


def class_index(dataset_labels: np.ndarray) -> ClassIndex:
    """The :class:`ClassIndex` of a training set whose labels, in dataset order, are
    ``dataset_labels`` (N,)."""
    labels = np.asarray(dataset_labels).astype(np.int64).reshape(-1)
    if labels.shape[0] < 2 or labels.min() < 0:
        raise ValueError(
            "CRD needs the labels of the training set (>= 2 examples, labels >= 0); got "
            f"{labels.shape[0]} examples{'' if not len(labels) else f', smallest {labels.min()}'}"
        )
    counts = np.bincount(labels)
    if np.count_nonzero(counts) < 2:
        raise ValueError("CRD draws its negatives from other classes: the training set has one")
    return ClassIndex(
        by_class=jnp.asarray(np.argsort(labels, kind="stable"), jnp.int32),
        class_start=jnp.asarray(np.cumsum(counts) - counts, jnp.int32),
        class_count=jnp.asarray(counts, jnp.int32),
    )


def init_crd_state(key: jax.Array, n_data: int, dim: int = FEAT_DIM) -> CRDState:
    """Banks of ``n_data`` rows drawn uniformly in ±1/√(dim/3), as ``ContrastMemory``."""
    if n_data < 2:
        raise ValueError(f"CRD needs the training set's size (>= 2 examples), got {n_data}")
    stdv = 1.0 / math.sqrt(dim / 3)
    k_s, k_t = jax.random.split(key)
    draw = lambda k: jax.random.uniform(k, (n_data, dim), jnp.float32, -stdv, stdv)  # noqa: E731
    minus_one = jnp.full((), -1.0, jnp.float32)
    return CRDState(draw(k_s), draw(k_t), minus_one, minus_one)


class Embed(nn.Module):
    """CRD's embedding head (``crd/criterion.py: Embed``): flatten, linear to ``dim``, divide by
    the L2 norm (by max(‖x‖, 1e-12), as PyTorch's
    ``F.normalize``: a zero vector stays zero, its gradient finite)."""

    dim: int = FEAT_DIM

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.dim, name="linear")(upcast(x).reshape(x.shape[0], -1))
        return normalize_rows(x)


def sample_contrast_indices(
    key: jax.Array, index: ClassIndex, indices: jax.Array, labels: jax.Array, k: int = NCE_K
) -> jax.Array:
    """(B, 1 + k) dataset indices: each example's own ``indices`` first, then ``k`` drawn
    uniformly, with replacement, among the training examples of other classes than its
    ``labels`` (the reference's ``CIFAR100InstanceSample`` in its default ``exact`` mode)."""
    n = index.by_class.shape[0]
    own, start = index.class_count[labels], index.class_start[labels]  # (B,)
    # the r-th example outside class c in class order: r itself before the class, r + |c| after
    r = jax.random.randint(key, (labels.shape[0], k), 0, n - own[:, None])
    rank = jnp.where(r < start[:, None], r, r + own[:, None])
    return jnp.concatenate([indices[:, None].astype(jnp.int32), index.by_class[rank]], axis=1)


def contrast_scores(anchor: jax.Array, memory: jax.Array, idx: jax.Array, t: float) -> jax.Array:
    """``exp(memory[idx] · anchor / t)`` (B, 1 + k), unnormalised. Computed as the anchors'
    scores against the whole bank, then gathered: N·B products instead of the reference's
    (B, 1 + k, dim) copy of the bank's rows (the same dot products)."""
    all_scores = jax.lax.stop_gradient(memory) @ anchor.T  # (N, B)
    return jnp.exp(jnp.take_along_axis(all_scores.T, idx, axis=1) / t)


def contrast_loss(x: jax.Array, n_data: int) -> jax.Array:
    """NCE of normalised scores ``x`` (B, 1 + k), the positive first (``ContrastLoss``, eq. 18):
    −(Σ log P(pos)/(P(pos) + k/N) + Σ log (k/N)/(P(neg) + k/N)) / B."""
    k = x.shape[1] - 1
    noise = k / float(n_data)
    log_d1 = jnp.log(x[:, 0] / (x[:, 0] + noise + EPS))
    log_d0 = jnp.log(noise / (x[:, 1:] + noise + EPS))
    return -(jnp.sum(log_d1) + jnp.sum(log_d0)) / x.shape[0]


def update_memory(memory: jax.Array, v: jax.Array, indices: jax.Array, momentum: float):
    """Rows ``indices`` of ``memory`` moved towards the batch's embeddings ``v``:
    ``normalize(m · memory[i] + (1 − m) · v)`` (``ContrastMemory``'s update, no gradient)."""
    rows = memory[indices] * momentum + jax.lax.stop_gradient(v) * (1 - momentum)
    rows = normalize_rows(rows)
    return memory.at[indices].set(rows)


def crd_loss(
    v_s: jax.Array,
    v_t: jax.Array,
    state: CRDState,
    contrast_idx: jax.Array,
    temperature: float = NCE_T,
    momentum: float = NCE_M,
) -> tuple[jax.Array, CRDState]:
    """CRD's loss for embedded (unit-norm) student ``v_s`` and teacher ``v_t`` vectors (B, dim)
    and ``contrast_idx`` (B, 1 + k; :func:`sample_contrast_indices`), with its new state:
    the student anchored against the teacher's bank plus the teacher against the student's
    (``CRDLoss``), then both banks updated at the batch's own indices (column 0). Both
    embeddings get gradients (the reference trains both heads); the banks and Z do not."""
    n = state.memory_s.shape[0]
    out_s = contrast_scores(v_s, state.memory_t, contrast_idx, temperature)
    out_t = contrast_scores(v_t, state.memory_s, contrast_idx, temperature)
    z_s = jnp.where(state.z_s < 0, jax.lax.stop_gradient(jnp.mean(out_s)) * n, state.z_s)
    z_t = jnp.where(state.z_t < 0, jax.lax.stop_gradient(jnp.mean(out_t)) * n, state.z_t)
    loss = contrast_loss(out_s / z_s, n) + contrast_loss(out_t / z_t, n)
    own = contrast_idx[:, 0]
    new = state._replace(
        memory_s=update_memory(state.memory_s, v_s, own, momentum),
        memory_t=update_memory(state.memory_t, v_t, own, momentum),
        z_s=z_s,
        z_t=z_t,
    )
    return loss, new
