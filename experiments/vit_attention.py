"""Attention transfer between Vision Transformers on real data (Fashion-MNIST, 2 CPU cores): a ViT
teacher trained here, then students from scratch, with attention copy and with attention
distillation (Li et al., NeurIPS 2024), several seeds each in one program, compared seed by seed
with the student from scratch (seed s of every student starts from the same weights and sees the
same batches). Prints the table (test error, the attention's KL to the teacher), writes
summary.json and a figure of the class token's attention of teacher and students. Rerunning
resumes unfinished runs and reuses finished ones.

    python -m experiments.vit_attention --workdir runs/vit_attention \
        [--data_dir /usr/share/datasets/fashion-mnist]

The configs are ``configs/vit_attention.py:METHOD,fashion_mnist`` with this script's sizes.
"""

import os
import time

import numpy as np
from absl import app, flags, logging

from at_jax import devices, runs as run_lib, train
from at_jax.compilation_cache import default_cache_dir, use_compilation_cache
from at_jax.data import load_dataset
from at_jax.errors import one_line_errors
from at_jax.figures import vit_attention_figure
from at_jax.files import write_json_atomic
from configs import vit_attention
from experiments.paired import ALPHA, paired, per_seed, spread, verdict

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/vit_attention", "Where the runs, table and figure go.")
flags.DEFINE_string("data_dir", "", "Folder with the Fashion-MNIST IDX files (default: Debian's).")
flags.DEFINE_integer("teacher_train_size", 0, "Teacher's training examples (0: all 60,000).")
flags.DEFINE_integer("train_size", 20000, "Students' training examples (a prefix of the 60k).")
flags.DEFINE_integer("test_size", 5000, "Test examples used.")
flags.DEFINE_integer("teacher_epochs", 10, "Teacher epochs.")
flags.DEFINE_integer("student_epochs", 5, "Epochs per student.")
flags.DEFINE_integer("seeds", 3, "Seeds per student, trained together in one program.")
flags.DEFINE_string("compilation_cache_dir", default_cache_dir(), "JAX's compilation cache.")

STUDENTS = (
    ("scratch", "ViT from scratch"),
    ("copy", "ViT + attention copy"),
    ("distill", "ViT + attention distill"),
)


def run_config(method: str, teacher_dir: str):
    config = vit_attention.get_config(f"{method},fashion_mnist")
    teacher = method == "teacher"
    epochs = FLAGS.teacher_epochs if teacher else FLAGS.student_epochs
    config.num_epochs = config.optimizer.cosine_epochs = epochs
    config.optimizer.warmup_epochs = min(1, epochs - 1)
    config.num_seeds = 1 if teacher else FLAGS.seeds
    config.data.train_size = FLAGS.teacher_train_size if teacher else FLAGS.train_size
    config.data.test_size = FLAGS.test_size
    config.data.data_dir = FLAGS.data_dir
    config.eval_every_epochs = epochs  # the test error once, at the end
    config.compilation_cache_dir = FLAGS.compilation_cache_dir
    if not teacher:  # scratch too: the teacher only to measure the distance to it
        config.teacher.workdir = teacher_dir
    return config


def print_table(rows: list, seeds: int) -> str:
    lines = [
        f"Fashion-MNIST: teacher on {FLAGS.teacher_train_size or 60000:,} images, students on "
        f"{FLAGS.train_size:,}; test error on {FLAGS.test_size:,} test images; {seeds} seeds "
        "per student. Attention KL: KL(teacher ‖ student) of the self-attention, mean over "
        "blocks, heads, queries and test images (0 = the teacher's attention).",
        "",
        f"{'run':<26}{'test error % (median, min–max)':<33}{'attention KL':<24}"
        "vs scratch, seed by seed: mean [min, max] of the differences",
    ]
    for label, r in rows:
        error = spread(r["seeds"]["error"], ".2f")
        distance = spread(r["seeds"]["distance"], ".3f") if len(r["seeds"]["distance"]) else "–"
        line = f"{label:<26}{error:<33}{distance:<24}"
        if "vs_scratch" in r:
            v = r["vs_scratch"]
            line += (
                f"error {verdict(v['error'], '.2f', 'lower', 'higher')}; KL "
                f"{verdict(v['distance'], '.3f', 'closer', 'farther')}"
            )
        lines.append(line)
    lines.append(
        f"\n'clearly': a paired t-test over the {seeds} seeds rejects 'no difference' at the "
        f"{ALPHA:.0%} level. The copied student's KL is that of its own (unused) attention in the "
        "copied blocks."
    )
    text = "\n".join(lines)
    print("\n" + text)
    return text


def main(argv):
    with one_line_errors(train.TrainingDiverged, run_lib.CheckpointError):
        experiment(argv)


def experiment(argv):
    del argv
    devices.use_cpu_cores(128)
    use_compilation_cache(FLAGS.compilation_cache_dir)
    logging.set_verbosity(logging.WARNING)
    start, root = time.time(), FLAGS.workdir
    teacher_dir = os.path.join(root, "teacher")
    runs = [("teacher", "ViT teacher", teacher_dir)]
    runs += [(m, label, os.path.join(root, m)) for m, label in STUDENTS]
    results = {}
    with train.exit_when_stopped(" (rerun the same command to resume)"):
        for i, (method, label, workdir) in enumerate(runs, 1):
            print(f"\n== [{i}/{len(runs)}] {label} -> {workdir}", flush=True)
            results[label] = train.train_and_evaluate(run_config(method, teacher_dir), workdir)
    rows = []
    for _, label, workdir in runs:
        row = dict(results[label])
        row["seeds"] = per_seed(row, workdir)
        rows.append((label, row))
    scratch = rows[1][1]["seeds"]
    for _, row in rows[2:]:
        row["vs_scratch"] = {k: paired(row["seeds"][k], scratch[k]) for k in ("error", "distance")}
    table = print_table(rows, FLAGS.seeds)
    summary = {
        label: {
            **{k: v for k, v in row.items() if k != "seeds"},
            "per_seed": {k: np.asarray(v).tolist() for k, v in row["seeds"].items()},
        }
        for label, row in rows
    }
    write_json_atomic(os.path.join(root, "summary.json"), {"table": table, "runs": summary})
    data = load_dataset(
        "fashion_mnist", data_dir=FLAGS.data_dir or None, train_size=128, test_size=8
    )
    teacher = run_lib.load_teacher(teacher_dir)
    models = {"teacher": teacher}
    for method, _, workdir in runs[1:]:
        if method != "copy":  # a copied student's own attention is not what it used
            model, variables, _ = run_lib.load_run_variables(
                workdir, data.num_classes, data.image_shape
            )
            models[method] = (model, variables)
    block = vit_attention.get_config("distill,fashion_mnist").model_overrides.depth - 2
    figure = vit_attention_figure(
        os.path.join(root, "vit_attention.png"),
        data.test_images[:4],
        models,
        block,
        heads=(0, 1),
        preprocess=dict.fromkeys(models, teacher.preprocess),
    )
    print(f"\ntable and per-seed numbers: {root}/summary.json; attention figure: {figure}")
    print(f"total {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    app.run(main)
