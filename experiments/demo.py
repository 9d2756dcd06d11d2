"""`make demo`: a real attention-transfer experiment on Fashion-MNIST on a small machine.

Trains a WRN-16-2 teacher, then WRN-16-1 students alone, with AT, with KD and with AT+KD (a
short schedule on a subset, so that it ends within ~15 minutes on 2 CPU cores), prints their test
errors and attention distances to the teacher side by side and writes an attention-map figure.
Rerunning resumes unfinished runs and reuses finished ones.

    python -m experiments.demo --workdir runs/demo [--data_dir /usr/share/datasets/fashion-mnist]
"""

import os
import time

import numpy as np
from absl import app, flags, logging

from at_jax import devices, runs as run_lib, train
from at_jax.analysis import attention_distance
from at_jax.data import load_dataset
from at_jax.figures import attention_figure
from at_jax.metrics import write_json_atomic
from configs import fashion_mnist, methods

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/demo", "Where the runs, table and figure go.")
flags.DEFINE_string("data_dir", "", "Folder with the Fashion-MNIST IDX files (default: Debian's).")
flags.DEFINE_integer("train_size", 6000, "Training examples used (a prefix of the 60k).")
flags.DEFINE_integer("test_size", 2000, "Test examples used.")
flags.DEFINE_integer("teacher_epochs", 4, "Teacher epochs.")
flags.DEFINE_integer("student_epochs", 2, "Epochs per student.")

BATCH = 128
STUDENTS = (("student", "WRN-16-1 alone"), ("at", "WRN-16-1 + AT"), ("kd", "WRN-16-1 + KD"),
            ("at_kd", "WRN-16-1 + AT + KD"))


def demo_config(method: str, epochs: int, teacher_dir: str):
    config = fashion_mnist.get_config("student")
    methods.apply_method(config, method, teacher_dir)
    config.data.data_dir = FLAGS.data_dir
    config.data.train_size = FLAGS.train_size
    config.data.test_size = FLAGS.test_size
    config.batch_size = BATCH
    config.num_epochs = epochs
    # the reference schedule, compressed: lr × 0.2 at 50% and 75% of training
    config.optimizer.lr_decay_epochs = tuple(sorted({max(1, epochs // 2), max(1, 3 * epochs // 4)}))
    return config


def print_table(rows, n_train, n_test):
    print(f"\nFashion-MNIST, {n_train} training images; test error (%) on {n_test} test images "
          "and attention distance to the teacher (mean over groups and test images; 0 = same maps)")
    print(f"{'run':<22}{'final':>7}{'best':>7}{'AT dist':>9}{'minutes':>9}")
    for label, r in rows:
        dist = r.get("attention_distance", {}).get("mean")
        dist = f"{dist:>9.3f}" if dist is not None else f"{'-':>9}"
        print(f"{label:<22}{r['final_test_error']:>7.2f}{r['best_test_error']:>7.2f}{dist}"
              f"{r['wall_time_s'] / 60:>9.1f}")
    err = rows[1][1]["final_test_error"] / 100
    print(f"(one seed each; the binomial standard error of a test error near {100 * err:.0f}% on "
          f"{n_test} images is ±{100 * np.sqrt(err * (1 - err) / n_test):.1f} points)")


def main(argv):
    del argv
    devices.use_cpu_cores(BATCH)  # one CPU device per core: XLA runs each convolution on one thread
    logging.set_verbosity(logging.WARNING)
    start = time.time()
    root = FLAGS.workdir
    teacher_dir = os.path.join(root, "teacher-wrn-16-2")
    runs = [("teacher", "WRN-16-2 teacher", teacher_dir, FLAGS.teacher_epochs)]
    runs += [(m, label, os.path.join(root, f"wrn-16-1-{m}"), FLAGS.student_epochs)
             for m, label in STUDENTS]
    results = {}
    for method, label, workdir, epochs in runs:
        print(f"\n== {label} ({epochs} epochs) -> {workdir}", flush=True)
        results[label] = train.train_and_evaluate(demo_config(method, epochs, teacher_dir), workdir)

    data = load_dataset("fashion_mnist", data_dir=FLAGS.data_dir or None,
                        train_size=BATCH, test_size=FLAGS.test_size)
    models = {label: run_lib.load_run_variables(workdir, data.num_classes, data.image_shape)[:2]
              for _, label, workdir, _ in runs}
    teacher = models[runs[0][1]]
    for _, label, _, _ in runs[1:]:
        results[label]["attention_distance"] = attention_distance(
            models[label], teacher, data.test_images, data.mean, data.std)
    print_table(list(results.items()), FLAGS.train_size, len(data.test_labels))
    write_json_atomic(os.path.join(root, "summary.json"), results)

    figure = attention_figure(
        os.path.join(root, "attention_maps.png"), data.test_images[:4],
        {"teacher": teacher, "student": models[runs[1][1]], "student+AT": models[runs[2][1]]},
        data.mean, data.std)
    print(f"\nmetrics and checkpoints: {root}/*/ (metrics.jsonl, tensorboard/, checkpoints/, "
          f"results.json); table: {root}/summary.json; attention maps: {figure}")
    print(f"total {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    app.run(main)
