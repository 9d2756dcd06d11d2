"""Gradient-based attention transfer (paper §3.2) and the symmetry penalty on your own models.

    python examples/gradient_attention.py [--steps 300]

The student's loss differentiates through its own input gradient (double backprop, eq. 5):
`grad_at_loss` and `symmetry_loss` take plain functions x -> logits, so any model fits.
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp

from _common import fashion_mnist, fit, report_test_error
from at_jax.errors import one_line_errors
from at_jax.gradient import grad_at_loss, input_gradient, symmetry_loss
from at_jax.losses import cross_entropy


class Net(nn.Module):  # no batch norm: the input gradient is then per example
    width: int

    @nn.compact
    def __call__(self, x):
        x = nn.max_pool(nn.relu(nn.Conv(self.width, (3, 3))(x)), (2, 2), (2, 2))
        x = nn.max_pool(nn.relu(nn.Conv(2 * self.width, (3, 3))(x)), (2, 2), (2, 2))
        return nn.Dense(10)(x.mean((1, 2)))


def main(steps, beta=1.0):
    x_train, y_train, x_test, y_test = fashion_mnist()
    teacher, student = Net(32), Net(8)
    t_params = jax.jit(teacher.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    s_params = jax.jit(student.init)(jax.random.key(1), jnp.zeros((1, 28, 28, 1)))
    print("teacher, cross-entropy:")
    t_params = fit(
        lambda p, x, y: cross_entropy(teacher.apply(p, x), y), t_params, x_train, y_train, steps
    )

    def teacher_fn(x):
        return teacher.apply(t_params, x)

    def student_loss(p, x, y):
        def student_fn(z):
            return student.apply(p, z)

        # β/2 ||J_S - J_T||² (eq. 4; the ½ is inside) and β/2 ||J - flip(J of flipped x)||² (eq. 6)
        return (
            cross_entropy(student_fn(x), y)
            + beta * grad_at_loss(student_fn, teacher_fn, x, y)
            + beta * symmetry_loss(student_fn, x, y)
        )

    print(f"student, CE + {beta} * grad-AT + {beta} * symmetry:")
    s_params = fit(student_loss, s_params, x_train, y_train, steps)

    # how close the input gradients (the "attention") of student and teacher are now
    x, y = jnp.asarray(x_test[:256]), jnp.asarray(y_test[:256])
    j_s = input_gradient(lambda z: student.apply(s_params, z), x, y).reshape(len(y), -1)
    j_t = input_gradient(teacher_fn, x, y).reshape(len(y), -1)
    cosine = jnp.sum(j_s * j_t, -1) / (
        jnp.linalg.norm(j_s, axis=-1) * jnp.linalg.norm(j_t, axis=-1)
    )
    print(f"median cosine of student and teacher input gradients: {float(jnp.median(cosine)):.3f}")
    report_test_error("teacher", teacher_fn, x_test, y_test)
    report_test_error("student", lambda z: student.apply(s_params, z), x_test, y_test)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    with one_line_errors():  # a user's mistake: one line, no traceback
        main(parser.parse_args().steps)
