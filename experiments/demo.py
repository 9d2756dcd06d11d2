"""`make demo`: a real attention-transfer experiment on Fashion-MNIST on a small machine.

Trains a WRN-16-2 teacher, then WRN-16-1 students alone, with AT, with KD and with AT+KD, several
seeds each in one program, prints their test errors (median and spread over seeds) and attention
distances to the teacher, and says which differences from the student trained alone are clear:
seed s of every student starts from the same initialisation and sees the same batches, so the
methods are compared seed by seed (paired differences, a paired t-test over the seeds). Writes
an attention-map figure (seed 0 of each student) and summary.json. Rerunning resumes unfinished
runs and reuses finished ones.

    python -m experiments.demo --workdir runs/demo [--data_dir /usr/share/datasets/fashion-mnist]
"""

import os
import time

from absl import app, flags, logging

from at_jax import devices, recipes, runs as run_lib, train
from at_jax.compilation_cache import default_cache_dir, use_compilation_cache
from at_jax.data import load_dataset
from at_jax.errors import one_line_errors
from at_jax.figures import attention_figure
from at_jax.files import write_json_atomic
from configs import fashion_mnist
from experiments.paired import ALPHA, paired, per_seed, spread, verdict

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/demo", "Where the runs, table and figure go.")
flags.DEFINE_string("data_dir", "", "Folder with the Fashion-MNIST IDX files (default: Debian's).")
flags.DEFINE_integer("train_size", 3000, "Training examples used (a prefix of the 60k).")
flags.DEFINE_integer("test_size", 2000, "Test examples used.")
flags.DEFINE_integer("teacher_epochs", 6, "Teacher epochs.")
flags.DEFINE_integer("student_epochs", 2, "Epochs per student.")
flags.DEFINE_integer("seeds", 4, "Seeds per student, trained together in one program.")
flags.DEFINE_string(
    "compilation_cache_dir",
    default_cache_dir(),
    "JAX's persistent compilation cache ('' = off): a rerun loads its programs.",
)

BATCH = 64
STUDENTS = (
    ("student", "WRN-16-1 alone"),
    ("at", "WRN-16-1 + AT"),
    ("kd", "WRN-16-1 + KD"),
    ("at_kd", "WRN-16-1 + AT + KD"),
)


def demo_config(method: str, epochs: int, teacher_dir: str, seeds: int = 1):
    config = fashion_mnist.get_config("student")
    config.num_seeds = seeds
    recipes.apply_method(config, method, teacher_dir)
    if method == "student":  # no teacher term; the teacher only to measure the distance to it
        config.teacher.workdir = teacher_dir
    config.eval_every_epochs = epochs  # the test error once, at the end
    config.data.data_dir = FLAGS.data_dir
    config.data.train_size = FLAGS.train_size
    config.data.test_size = FLAGS.test_size
    config.batch_size = BATCH
    # Today's KD (the reference code since 2018): the 2017 form that configs/fashion_mnist.py
    # keeps for Table 1 has a KL term 2/C = 5x weaker, which a 2-epoch schedule cannot absorb
    # (measured with it: KD 43.75% and AT+KD 41.05% test error against 29.50% alone).
    config.loss.kd.legacy = False
    config.num_epochs = epochs
    # BN scales from 1 (Flax's and torchvision's default), not U(0, 1) as the Table 1 recipe:
    # measured on this 2-epoch schedule (3,000 images, 3 seeds), the student alone had 31.1%
    # median test error with scales from 1 against 33.7% with U(0, 1)
    config.model_overrides.bn_scale_init = "ones"
    config.compilation_cache_dir = FLAGS.compilation_cache_dir
    # the reference schedule, compressed: lr × 0.2 at 50% and 75% of training
    config.optimizer.lr_decay_epochs = tuple(sorted({max(1, epochs // 2), max(1, 3 * epochs // 4)}))
    return config


def print_table(rows: list, n_train: int, n_test: int, seeds: int) -> None:
    print(
        f"\nFashion-MNIST, {n_train:,} training images, test error on {n_test:,} test images. "
        f"Students: {seeds} seeds each; seed s of every student starts from the same weights "
        "and sees the same batches.\nAttention distance: how far the student's normalised "
        "attention maps are from the teacher's (mean over groups and test images; 0 = the "
        "same maps).\n"
    )
    head = (
        f"{'run':<20}{'test error % (median, min–max)':<33}{'attention distance':<23}"
        "vs alone, seed by seed: mean [min, max] of the differences"
    )
    print(head)
    print("-" * len(head))
    for label, r in rows:
        error = spread(r["seeds"]["error"], ".2f")
        distance = spread(r["seeds"]["distance"], ".3f") if len(r["seeds"]["distance"]) else "–"
        line = f"{label:<20}{error:<33}{distance:<23}"
        if "vs_alone" in r:
            v = r["vs_alone"]
            line += (
                f"error {verdict(v['error'], '.2f', 'lower', 'higher')}; distance "
                f"{verdict(v['distance'], '.3f', 'closer', 'farther')}"
            )
        print(line)
    print(
        f"\n'clearly': a paired t-test over the {seeds} seeds rejects 'no difference' at the "
        f"{ALPHA:.0%} level (two-sided); 'not clear': the difference is within what the seeds "
        "spread, on this short schedule."
    )


def main(argv):
    # a missing dataset or a bad flag: one line that says what to do, not a traceback
    with one_line_errors(train.TrainingDiverged, run_lib.CheckpointError):
        demo(argv)


def demo(argv):
    del argv
    devices.use_cpu_cores(BATCH)  # one CPU device per core: XLA runs each convolution on one thread
    use_compilation_cache(FLAGS.compilation_cache_dir)
    logging.set_verbosity(logging.WARNING)
    start = time.time()
    root = FLAGS.workdir
    teacher_dir = os.path.join(root, "teacher-wrn-16-2")
    runs = [("teacher", "WRN-16-2 teacher", teacher_dir, FLAGS.teacher_epochs, 1)]
    runs += [
        (m, label, os.path.join(root, f"wrn-16-1-{m}"), FLAGS.student_epochs, FLAGS.seeds)
        for m, label in STUDENTS
    ]
    results = {}
    # SIGTERM/SIGINT: the run in progress saves a checkpoint, and the demo stops
    with train.exit_when_stopped(" (the demo resumes there)"):
        for i, (method, label, workdir, epochs, seeds) in enumerate(runs, 1):
            print(
                f"\n== [{i}/{len(runs)}] {label} ({epochs} epochs, {seeds} seed(s)) -> {workdir}",
                flush=True,
            )
            results[label] = train.train_and_evaluate(
                demo_config(method, epochs, teacher_dir, seeds), workdir
            )

    data = load_dataset(
        "fashion_mnist",
        data_dir=FLAGS.data_dir or None,
        train_size=BATCH,
        test_size=FLAGS.test_size,
    )
    teacher = run_lib.load_teacher(teacher_dir)
    rows = []
    for _, label, workdir, _, _ in runs:
        row = dict(results[label])
        row["seeds"] = per_seed(row, workdir)
        rows.append((label, row))
    alone = rows[1][1]["seeds"]
    for _, row in rows[2:]:
        row["vs_alone"] = {k: paired(row["seeds"][k], alone[k]) for k in ("error", "distance")}
    print_table(rows, FLAGS.train_size, len(data.test_labels), FLAGS.seeds)
    summary = {
        label: {
            **{k: v for k, v in row.items() if k != "seeds"},
            "per_seed": {k: v.tolist() for k, v in row["seeds"].items()},
        }
        for label, row in rows
    }
    write_json_atomic(os.path.join(root, "summary.json"), summary)

    def student(index: int):
        return run_lib.load_run_variables(runs[index][2], data.num_classes, data.image_shape)[:2]

    figure = attention_figure(
        os.path.join(root, "attention_maps.png"),
        data.test_images[:4],
        {"teacher": teacher, "student": student(1), "student+AT": student(2)},
        preprocess=teacher.preprocess,
    )
    print(
        f"\nmetrics and checkpoints: {root}/*/ (metrics.jsonl, tensorboard/, checkpoints/, "
        f"results.json); table: {root}/summary.json; attention maps: {figure}"
    )
    print(f"total {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    app.run(main)
