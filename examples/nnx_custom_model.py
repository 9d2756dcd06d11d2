"""Attention transfer between your own Flax NNX models in train mode (batch norm, dropout):
CE + AT + KD + gradient-based AT with nnx.Optimizer.

    python examples/nnx_custom_model.py [--steps 300]

`capture` reads submodule outputs by attribute path ("blocks/0": list indices are numbers)
inside nnx.jit and nnx.grad; `grad_at_loss` takes the NNX modules themselves and runs copies of
them for its input gradients, so the student's BN statistics are updated once, by its forward.
"""

import argparse

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from _common import fashion_mnist, report_test_error
from at_jax.capture import capture
from at_jax.errors import one_line_errors
from at_jax.gradient import grad_at_loss
from at_jax.losses import at_losses, cross_entropy, kd_loss


class Net(nnx.Module):  # conv-BN-ReLU blocks (14x14, 7x7), dropout and a linear head
    def __init__(self, widths, rngs):
        pairs = zip([1, *widths[:-1]], widths, strict=True)
        self.blocks = nnx.List([nnx.Conv(c, w, (3, 3), rngs=rngs) for c, w in pairs])
        self.norms = nnx.List([nnx.BatchNorm(w, momentum=0.9, rngs=rngs) for w in widths])
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.head = nnx.Linear(widths[-1], 10, rngs=rngs)

    def __call__(self, x):
        for conv, norm in zip(self.blocks, self.norms, strict=True):
            x = nnx.max_pool(nnx.relu(norm(conv(x))), (2, 2), (2, 2))
        return self.head(self.dropout(x.mean((1, 2))))


def fit(model, loss_fn, x, y, steps, batch=64):
    optimizer = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, xb, yb):
        loss, grads = nnx.value_and_grad(loss_fn)(model, xb, yb)
        optimizer.update(model, grads)
        return loss

    model.train()  # BN batch statistics, dropout on
    for i in range(steps):
        idx = np.random.default_rng(i).integers(0, len(y), batch)
        loss = step(model, optimizer, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
    model.eval()
    print(f"  last train loss {float(loss):.3f}")


def main(steps, beta=1.0):
    x_train, y_train, x_test, y_test = fashion_mnist()
    teacher, student = Net((32, 64), nnx.Rngs(0)), Net((8, 16), nnx.Rngs(1))
    print("teacher, cross-entropy:")
    fit(teacher, lambda m, x, y: cross_entropy(m(x), y), x_train, y_train, steps)

    points = ["blocks/0", "blocks/1"]

    def student_loss(model, x, y):
        # the input-gradient pass first: it then sees the dropout masks of the forward below
        grad_at = grad_at_loss(model, teacher, x, y)  # ½ mean ||J_S − J_T||² (eq. 4)
        s_logits, s_acts = capture(model, x, names=points)
        t_logits, t_acts = capture(teacher, x, names=points)  # no gradient reaches the teacher
        at, _ = at_losses(s_acts, t_acts, points)
        kd = kd_loss(s_logits, t_logits, y, temperature=4.0, alpha=0.9)
        return kd + 1e3 * at + beta * grad_at

    print(f"student, KD + 1e3 * AT + {beta} * grad-AT:")
    fit(student, student_loss, x_train, y_train, steps)
    report_test_error("teacher", teacher, jnp.asarray(x_test), y_test)
    report_test_error("student", student, jnp.asarray(x_test), y_test)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    with one_line_errors():  # a user's mistake: one line, no traceback
        main(parser.parse_args().steps)
