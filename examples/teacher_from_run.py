"""A teacher trained with the CLI (or converted from torchvision) in one line, your own student.

    make demo    # trains runs/demo/teacher-wrn-16-2 (or: python -m at_jax.main ... --workdir DIR)
    python examples/teacher_from_run.py [--run runs/demo/teacher-wrn-16-2] [--steps 300]

`load_teacher` reads the run's config (architecture, dataset, class count, mean/std) and
checkpoint; `teacher(images_uint8)` gives (logits, acts) in eval mode. The student below is a
plain Linen CNN whose stages match the teacher's WRN groups in resolution.
"""

import argparse
import os

import flax.linen as nn
import jax

from _common import fit, report_test_error
from at_jax.analysis import attention_distance
from at_jax.capture import model_fn
from at_jax.data import load_dataset
from at_jax.errors import fail, one_line_errors
from at_jax.losses import at_losses, kd_loss
from at_jax.runs import load_teacher


class Student(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate((8, 16, 32)):  # stage0 full size, stage1 /2, stage2 /4
            x = nn.relu(nn.Conv(width, (3, 3), name=f"stage{i}")(x))
            x = nn.max_pool(x, (2, 2), (2, 2)) if i < 2 else x
        return nn.Dense(self.num_classes)(x.mean((1, 2)))


def main(run, steps):
    teacher = load_teacher(run)
    print(teacher)
    c = teacher.config.data  # the teacher's own dataset and preprocessing
    data = load_dataset(c.name, c.source, c.data_dir or None, train_size=4096, test_size=1000)
    x_train, x_test = teacher.preprocess(data.train_images), teacher.preprocess(data.test_images)
    student = Student(teacher.num_classes)
    params = jax.jit(student.init)(jax.random.key(0), x_train[:1])
    pairs = [("stage0", "group0"), ("stage1", "group1"), ("stage2", "group2")]
    names = [s for s, _ in pairs]

    def distance(p):
        return attention_distance(model_fn(student, names, p), teacher, x_test, pairs=pairs)["mean"]

    print(f"attention distance to the teacher before training: {distance(params):.3f}")

    def loss(p, x, y):
        s_logits, s_acts = model_fn(student, names, p)(x)
        t_logits, t_acts = teacher(x)  # float input: already preprocessed
        at, _ = at_losses(s_acts, t_acts, pairs)
        return kd_loss(s_logits, t_logits, y) + 1e3 * at

    params = fit(loss, params, x_train, data.train_labels, steps)
    print(f"attention distance after: {distance(params):.3f}")
    report_test_error("teacher", lambda x: teacher(x)[0], x_test, data.test_labels)
    report_test_error("student", lambda x: student.apply(params, x), x_test, data.test_labels)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default="runs/demo/teacher-wrn-16-2")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.run, "config.json")):
        fail(
            f"no trained run in {args.run}: run `make demo` first (it trains "
            "runs/demo/teacher-wrn-16-2, the default --run), or pass --run DIR"
        )
    with one_line_errors():  # a user's mistake: one line, no traceback
        main(args.run, args.steps)
