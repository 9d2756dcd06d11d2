"""`make demo`: a real attention-transfer experiment on Fashion-MNIST on a small machine.

Trains a WRN-16-2 teacher, then WRN-16-1 students alone, with AT, with KD and with AT+KD (short
schedule on a subset so that it ends within ~15 minutes on 2 CPU cores), prints their test errors
side by side and writes an attention-map figure. Rerunning resumes finished and unfinished runs.

    python -m experiments.demo --workdir runs/demo [--data_dir /usr/share/datasets/fashion-mnist]
"""

import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from at_jax import train
from at_jax.data import load_dataset
from at_jax.figures import attention_figure
from configs import fashion_mnist

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/demo", "Where the runs, table and figure go.")
flags.DEFINE_string("data_dir", "", "Folder with the Fashion-MNIST IDX files (default: Debian's).")
flags.DEFINE_integer("train_size", 6000, "Training examples used (a prefix of the 60k).")
flags.DEFINE_integer("test_size", 2000, "Test examples used.")
flags.DEFINE_integer("teacher_epochs", 3, "Teacher epochs.")
flags.DEFINE_integer("student_epochs", 3, "Epochs per student.")

STUDENTS = (("student", "WRN-16-1 alone"), ("at", "WRN-16-1 + AT"), ("kd", "WRN-16-1 + KD"),
            ("at_kd", "WRN-16-1 + AT + KD"))


def demo_config(method: str, epochs: int, teacher_dir: str):
    config = fashion_mnist.get_config(method)
    config.data.data_dir = FLAGS.data_dir
    config.data.train_size = FLAGS.train_size
    config.data.test_size = FLAGS.test_size
    config.num_epochs = epochs
    # the reference schedule, compressed: lr × 0.2 at 50% and 75% of training
    config.optimizer.lr_decay_epochs = tuple(sorted({max(1, epochs // 2), max(1, 3 * epochs // 4)}))
    if method != "teacher" and method != "student":
        config.teacher.workdir = teacher_dir
    return config


def main(argv):
    del argv
    start = time.time()
    root = FLAGS.workdir
    teacher_dir = os.path.join(root, "teacher-wrn-16-2")
    runs = [("teacher", "WRN-16-2 teacher", teacher_dir, FLAGS.teacher_epochs)]
    runs += [(m, label, os.path.join(root, f"wrn-16-1-{m}"), FLAGS.student_epochs)
             for m, label in STUDENTS]
    rows = []
    for method, label, workdir, epochs in runs:
        print(f"\n== {label} ({epochs} epochs) -> {workdir}", flush=True)
        results = train.train_and_evaluate(demo_config(method, epochs, teacher_dir), workdir)
        rows.append((label, results))

    print("\nFashion-MNIST test error (%), "
          f"{FLAGS.train_size} training images, {FLAGS.test_size} test images:")
    print(f"{'run':<24}{'final':>8}{'best':>8}{'minutes':>9}")
    for label, r in rows:
        print(f"{label:<24}{r['final_test_error']:>8.2f}{r['best_test_error']:>8.2f}"
              f"{r['wall_time_s'] / 60:>9.1f}")
    table = {label: r for label, r in rows}
    with open(os.path.join(root, "summary.json"), "w") as f:
        json.dump(table, f, indent=2)

    data = load_dataset("fashion_mnist", data_dir=FLAGS.data_dir or None, test_size=8)
    models = {}
    for label, workdir in (("teacher", teacher_dir), ("student", runs[1][2]),
                           ("student+AT", runs[2][2])):
        teacher, _ = train.load_teacher(workdir, data.num_classes, data.image_shape)
        models[label] = (teacher.model, teacher.variables)
    figure = attention_figure(os.path.join(root, "attention_maps.png"), data.test_images[:4],
                              models, data.mean, data.std)
    print(f"\nmetrics and checkpoints: {root}/*/ (metrics.jsonl, tensorboard/, checkpoints/, "
          f"results.json); table: {root}/summary.json; attention maps: {figure}")
    print(f"total {(time.time() - start) / 60:.1f} min on {jax.devices()[0].device_kind}")


if __name__ == "__main__":
    app.run(main)
