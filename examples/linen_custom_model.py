"""Attention transfer between your own Linen models: CE + AT + KD in your own optax loop.

    python examples/linen_custom_model.py [--steps 300]

Neither model knows about at_jax: `capture` reads the outputs of their submodules by path (no
edits, no sow), and the loss functions are at_jax's array-level ones.
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp

from _common import fashion_mnist, fit, report_test_error
from at_jax.capture import capture
from at_jax.errors import one_line_errors
from at_jax.losses import at_losses, cross_entropy, kd_loss


class Stage(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        return nn.max_pool(nn.relu(nn.Conv(self.width, (3, 3))(x)), (2, 2), (2, 2))


class Net(nn.Module):  # a plain CNN: stage1 (14x14), stage2 (7x7), head
    widths: tuple

    @nn.compact
    def __call__(self, x):
        x = Stage(self.widths[0], name="stage1")(x)
        x = Stage(self.widths[1], name="stage2")(x)
        return nn.Dense(10, name="head")(x.mean((1, 2)))


def main(steps):
    x_train, y_train, x_test, y_test = fashion_mnist()
    teacher, student = Net((32, 64)), Net((8, 16))
    t_params = jax.jit(teacher.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    s_params = jax.jit(student.init)(jax.random.key(1), jnp.zeros((1, 28, 28, 1)))

    print("teacher, cross-entropy:")
    t_params = fit(
        lambda p, x, y: cross_entropy(teacher.apply(p, x), y), t_params, x_train, y_train, steps
    )

    points = ["stage1", "stage2"]  # submodule paths, the same in both networks here

    def student_loss(p, x, y):
        s_logits, s_acts = capture(student, x, names=points, variables=p)
        t_logits, t_acts = capture(teacher, x, names=points, variables=t_params)
        at, _ = at_losses(s_acts, t_acts, points)  # the teacher's side gets no gradient
        return kd_loss(s_logits, t_logits, y, temperature=4.0, alpha=0.9) + 1e3 * at

    print("student, KD + 1e3 * AT:")
    s_params = fit(student_loss, s_params, x_train, y_train, steps)
    report_test_error("teacher", lambda x: teacher.apply(t_params, x), x_test, y_test)
    report_test_error("student", lambda x: student.apply(s_params, x), x_test, y_test)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    with one_line_errors():  # a user's mistake: one line, no traceback
        main(parser.parse_args().steps)
