"""RepDistiller's CIFAR-100 benchmark as one command: every teacher, every student alone and
every method of a teacher/student pair trained (the seeds of a cell in one program), then its
table of accuracies beside the reference's published numbers.

    python -m experiments.repdistiller_tables --table same --seeds 3 --root runs/repdistiller
    python -m experiments.repdistiller_tables --table same --dataset fashion_mnist --seeds 2 \
        --teacher_epochs 4 --student_epochs 3 --train_size 6000 --test_size 2000 \
        --pairs wrn_40_2:wrn_16_2 --methods kd,at,crd

Tables: ``same`` (its README's first table: seven pairs of one architecture family) and
``cross`` (the second: six pairs of different families, students MobileNetV2, ShuffleV1/V2 and
vgg8 at the reference's lr 0.01 for the small ones; no FSP row, as the reference's). Every cell
uses the reference's
recipe (``configs/cifar100.py:METHOD,TEACHER,STUDENT``; on ``fashion_mnist`` the same recipe on
28×28 grey images); ``--teacher_epochs``/``--student_epochs``/``--train_size``/``--test_size``
shorten the runs (the lr drops then come at the same fractions of training as the reference's
150/180/210 of 240). Runs go to ``ROOT/DATASET/{teachers,students,TEACHER-STUDENT/METHOD}``;
finished ones are reused and unfinished ones resume, so a stopped grid goes on where it was. A
cell whose loss becomes NaN is shown as "diverged" and the grid goes on (``experiments.grid``).

Outputs: ``ROOT/repdistiller_TABLE_DATASET.md`` (per pair: at_jax's median top-1 accuracy over
seeds with its range, the reference's number in its own labelled row, and ✓ where the method is
clearly better than the student alone by a paired t-test over the seeds, seed s of every cell
starting from the same initialisation and batches), ``.json`` (every number) and ``.png``
(each method's accuracy gain over the student, per pair). FSP pairs only networks of equal
widths: its cell is N/A where they differ, as in the reference's table.
"""

from __future__ import annotations

import os
import time

import numpy as np
from absl import app, flags, logging

from at_jax import devices, recipes, train
from at_jax.compilation_cache import default_cache_dir, use_compilation_cache
from at_jax.errors import one_line_errors
from at_jax.files import write_json_atomic
from at_jax.models import get_model
from at_jax.runs import CheckpointError
from configs import cifar100
from experiments import grid
from experiments.paired import paired, seed_errors

METHODS = ("kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "crd")
# RepDistiller's README (b84f547), top-1 accuracy %: teacher, student, then its method rows
_SAME_ROWS = {
    "teacher": (75.61, 75.61, 72.34, 74.31, 74.31, 79.42, 74.64),
    "student": (73.26, 71.98, 69.06, 69.06, 71.14, 72.50, 70.36),
    "kd": (74.92, 73.54, 70.66, 70.67, 73.08, 73.33, 72.98),
    "fitnet": (73.58, 72.24, 69.21, 68.99, 71.06, 73.50, 71.02),
    "at": (74.08, 72.77, 70.55, 70.22, 72.31, 73.44, 71.43),
    "sp": (73.83, 72.43, 69.67, 70.04, 72.69, 72.94, 72.68),
    "cc": (73.56, 72.21, 69.63, 69.48, 71.48, 72.97, 70.71),
    "vid": (74.11, 73.30, 70.38, 70.16, 72.61, 73.09, 71.23),
    "rkd": (73.35, 72.22, 69.61, 69.25, 71.82, 71.90, 71.48),
    "pkt": (74.54, 73.45, 70.34, 70.25, 72.61, 73.64, 72.88),
    "ab": (72.50, 72.38, 69.47, 69.53, 70.98, 73.17, 70.94),
    "ft": (73.25, 71.59, 69.84, 70.22, 72.37, 72.86, 70.58),
    "fsp": (72.91, None, 69.95, 70.11, 71.89, 72.62, 70.23),
    "nst": (73.68, 72.24, 69.60, 69.53, 71.96, 73.30, 71.53),
    "crd": (75.48, 74.14, 71.16, 71.46, 73.48, 75.51, 73.94),
}
SAME_PAIRS = (
    ("wrn_40_2", "wrn_16_2"),
    ("wrn_40_2", "wrn_40_1"),
    ("resnet56", "resnet20"),
    ("resnet110", "resnet20"),
    ("resnet110", "resnet32"),
    ("resnet32x4", "resnet8x4"),
    ("vgg13", "vgg8"),
)
CROSS_PAIRS = (
    ("vgg13", "MobileNetV2"),
    ("ResNet50", "MobileNetV2"),
    ("ResNet50", "vgg8"),
    ("resnet32x4", "ShuffleV1"),
    ("resnet32x4", "ShuffleV2"),
    ("wrn_40_2", "ShuffleV1"),
)
_CROSS_ROWS = {
    "teacher": (74.64, 79.34, 79.34, 79.42, 79.42, 75.61),
    "student": (64.60, 64.60, 70.36, 70.50, 71.82, 70.50),
    "kd": (67.37, 67.35, 73.81, 74.07, 74.45, 74.83),
    "fitnet": (64.14, 63.16, 70.69, 73.59, 73.54, 73.73),
    "at": (59.40, 58.58, 71.84, 71.73, 72.73, 73.32),
    "sp": (66.30, 68.08, 73.34, 73.48, 74.56, 74.52),
    "cc": (64.86, 65.43, 70.25, 71.14, 71.29, 71.38),
    "vid": (65.56, 67.57, 70.30, 73.38, 73.40, 73.61),
    "rkd": (64.52, 64.43, 71.50, 72.28, 73.21, 72.21),
    "pkt": (67.13, 66.52, 73.01, 74.10, 74.69, 73.89),
    "ab": (66.06, 67.20, 70.65, 73.55, 74.31, 73.34),
    "ft": (61.78, 60.99, 70.29, 71.75, 72.50, 72.03),
    "nst": (58.16, 64.96, 71.28, 74.12, 74.68, 74.89),
    "crd": (69.73, 69.11, 74.30, 75.11, 75.65, 76.05),
}
REFERENCE = {
    table: {pair: {row: values[i] for row, values in rows.items()} for i, pair in enumerate(pairs)}
    for table, rows, pairs in (
        ("same", _SAME_ROWS, SAME_PAIRS),
        ("cross", _CROSS_ROWS, CROSS_PAIRS),
    )
}
# each table's rows (the cross table has no FSP: it pairs only networks of equal widths)
TABLE_METHODS = {"same": METHODS, "cross": tuple(m for m in METHODS if m != "fsp")}
DATASETS = ("cifar100", "fashion_mnist")


def pairs_of(table: str, names: str = "") -> list[tuple[str, str]]:
    """The table's pairs (``names``: ``TEACHER:STUDENT,...`` of them, default all)."""
    pairs = list(SAME_PAIRS if table == "same" else CROSS_PAIRS)
    if names:
        wanted = [tuple(p.split(":")) for p in names.split(",")]
        unknown = [":".join(p) for p in wanted if p not in pairs]
        if unknown:
            known = ", ".join(":".join(p) for p in pairs)
            raise ValueError(f"--pairs {unknown} are not in the {table!r} table ({known})")
        pairs = wanted  # type: ignore[assignment]
    return pairs


def _widths_match(teacher: str, student: str) -> bool:
    """FSP's condition: the same channels at the stem and every group (shapes only)."""
    import jax
    import jax.numpy as jnp

    from at_jax.models import forward

    def channels(name):
        model = get_model(name, num_classes=100)
        x = jnp.zeros((1, 32, 32, 3))
        acts = jax.eval_shape(lambda: forward(model, model.init(jax.random.key(0), x), x)[1])
        return [v.shape[-1] for k, v in sorted(acts.items()) if v.ndim == 4 and "." not in k]

    return channels(teacher) == channels(student)


def cell_config(dataset: str, method: str, teacher: str, student: str, teachers: str, options):
    """One cell's config: the reference's recipe, shortened as ``options`` say."""
    config = recipes.base_config()
    config.data.name = dataset
    config = cifar100.repdistiller_config(config, [method, teacher, student], teachers)
    epochs = options.get("teacher_epochs" if method == "teacher" else "student_epochs") or 0
    if epochs:
        config.num_epochs = epochs
        config.optimizer.lr_decay_epochs = tuple(
            sorted({max(1, round(epochs * f)) for f in (150 / 240, 180 / 240, 210 / 240)})
        )
        for name in ("ab", "fsp", "ft"):  # their first stage shrinks with the schedule
            if name in config.loss and "init_epochs" in config.loss[name]:
                config.loss[name].init_epochs = max(1, round(epochs * 30 / 240))
    for key in ("train_size", "test_size", "data_dir"):
        if options.get(key):
            config.data[key] = options[key]
    model = options.get("teacher_model" if method == "teacher" else "student_model")
    if model:  # quick checks of the runner with small models in every cell
        config.model = model
    for path, value in options.get("overrides", {}).items():  # every cell: {"path": value}
        recipes.set_path(config, path, value)
    config.num_seeds = options["seeds"]
    return config


def plan(table: str, dataset: str, root: str, options: dict, methods=METHODS, pairs=None):
    """The runs of the grid, teachers and students alone first: ``{"pair", "column",
    "workdir", "config"}`` (FSP left out where the widths differ)."""
    base = os.path.join(root, dataset)
    teachers = os.path.join(base, "teachers")
    pairs = pairs or pairs_of(table)
    runs: list[dict] = []
    for teacher, student in pairs:
        for column, workdir in (
            ("teacher", os.path.join(teachers, teacher)),
            ("student", os.path.join(base, "students", student)),
        ):
            config = cell_config(dataset, column, teacher, student, teachers, options)
            runs.append(_run(teacher, student, column, workdir, config))
        for method in methods:
            if method == "fsp" and not _widths_match(teacher, student):
                continue
            workdir = os.path.join(base, f"{teacher}-{student}", method)
            config = cell_config(dataset, method, teacher, student, teachers, options)
            runs.append(_run(teacher, student, method, workdir, config))
    return runs


def _run(teacher: str, student: str, column: str, workdir: str, config) -> dict:
    pair = (teacher, student)
    return {
        "pair": pair,
        "row": ":".join(pair),
        "column": column,
        "workdir": workdir,
        "config": config,
    }


def summarise(table: str, runs: list[dict]) -> dict:
    """Per pair and column: accuracies per seed, median, range, the reference's number, and
    (methods) the paired comparison with the student alone."""
    cells: dict = {}
    for run in runs:
        results = run["results"]
        cell = {
            "reference": REFERENCE.get(table, {}).get(run["pair"], {}).get(run["column"]),
            "workdir": run["workdir"],
        }
        if grid.diverged(results):  # recorded, no numbers
            cell.update({grid.DIVERGED: results[grid.DIVERGED], "accuracy_per_seed": []})
            cell.update(dict.fromkeys(("median", "min", "max")))
        else:
            errors = seed_errors(results)
            accuracy = 100.0 - np.asarray(errors, float)
            cell["accuracy_per_seed"] = accuracy.tolist()
            cell.update(median=float(np.median(accuracy)), min=float(accuracy.min()))
            cell["max"] = float(accuracy.max())
        cells.setdefault(":".join(run["pair"]), {})[run["column"]] = cell
    for row in cells.values():
        alone = np.asarray(row["student"]["accuracy_per_seed"])
        for column, cell in row.items():
            if column not in ("teacher", "student") and cell["median"] is not None and len(alone):
                cell["vs_student"] = paired(np.asarray(cell["accuracy_per_seed"]), alone)
    return cells


def markdown(table: str, dataset: str, cells: dict, methods, command: str) -> str:
    columns = ["teacher", "student", *methods]
    lines = [
        f"# RepDistiller's {table}-architecture table — {dataset}",
        "",
        "Top-1 test accuracy % at the last epoch: median over seeds (min–max); ✓: higher than "
        "the student alone by a paired t-test over the seeds (p < 0.05). The reference row is "
        "RepDistiller's README (CIFAR-100, 240 epochs)"
        + ("" if dataset == "cifar100" else f": a reference from another dataset, not {dataset}")
        + f". Produced by `{command}`.",
        "",
        "| pair | run | " + " | ".join(columns) + " |",
        "|" + "---|" * (len(columns) + 2),
    ]
    for pair, row in cells.items():
        ours = []
        for column in columns:
            cell = row.get(column)
            if cell is None or cell["median"] is None:
                ours.append("N/A" if cell is None else "diverged")
                continue
            spread = f" ({cell['min']:.2f}–{cell['max']:.2f})" if cell["min"] != cell["max"] else ""
            better = cell.get("vs_student", {})
            mark = " ✓" if better.get("clear") and better["mean"] > 0 else ""
            ours.append(f"{cell['median']:.2f}{spread}{mark}")
        reference = REFERENCE.get(table, {}).get(tuple(pair.split(":")), {})
        shown = [f"{reference[c]:.2f}" if reference.get(c) is not None else "N/A" for c in columns]
        lines.append(f"| {pair} | at_jax | " + " | ".join(ours) + " |")
        lines.append(f"| {pair} | RepDistiller (reference) | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


def figure(path: str, cells: dict, methods) -> str:
    """Each method's median accuracy gain over the student alone, one group of bars per pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cells) * len(methods) / 4), 4))
    width = 0.8 / max(1, len(methods))
    for j, method in enumerate(methods):
        gains = [
            row[method]["vs_student"]["mean"] if "vs_student" in row.get(method, {}) else np.nan
            for row in cells.values()
        ]
        ax.bar(np.arange(len(cells)) + j * width, gains, width, label=method)
    ax.set_xticks(np.arange(len(cells)) + 0.4 - width / 2, list(cells), rotation=20)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("accuracy gain over the student alone (points)")
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def make_table(
    table, dataset, root, options, methods=METHODS, pairs=None, command="", progress=True
):
    """Train (or reuse) every run, then write the table, its JSON and figure; returns the cells."""
    runs = grid.run_all(plan(table, dataset, root, options, methods, pairs), progress)
    cells = summarise(table, runs)
    stem = os.path.join(root, f"repdistiller_{table}_{dataset}")
    command = command or f"python -m experiments.repdistiller_tables --table {table}"
    with open(stem + ".md", "w") as f:
        f.write(markdown(table, dataset, cells, methods, command))
    record = {"table": table, "dataset": dataset, "command": command, "options": options}
    write_json_atomic(stem + ".json", {**record, "cells": cells})
    figure(stem + ".png", cells, methods)
    return cells


FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_enum("table", "same", ["same", "cross"], "Which of RepDistiller's tables.")
    flags.DEFINE_enum("dataset", "cifar100", list(DATASETS), "Dataset.")
    flags.DEFINE_integer("seeds", 3, "Seeds per cell (trained together in one program).")
    flags.DEFINE_string("root", "runs/repdistiller", "Where runs, tables and figures go.")
    flags.DEFINE_string("pairs", "", "TEACHER:STUDENT,... of the table (default: all).")
    flags.DEFINE_string("methods", "", "Methods (columns) to run (default: all of the table's).")
    for name in ("teacher_epochs", "student_epochs", "train_size", "test_size"):
        flags.DEFINE_integer(name, 0, f"{name} (0: the recipe's / all).")
    flags.DEFINE_string("data_dir", "", "config.data.data_dir for every run.")
    flags.DEFINE_string("student_model", "", "Replace every student model (quick checks).")
    flags.DEFINE_string("teacher_model", "", "Replace every teacher model (quick checks).")
    flags.DEFINE_string("compilation_cache_dir", default_cache_dir(), "('' = off).")


def main(argv):
    del argv
    devices.use_cpu_cores(64)
    use_compilation_cache(FLAGS.compilation_cache_dir)
    logging.set_verbosity(logging.WARNING)
    start = time.time()
    names = ("seeds", "teacher_epochs", "student_epochs", "train_size", "test_size", "data_dir")
    names += ("student_model", "teacher_model")
    options = {k: FLAGS[k].value for k in names}
    known = TABLE_METHODS[FLAGS.table]
    methods = tuple(m.strip() for m in FLAGS.methods.split(",") if m.strip()) or known
    with (
        one_line_errors(train.TrainingDiverged, CheckpointError),
        train.exit_when_stopped(" (run the same command to go on with the table)"),
    ):
        unknown = [m for m in methods if m not in known]
        if unknown:
            raise ValueError(
                f"--methods {unknown} are not the {FLAGS.table!r} table's ({', '.join(known)})"
            )
        pairs = pairs_of(FLAGS.table, FLAGS.pairs)
        command = "python -m experiments.repdistiller_tables " + " ".join(
            f"--{k}={FLAGS[k].value}"
            for k in ("table", "dataset", "root", "pairs", "methods", *names)
            if FLAGS[k].value
        )
        os.makedirs(FLAGS.root, exist_ok=True)
        make_table(FLAGS.table, FLAGS.dataset, FLAGS.root, options, methods, pairs, command)
    stem = os.path.join(FLAGS.root, f"repdistiller_{FLAGS.table}_{FLAGS.dataset}")
    with open(stem + ".md") as f:
        print(f.read())
    print(f"written: {stem}.md, .json, .png ({(time.time() - start) / 60:.1f} min)")


if __name__ == "__main__":
    define_flags()
    app.run(main)
