"""Attention copy (Li et al., NeurIPS 2024, arXiv 2411.09702): a student ViT whose first blocks
use a frozen teacher's attention instead of their own, and the distance between two ViTs'
attention that the evaluation reports.

``config.attention_copy``: ``target`` — "" (off), "attention" (the teacher's attention
probabilities, the port's ``copy``), "q", "k" or "v" (the teacher's queries, keys or values in
place of the student's, the port's ``copy_q/k/v``) — and ``end_layer``: the student's blocks
``0 .. teacher depth + end_layer − 1`` are given the teacher's (−3 by default, as the port).

Conventions of the authors' PyTorch port (github.com/alexlioralexli/attention-transfer,
``models_dual_vit.py``), followed here: the teacher runs without gradient, in train steps with
the student's drop-path masks (:func:`at_jax.models.vit.shared_drop_masks`; in distillation too),
and at test time the copied student runs with the teacher, so evaluation runs both. Pairing: the
port uses one architecture for both; here any two ViTs pair where the given arrays have the
student's shapes — for "attention" the same heads and tokens (patch grid), for q/k/v also the
same head width — and the student has at least the copied blocks. Anything else is refused
with one line naming the block and both shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from at_jax.precision import upcast
from at_jax.vit_losses import TARGETS, vit_depth

__all__ = [
    "AttentionCopy",
    "COPY_TARGETS",
    "attention_kl",
    "attention_distances",
    "paired_blocks",
    "VIT_PAIRS",
    "NO_COPY",
]

COPY_TARGETS = ("", *TARGETS)
# what Networks.attention_pairs names for two ViTs: their attention's distance, block by block
VIT_PAIRS = "self-attention"


@dataclasses.dataclass(frozen=True)
class AttentionCopy:
    """What a student copies from its teacher (``config.attention_copy``); ``target`` "" is
    off."""

    target: str = ""
    end_layer: int = -3

    def __post_init__(self):
        if self.target not in COPY_TARGETS:
            raise ValueError(
                f"config.attention_copy.target must be one of {COPY_TARGETS} ('' = off), got "
                f"{self.target!r}"
            )
        if not isinstance(self.end_layer, int) or isinstance(self.end_layer, bool):
            raise ValueError(
                f"config.attention_copy.end_layer must be an integer <= 0, got {self.end_layer!r}"
            )
        if self.end_layer > 0:
            raise ValueError(
                f"config.attention_copy.end_layer must be <= 0 (blocks 0..depth+end_layer-1 "
                f"are copied; 0: every block), got {self.end_layer}"
            )

    @classmethod
    def from_config(cls, config: Any) -> AttentionCopy:
        section = dict(config.get("attention_copy", None) or {})
        unknown = sorted(set(section) - {"target", "end_layer"})
        if unknown:
            raise ValueError(
                f"unknown key(s) {unknown} in config.attention_copy; it takes target and end_layer"
            )
        return cls(section.get("target", ""), section.get("end_layer", -3))

    @property
    def on(self) -> bool:
        return bool(self.target)

    @property
    def key(self) -> str:
        """The sown activation of a block that is copied."""
        return "attention_logits" if self.target == "attention" else self.target

    def blocks(self, teacher_depth: int) -> int:
        """How many blocks are copied from a teacher of ``teacher_depth`` blocks."""
        count = teacher_depth + self.end_layer
        if count < 1:
            raise ValueError(
                f"config.attention_copy.end_layer={self.end_layer} copies no block of a "
                f"{teacher_depth}-block teacher; use an end_layer in [{1 - teacher_depth}, 0]"
            )
        return count

    def check_pair(self, student_shapes: Mapping, teacher_shapes: Mapping) -> None:
        """Raise ``ValueError`` (one line) unless the student can take the teacher's arrays;
        the arguments are the two networks' sown activations (arrays or shapes)."""
        t_depth, s_depth = vit_depth(teacher_shapes), vit_depth(student_shapes)
        if not t_depth or not s_depth:
            side = "teacher" if not t_depth else "student"
            raise ValueError(
                f"attention copy needs a ViT student and a ViT teacher (at_jax.models.vit); the "
                f"{side} is not one"
            )
        count = self.blocks(t_depth)
        if s_depth < count:
            raise ValueError(
                f"attention copy of blocks 0..{count - 1} (end_layer={self.end_layer}) needs a "
                f"student with at least {count} blocks; it has {s_depth}"
            )
        for i in range(count):
            name = f"block{i}.{self.key}"
            s, t = tuple(student_shapes[name].shape), tuple(teacher_shapes[name].shape)
            if s != t:
                raise ValueError(
                    f"attention copy: the teacher's {name} has shape {t} but the student's is "
                    f"{s}; copy between ViTs with the same heads, patch grid"
                    + (" and head width" if self.target != "attention" else "")
                )

    def student_inputs(self, teacher_acts: Mapping[str, jax.Array]) -> dict[str, Any]:
        """The student's extra ``__call__`` arguments (``given``, ``given_kind``) from the
        teacher's sown activations; no gradient reaches the teacher."""
        if not self.on:
            return {}
        given = [
            jax.lax.stop_gradient(teacher_acts[f"block{i}.{self.key}"])
            for i in range(self.blocks(vit_depth(teacher_acts)))
        ]
        if self.target == "attention":
            given = [jax.nn.softmax(upcast(g), axis=-1) for g in given]
        return {"given": given, "given_kind": self.target}


def attention_kl(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """Per example (B,): KL(teacher ‖ student) of one block's attention over the keys, averaged
    over heads and queries — the distillation loss less the teacher's entropy (0 when equal)."""
    t_log = jax.nn.log_softmax(upcast(teacher_logits), axis=-1)
    s_log = jax.nn.log_softmax(upcast(student_logits), axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(t_log) * (t_log - s_log), axis=-1), axis=(1, 2))


NO_COPY = AttentionCopy()  # attention copy off


def paired_blocks(student_acts: Mapping[str, Any], teacher_acts: Mapping[str, Any]) -> list[int]:
    """The blocks two ViTs share with the same attention shape (arrays or shapes)."""
    return [
        i
        for i in range(min(vit_depth(student_acts), vit_depth(teacher_acts)))
        if student_acts[f"block{i}.attention_logits"].shape
        == teacher_acts[f"block{i}.attention_logits"].shape
    ]


def attention_distances(
    student_acts: Mapping[str, jax.Array], teacher_acts: Mapping[str, jax.Array]
) -> dict[str, jax.Array]:
    """:func:`attention_kl` of every :func:`paired_blocks` block, keyed
    ``"block{i}.attention<-block{i}.attention"``. The student's own attention is measured: in
    copied blocks it is what the student would attend to, not what it used."""
    return {
        f"block{i}.attention<-block{i}.attention": attention_kl(
            student_acts[f"block{i}.attention_logits"], teacher_acts[f"block{i}.attention_logits"]
        )
        for i in paired_blocks(student_acts, teacher_acts)
    }
