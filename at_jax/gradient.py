"""Gradient-based attention (paper §3.2, eqs. 3–6) on any model: call :func:`grad_at_loss`,
:func:`min_l2_loss`, :func:`symmetry_loss` with functions ``x -> logits`` or NNX modules.

The input-gradient "attention" of a network is ``J = ∂L(W, x)/∂x`` with ``L`` the cross-entropy
of each example (:func:`input_gradient`: the batch's summed CE is differentiated, so ``J_i`` does
not shrink with the batch size)::

    grad_at_loss   ½ · mean_i ||J_S,i − J_T,i||²                        (eq. 4)
    min_l2_loss    ½ · mean_i ||J_S,i||²                                (Drucker & LeCun)
    symmetry_loss  ½ · mean_i ||J_S,i − flip(∂L(W, flip x)/∂x)_i||²     (eq. 6, horizontal flip)

Multiply them by β: eq. 4 reads ``L + β/2 ||J_S − J_T||``, and these functions include the 1/2.
The norms are squared by default: eq. 5 is the gradient of β/2·||J_S − J_T||², and double
backprop squares too (eqs. 4 and 6 as printed show the plain norm: ``squared=False``).
Differentiating one of them with respect to the student's parameters gives eq. 5's second-order
term: ``jax.grad`` of a function that itself calls ``jax.grad``; nothing is hand-derived. The
teacher's ``J_T`` is ``stop_gradient``-ed.

Example::

    def loss(params):
        student = lambda x: model.apply(params, x)
        return cross_entropy(student(x), y) + beta * grad_at_loss(student, teacher, x, y)
    grads = jax.grad(loss)(params)

Models: a function ``x -> logits`` (``lambda z: model.apply(variables, z)`` for Linen) or a
``flax.nnx.Module`` that returns logits, itself — not a lambda that calls it. An NNX module
runs, in each pass that these functions make, on a copy of itself (``nnx.split`` then
``nnx.merge(..., copy=True)``), so that it works in train mode (BN batch statistics, dropout
``Rngs``) inside ``nnx.jit``/``nnx.grad``/``jax.jit``, where calling it from inside the
``jax.grad`` that takes the input gradient would mutate its state from another trace level. The
copies' state changes are dropped: the module's BN statistics and RNG counts are those of your
own forward pass, updated once, as at_jax's Linen step does; the gradient passes use the batch
statistics of their own input (train mode) or the running ones (eval mode) as the module is
set, and, when called before your forward pass, the same dropout masks as that pass (called
after it, the next ones). Gradients reach the module's parameters as usual.

Images are NHWC: :func:`flip` (symmetry) mirrors axis 2. Batch norm in the second backprop is
the paper's open question: the function you pass decides (train-mode batch statistics, or
running statistics); the CLI's terms follow ``config.gradient.bn_mode``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from at_jax.attention import safe_norm
from at_jax.precision import upcast

__all__ = [
    "grad_at_loss",
    "min_l2_loss",
    "symmetry_loss",
    "input_gradient",
    "as_logits_fn",
    "flip",
    "per_example_norm",
    "BN_MODES",
]

# Batch norm in the input-gradient pass of the gradient terms of at_jax's train step
# (config.gradient.bn_mode; the paper's open question): "batch_stats" — the training forward
# itself (batch statistics; running statistics updated once); "frozen" — a separate forward with
# the running statistics (eval-mode BN).
BN_MODES = ("batch_stats", "frozen")

LogitsFn = Callable[[jax.Array], jax.Array]
Model = Union[LogitsFn, nnx.Module]


def as_logits_fn(model: Any) -> LogitsFn:
    """``x -> logits`` of a function (returned as it is) or of an NNX module (each call runs on
    a copy of the module, whose state changes are dropped; see the module docstring)."""
    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)
        return lambda x: nnx.merge(graphdef, state, copy=True)(x)
    if callable(model):
        return model
    raise TypeError(
        f"the model must be a function x -> logits or a flax.nnx.Module, got {type(model).__name__}"
    )


def input_gradient(model: Model, images: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example ``∂CE(model(x)_i, y_i)/∂x_i``: the gradient of the summed CE, shaped like
    ``images``. ``model``: a function ``x -> logits`` or an NNX module."""
    logits_fn = as_logits_fn(model)

    def summed_ce(x: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(upcast(logits_fn(x)), labels).sum()

    try:
        return jax.grad(summed_ce)(images)
    except flax.errors.TraceContextError as e:
        raise ValueError(
            "the model function mutates NNX state (BN statistics, dropout Rngs) from inside "
            "the input gradient's jax.grad: pass the NNX module itself (grad_at_loss(model, "
            "teacher, x, y)) instead of a function that calls it; at_jax then runs a copy"
        ) from e


def flip(x: jax.Array) -> jax.Array:
    """Horizontal flip of NHWC images."""
    return x[:, :, ::-1, :]


def per_example_norm(x: jax.Array, squared: bool = True) -> jax.Array:
    """Mean over the batch of each example's (squared) l2 norm; the plain norm has PyTorch's
    gradient at 0 (:func:`at_jax.attention.safe_norm`)."""
    flat = upcast(x.reshape(x.shape[0], -1))
    if squared:
        return jnp.mean(jnp.sum(flat * flat, axis=-1))
    return jnp.mean(safe_norm(flat, 2, axis=-1))


def grad_at_loss(
    student_fn: Model,
    teacher_fn: Model,
    x: jax.Array,
    labels: jax.Array,
    *,
    squared: bool = True,
) -> jax.Array:
    """Gradient-based attention transfer, eq. 4: ``½ · mean_i ||J_S,i − J_T,i||²``.

    Args:
      student_fn, teacher_fn: ``x -> logits`` (B, K) of each network, or NNX modules that
        return logits (see the module docstring for their state).
      x: (B, H, W, C) inputs (normalised as the networks expect); labels: (B,) integers.
      squared: False gives eq. 4's plain norm ``½ · mean_i ||J_S,i − J_T,i||``.

    Returns:
      A float32 scalar; weight it with β. No gradient reaches the teacher.
    """
    j_teacher = jax.lax.stop_gradient(input_gradient(teacher_fn, x, labels))
    return 0.5 * per_example_norm(input_gradient(student_fn, x, labels) - j_teacher, squared)


def min_l2_loss(
    student_fn: Model, x: jax.Array, labels: jax.Array, *, squared: bool = True
) -> jax.Array:
    """Double backprop (Drucker & LeCun, 1992): ``½ · mean_i ||J_S,i||²`` (``squared=False``:
    the norm). Arguments as :func:`grad_at_loss`."""
    return 0.5 * per_example_norm(input_gradient(student_fn, x, labels), squared)


def symmetry_loss(
    student_fn: Model, x: jax.Array, labels: jax.Array, *, squared: bool = True
) -> jax.Array:
    """Eq. 6, a flip-invariance penalty: ``½ · mean_i ||J_i − flip(∂L(W, flip x)/∂x)_i||²``
    (``squared=False``: the norm). Zero exactly for a network that is invariant to horizontal
    flips. Arguments as :func:`grad_at_loss` (NHWC ``x``)."""
    direct = input_gradient(student_fn, x, labels)
    mirrored = flip(input_gradient(student_fn, flip(x), labels))
    return 0.5 * per_example_norm(direct - mirrored, squared)
