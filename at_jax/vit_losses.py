"""Attention transfer between Vision Transformers (Li et al., NeurIPS 2024, arXiv 2411.09702),
on arrays: :func:`attention_distillation_loss` for one block, :func:`qkv_distillation_loss` for
its q/k/v variant, and :func:`attention_distillation_losses`, the sum over the distilled blocks of
two ViTs' sown activations (:mod:`at_jax.models.vit`). The teacher's side gets no gradient.
:mod:`at_jax.losses` re-exports the first two.

Conventions of the authors' PyTorch port (github.com/alexlioralexli/attention-transfer,
``models_dual_vit.py``): the logits are q·kᵀ/√d before the softmax; the loss of a block is the
cross-entropy ``−Σ_keys softmax(t)·log_softmax(s)`` averaged over batch, heads and queries, or
for q/k/v PyTorch's ``mse_loss``; the distilled blocks are ``0 .. depth + end_layer − 1`` of the
teacher (``end_layer`` −3 in the port's default, −6 for ViT-L in the paper's command).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from at_jax.precision import upcast

__all__ = [
    "attention_distillation_loss",
    "qkv_distillation_loss",
    "attention_distillation_losses",
    "vit_depth",
    "TARGETS",
]

TARGETS = ("attention", "q", "k", "v")
_LOGITS = re.compile(r"^block(\d+)\.attention_logits$")


def attention_distillation_loss(
    student_attn_logits: jax.Array, teacher_attn_logits: jax.Array
) -> jax.Array:
    """Attention distillation of one ViT block (Li et al., NeurIPS 2024, arXiv 2411.09702): the
    cross-entropy of the student's attention to the teacher's, over the keys, averaged over
    batch, heads and queries.

    Args:
      student_attn_logits: (B, heads, N, N) logits before the softmax (q·kᵀ/√d), as
        :class:`at_jax.models.vit.VisionTransformer` sows them (``block{i}.attention_logits``).
      teacher_attn_logits: the teacher's, same shape; no gradient reaches them.

    Returns:
      ``mean(−Σ_k softmax(t)_k · log_softmax(s)_k)``, a float32 scalar: the port's
      ``distill_loss_fn`` (its minimum is the entropy of the teacher's attention, not 0).
    """
    if student_attn_logits.shape != teacher_attn_logits.shape:
        raise ValueError(
            "attention logits of student and teacher must have the same shape (B, heads, N, N); "
            f"got {student_attn_logits.shape} and {teacher_attn_logits.shape}: pair blocks with "
            "the same number of heads and tokens"
        )
    teacher = jax.nn.softmax(upcast(jax.lax.stop_gradient(teacher_attn_logits)), axis=-1)
    student = jax.nn.log_softmax(upcast(student_attn_logits), axis=-1)
    return -jnp.mean(jnp.sum(teacher * student, axis=-1))


def qkv_distillation_loss(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """The q, k or v variant of attention distillation: ``mean((s − t)²)`` over every element
    (the port's ``mse_loss``); ``teacher`` gets no gradient. Shapes (B, heads, N, d), equal."""
    if student.shape != teacher.shape:
        raise ValueError(f"student and teacher shapes differ: {student.shape} vs {teacher.shape}")
    return jnp.mean((upcast(student) - upcast(jax.lax.stop_gradient(teacher))) ** 2)


def vit_depth(acts: Mapping[str, object]) -> int:
    """The number of blocks whose attention a ViT sowed (``block{i}.attention_logits``)."""
    return sum(1 for name in acts if _LOGITS.match(name))


def attention_distillation_losses(
    student_acts: Mapping[str, jax.Array],
    teacher_acts: Mapping[str, jax.Array],
    end_layer: int = -3,
    target: str = "attention",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(total, {"block{i}": loss})`` over the teacher's blocks ``0 .. depth + end_layer − 1``,
    block i of the student against block i of the teacher (the port pairs two ViTs of the same
    architecture; a student of another depth or width is paired block by block where the
    arrays agree, and refused with the block named where they do not)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    depth = vit_depth(teacher_acts)
    if not depth:
        raise ValueError(
            "attention distillation needs a ViT teacher (at_jax.models.vit): the teacher sowed "
            "no block{i}.attention_logits"
        )
    last = depth + end_layer
    if end_layer > 0 or last < 1:
        raise ValueError(
            f"end_layer={end_layer} distils blocks 0..{last - 1} of a {depth}-block teacher; "
            f"use an end_layer in [{1 - depth}, 0] (0: every block)"
        )
    key = "attention_logits" if target == "attention" else target
    loss = attention_distillation_loss if target == "attention" else qkv_distillation_loss
    per_block = {}
    for i in range(last):
        name = f"block{i}.{key}"
        if name not in student_acts:
            raise ValueError(
                f"the student has no {name}: distilling blocks 0..{last - 1} needs a ViT "
                f"student with at least {last} blocks (it has {vit_depth(student_acts)})"
            )
        try:
            per_block[f"block{i}"] = loss(student_acts[name], teacher_acts[name])
        except ValueError as e:
            raise ValueError(f"block {i} cannot be distilled: {e}") from None
    return sum(per_block.values(), jnp.zeros((), jnp.float32)), per_block
