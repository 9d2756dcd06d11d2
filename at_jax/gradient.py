"""Gradient-based attention (paper §3.2, eqs. 3–6): loss terms built from input gradients.

The input-gradient "attention" of a network is ``J = ∂L(W, x)/∂x`` with ``L`` the cross-entropy
of each example (per-example gradients: the batch's summed CE is differentiated, so ``J_i``
does not shrink with the batch size). Terms, registered in :mod:`at_jax.losses`:

  grad_at    β/2 · mean_i ||J_S,i − J_T,i||²                       (eq. 4)
  min_l2     β/2 · mean_i ||J_S,i||²                               (Drucker & LeCun double backprop)
  symmetry   β/2 · mean_i ||J_S,i − flip(∂L(W, flip(x))/∂x)_i||²   (eq. 6, horizontal flip)

(the config's ``weight`` is β; the terms include the 1/2). The norms are squared by default:
eq. 5 is the gradient of β/2·||J_S − J_T||², and double backprop squares too (eqs. 4 and 6 as
printed show the plain norm: ``squared=False``). The student's update differentiates
through ``J_S`` — eq. 5's second-order term comes from ``jax.grad`` of a function that itself
calls ``jax.grad``; nothing is hand-derived. The teacher's ``J_T`` is a constant.

Batch norm in the second backprop is the paper's open question; ``config.gradient.bn_mode``:

  "batch_stats"  the input-gradient pass uses batch statistics, exactly as the training forward
                 (it is the same computation); running statistics are updated once, by the
                 training forward only;
  "frozen"       the input-gradient pass uses the running statistics (eval-mode BN), a separate
                 forward whose normalisation does not depend on the batch.

Models without BN (Table 3's NIN) behave identically in both modes.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from at_jax import losses
from at_jax.precision import upcast

BN_MODES = ("batch_stats", "frozen")


def input_gradient(logits_fn: Callable[[jax.Array], jax.Array], images: jax.Array,
                   labels: jax.Array) -> jax.Array:
    """Per-example ``∂CE(logits_fn(x)_i, y_i)/∂x_i`` (the gradient of the summed CE)."""
    def summed_ce(x):
        logits = logits_fn(x)
        return optax.softmax_cross_entropy_with_integer_labels(
            upcast(logits), labels).sum()
    return jax.grad(summed_ce)(images)


def flip(x: jax.Array) -> jax.Array:
    """Horizontal flip of NHWC images."""
    return x[:, :, ::-1, :]


def input_gradient_quantities(student_fn_factory, params, batch_stats,
                              teacher_fn: Optional[Callable], images, labels,
                              bn_mode: str = "batch_stats") -> dict[str, Callable]:
    """Lazy input gradients for :class:`~at_jax.losses.StepOutputs` (computed only if a term asks).

    ``student_fn_factory(params, batch_stats, train)`` returns ``x -> (logits, acts, stats)``;
    ``teacher_fn(x)`` likewise for the fixed teacher (eval mode).
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"config.gradient.bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    student = student_fn_factory(params, batch_stats, bn_mode == "batch_stats")
    student_logits = lambda x: student(x)[0]  # noqa: E731

    lazy = {
        "student_input_grad": lambda: input_gradient(student_logits, images, labels),
        "student_input_grad_flipped": lambda: flip(
            input_gradient(student_logits, flip(images), labels)),
    }
    if teacher_fn is not None:
        lazy["teacher_input_grad"] = lambda: jax.lax.stop_gradient(
            input_gradient(lambda x: teacher_fn(x)[0], images, labels))
    return lazy


def _per_example_norm(x: jax.Array, squared: bool = True) -> jax.Array:
    """Mean over the batch of each example's l2 norm (differentiable at 0)."""
    flat = upcast(x.reshape(x.shape[0], -1))
    if squared:
        return jnp.mean(jnp.sum(flat * flat, axis=-1))
    return jnp.mean(optax.safe_norm(flat, 0.0, axis=-1))


@losses.register_term("grad_at", needs_teacher=True)
def grad_at_term(out: losses.StepOutputs, squared: bool = True) -> jax.Array:
    """Eq. 4: ½ ||J_S − J_T||² per example, averaged (``squared=False``: ½ ||J_S − J_T||₂)."""
    out.require_teacher("grad_at")
    diff = out.get("student_input_grad") - out.get("teacher_input_grad")
    return 0.5 * _per_example_norm(diff, squared)


@losses.register_term("min_l2")
def min_l2_term(out: losses.StepOutputs, squared: bool = True) -> jax.Array:
    """Double backprop: ½ ||∂L/∂x||² per example, averaged (``squared=False``: the norm)."""
    return 0.5 * _per_example_norm(out.get("student_input_grad"), squared)


@losses.register_term("symmetry")
def symmetry_term(out: losses.StepOutputs, squared: bool = True) -> jax.Array:
    """Eq. 6: ½ ||∂L(W,x)/∂x − flip(∂L(W, flip x)/∂x)||² per example, averaged (``squared=False``:
    the norm)."""
    diff = out.get("student_input_grad") - out.get("student_input_grad_flipped")
    return 0.5 * _per_example_norm(diff, squared)
