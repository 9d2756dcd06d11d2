"""The paper's Tables 1–3 as one command: every teacher and column trained (seeds together in one
program), then a table of medians over seeds beside the paper's numbers, and the test-error curves.

    python -m experiments.paper_tables --table 1 --dataset cifar10 --seeds 5 --root runs/tables
    python -m experiments.paper_tables --table 1 --dataset fashion_mnist --pair all --seeds 3 \
        --teacher_epochs 10 --student_epochs 10 --train_size 10000 --root runs/tables

Tables: 1 (activation-based AT vs F-ActT, KD, AT+KD; ``--pair`` picks the teacher/student row:
``nin``, ``wrn-16-1,wrn-16-2`` (default), ``wrn-16-1,wrn-40-1``, ``wrn-16-2,wrn-40-2`` or ``all``),
2 (attention mapping functions, WRN-16-2 → WRN-16-1), 3 (gradient-based AT on thin NIN; datasets
``cifar10`` and ``fashion_mnist``). Datasets: ``cifar10``, ``cifar100``, ``fashion_mnist``.

Runs go to ``ROOT/DATASET/...``; finished ones are reused, unfinished ones resume, so the command
can be interrupted and rerun; a cell whose loss becomes NaN is shown as "diverged" and the
grid goes on (``experiments.grid``). ``--teacher_epochs``/``--student_epochs``/``--train_size``/
``--test_size`` shorten the runs (the lr drops then come at the same fractions of training as the
reference's 60/120/160 of 200). Outputs: ``ROOT/tableT_DATASET.md`` and ``.json`` (per cell: the
median over seeds of the final test error, min–max, the paper's number) and
``ROOT/tableT_DATASET_curves.png`` (test error per epoch, median over seeds; the paper's Fig. 7b).
The paper reports CIFAR-10 only: on CIFAR-10 its number stands in brackets beside each cell; on
another dataset the table has a second row with the paper's CIFAR-10 numbers, labelled as a
reference from another dataset.
"""

from __future__ import annotations

import os
import time
from typing import Optional

import numpy as np
from absl import app, flags, logging

from at_jax import devices, train
from at_jax.compilation_cache import default_cache_dir, use_compilation_cache
from at_jax.errors import one_line_errors
from at_jax.files import read_jsonl, write_json_atomic
from at_jax.runs import CheckpointError
from configs import cifar10, cifar100, fashion_mnist, table3
from experiments import grid
from experiments.paired import seed_errors

DATASET_CONFIGS = {"cifar10": cifar10, "cifar100": cifar100, "fashion_mnist": fashion_mnist}

# Table 1 rows: (student, teacher) -> the paper's CIFAR-10 numbers per column (test error %).
TABLE1_PAIRS = {
    "nin": ("nin-thin", "nin-wide"),
    "wrn-16-1,wrn-16-2": ("wrn-16-1", "wrn-16-2"),
    "wrn-16-1,wrn-40-1": ("wrn-16-1", "wrn-40-1"),
    "wrn-16-2,wrn-40-2": ("wrn-16-2", "wrn-40-2"),
}
TABLE1_COLUMNS = (
    ("student", "student"),
    ("AT", "at"),
    ("F-ActT", "factt"),
    ("KD", "kd"),
    ("AT+KD", "at_kd_decay"),
)
PAPER = {
    1: {
        "nin": {
            "student": 9.38,
            "AT": 8.93,
            "F-ActT": 9.05,
            "KD": 8.55,
            "AT+KD": 8.33,
            "teacher": 7.28,
        },
        "wrn-16-1,wrn-16-2": {
            "student": 8.77,
            "AT": 7.93,
            "F-ActT": 8.51,
            "KD": 7.41,
            "AT+KD": 7.51,
            "teacher": 6.31,
        },
        "wrn-16-1,wrn-40-1": {
            "student": 8.77,
            "AT": 8.25,
            "F-ActT": 8.62,
            "KD": 8.39,
            "AT+KD": 8.01,
            "teacher": 6.58,
        },
        "wrn-16-2,wrn-40-2": {
            "student": 6.31,
            "AT": 5.85,
            "F-ActT": 6.24,
            "KD": 6.08,
            "AT+KD": 5.71,
            "teacher": 5.23,
        },
    },
    2: {
        "wrn-16-1,wrn-16-2": {
            "none": 8.77,
            "F_sum": 7.99,
            "F_sum^2": 7.93,
            "F_sum^4": 8.09,
            "F_max^1": 8.08,
        }
    },
    3: {
        "nin": {
            "baseline": 13.5,
            "min-l2": 12.5,
            "grad-AT": 12.1,
            "KD": 12.1,
            "symmetry": 11.8,
            "AT": 11.2,
        }
    },
}
TABLE2_COLUMNS = (
    ("none", "student"),
    ("F_sum", "at_fsum"),
    ("F_sum^2", "at_fsum2"),
    ("F_sum^4", "at_fsum4"),
    ("F_max^1", "at_fmax1"),
)
TABLE3_COLUMNS = (
    ("baseline", "baseline"),
    ("min-l2", "min_l2"),
    ("grad-AT", "grad_at"),
    ("KD", "kd"),
    ("symmetry", "symmetry"),
    ("AT", "at"),
)

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_enum("table", "1", ["1", "2", "3"], "Which table.")
    flags.DEFINE_enum("dataset", "cifar10", list(DATASET_CONFIGS), "Dataset.")
    flags.DEFINE_integer("seeds", 5, "Seeds per run (trained together in one program).")
    flags.DEFINE_string("root", "runs/tables", "Where runs, tables and figures go.")
    flags.DEFINE_string(
        "pair", "wrn-16-1,wrn-16-2", f"Table 1 row(s): {', '.join(TABLE1_PAIRS)} or all."
    )
    flags.DEFINE_integer("teacher_epochs", 0, "Teacher epochs (0: the config's).")
    flags.DEFINE_integer("student_epochs", 0, "Student epochs (0: the config's).")
    flags.DEFINE_integer("train_size", 0, "Training examples (0: all).")
    flags.DEFINE_integer("test_size", 0, "Test examples (0: all).")
    flags.DEFINE_string("data_dir", "", "config.data.data_dir for every run.")
    flags.DEFINE_string("student_model", "", "Replace every student model (quick checks).")
    flags.DEFINE_string("teacher_model", "", "Replace every teacher model (quick checks).")
    flags.DEFINE_enum(
        "seed_strategy",
        "auto",
        ["auto", "vmap", "unroll"],
        "How a run's seeds share its program (config.seed_strategy; auto: unrolled on CPU, "
        "vmap elsewhere).",
    )
    flags.DEFINE_string(
        "compilation_cache_dir",
        default_cache_dir(),
        "JAX's persistent compilation cache ('' = off).",
    )


def _shorten(config, epochs: int, options: dict) -> None:
    if epochs:
        config.num_epochs = epochs
        config.optimizer.lr_decay_epochs = tuple(
            sorted({max(1, round(epochs * f)) for f in (0.3, 0.6, 0.8)})
        )
    for key in ("train_size", "test_size", "data_dir"):
        if options.get(key):
            config.data[key] = options[key]
    config.num_seeds = options["seeds"]
    config.seed_strategy = options.get("seed_strategy") or "auto"


def plan(table: int, dataset: str, root: str, options: dict, pairs=None) -> list[dict]:
    """The runs a table needs, teachers first: ``{"row", "column", "workdir", "config"}``."""
    if table == 3 and dataset not in table3.DATASETS:
        raise ValueError(f"Table 3 runs on {table3.DATASETS}, not {dataset!r}")
    base = os.path.join(root, dataset)
    runs = []

    def add(row, column, workdir, config, epochs, teacher: bool):
        model = options.get("teacher_model" if teacher else "student_model")
        if model:
            config.model = model
        _shorten(config, epochs, options)
        runs.append({"row": row, "column": column, "workdir": workdir, "config": config})

    if table == 3:
        for name in table3.TEACHERS:
            add(
                "nin",
                name,
                os.path.join(base, "table3", name),
                table3.get_config(f"{name},{dataset}"),
                options["teacher_epochs"],
                True,
            )
        for column, method in TABLE3_COLUMNS:
            config = table3.get_config(f"{method},{dataset}")
            if config.teacher.workdir:
                config.teacher.workdir = os.path.join(
                    base, "table3", os.path.basename(config.teacher.workdir)
                )
            add(
                "nin",
                column,
                os.path.join(base, "table3", method),
                config,
                options["student_epochs"],
                False,
            )
        return runs
    module = DATASET_CONFIGS[dataset]
    rows = pairs or (["wrn-16-1,wrn-16-2"] if table == 2 else list(TABLE1_PAIRS))
    columns = TABLE1_COLUMNS if table == 1 else TABLE2_COLUMNS
    for row in rows:
        student, teacher = TABLE1_PAIRS[row]
        teacher_dir = os.path.join(base, "teachers", teacher)
        config = module.get_config("teacher")
        config.model = teacher
        add(row, "teacher", teacher_dir, config, options["teacher_epochs"], True)
        for column, method in columns:
            config = module.get_config(method)
            config.model = student
            if config.teacher.workdir:
                config.teacher.workdir = teacher_dir
            workdir = os.path.join(base, f"table{table}", f"{student}-from-{teacher}", method)
            add(row, column, workdir, config, options["student_epochs"], False)
    return runs


def summarise(table: int, dataset: str, runs: list[dict]) -> dict:
    """Per row and column: median over seeds, min, max, the paper's number, the workdir (a
    diverged cell: its message, and None for the numbers)."""
    cells: dict = {}
    for run in runs:
        results = run["results"]
        reference = PAPER[table].get(run["row"], {}).get(run["column"])
        cell = {
            # the paper's number for this cell: on CIFAR-10 a comparison, elsewhere a reference
            "paper": reference if dataset == "cifar10" else None,
            "paper_cifar10": reference,
            "workdir": run["workdir"],
        }
        if grid.diverged(results):
            cell.update(dict.fromkeys(("median", "min", "max", "epochs", "attention_distance")))
            cell.update({grid.DIVERGED: results[grid.DIVERGED], "seeds": []})
        else:
            errors = seed_errors(results)
            cell.update(median=float(np.median(errors)), min=float(np.min(errors)))
            cell.update(max=float(np.max(errors)), seeds=errors, epochs=results["epochs"])
            cell["attention_distance"] = results.get("final_attention_distance", {}).get("mean")
        cells.setdefault(run["row"], {})[run["column"]] = cell
    return cells


def markdown(table: int, dataset: str, cells: dict, command: str) -> str:
    on_cifar10 = dataset == "cifar10"
    lines = [
        f"# Table {table} — {dataset}",
        "",
        "Test error % at the last epoch: median over seeds (min–max)"
        + (
            ", the paper's number in brackets."
            if on_cifar10
            else f". The paper reports CIFAR-10 only: its numbers are shown in their own row, as "
            f"a reference from another dataset, not as a target for {dataset}."
        )
        + f" Produced by `{command}`.",
        "",
    ]
    for row, columns in cells.items():
        names = list(columns)
        lines += [
            f"## {row}",
            "",
            "| run | " + " | ".join(names) + " |",
            "|" + "---|" * (len(names) + 1),
        ]
        shown = []
        for name in names:
            c = columns[name]
            paper = f" [{c['paper']:.2f}]" if c["paper"] is not None else ""
            if c["median"] is None:
                shown.append(f"diverged{paper}")
                continue
            spread = f" ({c['min']:.2f}–{c['max']:.2f})" if len(c["seeds"]) > 1 else ""
            shown.append(f"{c['median']:.2f}{spread}{paper}")
        lines.append(
            f"| {'at_jax' if on_cifar10 else f'at_jax, {dataset}'} | " + " | ".join(shown) + " |"
        )
        if not on_cifar10:
            reference = [
                f"{columns[n]['paper_cifar10']:.2f}"
                if columns[n].get("paper_cifar10") is not None
                else "–"
                for n in names
            ]
            lines.append("| the paper, CIFAR-10 (reference) | " + " | ".join(reference) + " |")
        lines.append("")
        seeds = max(len(c["seeds"]) for c in columns.values())
        epochs = sorted({c["epochs"] for c in columns.values() if c["epochs"] is not None})
        lines += [f"{seeds} seed(s); epochs: {', '.join(map(str, epochs))}.", ""]
    return "\n".join(lines)


def curves(path: str, table: int, dataset: str, runs: list[dict]) -> str:
    """Test error per epoch for each column (median over seeds), one panel per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(dict.fromkeys(r["row"] for r in runs))
    fig, axes = plt.subplots(1, len(rows), figsize=(6 * len(rows), 4), squeeze=False)
    for ax, row in zip(axes[0], rows, strict=True):
        for run in (r for r in runs if r["row"] == row):
            history = [
                r
                for r in read_jsonl(os.path.join(run["workdir"], "metrics.jsonl"))
                if "test/error" in r
            ]
            ax.plot(
                [r["epoch"] for r in history],
                [r["test/error"] for r in history],
                label=run["column"],
                marker="." if len(history) < 30 else None,
            )
        ax.set_title(f"Table {table}, {dataset}: {row}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test error % (median over seeds)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def make_table(
    table: int,
    dataset: str,
    root: str,
    options: dict,
    pairs=None,
    command: Optional[str] = None,
    progress: bool = True,
) -> dict:
    """Train what the table needs and write its markdown, JSON and curves; returns the cells."""
    runs = grid.run_all(plan(table, dataset, root, options, pairs), progress)
    cells = summarise(table, dataset, runs)
    stem = os.path.join(root, f"table{table}_{dataset}")
    command = command or f"python -m experiments.paper_tables --table {table} --dataset {dataset}"
    with open(stem + ".md", "w") as f:
        f.write(markdown(table, dataset, cells, command))
    write_json_atomic(
        stem + ".json",
        {
            "table": table,
            "dataset": dataset,
            "command": command,
            "options": options,
            "cells": cells,
        },
    )
    curves(stem + "_curves.png", table, dataset, runs)
    return cells


def main(argv):
    del argv
    devices.use_cpu_cores(128)
    use_compilation_cache(FLAGS.compilation_cache_dir)
    logging.set_verbosity(logging.WARNING)
    start = time.time()
    table = int(FLAGS.table)
    pairs = None
    if table == 1 and FLAGS.pair != "all":
        if FLAGS.pair not in TABLE1_PAIRS:
            raise app.UsageError(
                f"unknown --pair {FLAGS.pair!r}; known: {', '.join(TABLE1_PAIRS)}, all"
            )
        pairs = [FLAGS.pair]
    options = {
        k: FLAGS[k].value
        for k in (
            "seeds",
            "teacher_epochs",
            "student_epochs",
            "train_size",
            "test_size",
            "data_dir",
            "student_model",
            "teacher_model",
            "seed_strategy",
        )
    }
    os.makedirs(FLAGS.root, exist_ok=True)
    command = "python -m experiments.paper_tables " + " ".join(
        f"--{k}={FLAGS[k].value}"
        for k in (
            "table",
            "dataset",
            "seeds",
            "root",
            "pair",
            *tuple(k for k, v in options.items() if v and k != "seeds"),
        )
    )
    # SIGTERM/SIGINT: the run in progress saves a checkpoint, and the table runner stops; a
    # missing dataset or teacher: one line
    with (
        one_line_errors(train.TrainingDiverged, CheckpointError),
        train.exit_when_stopped(" (run the same command to go on with the table)"),
    ):
        make_table(table, FLAGS.dataset, FLAGS.root, options, pairs, command)
    stem = os.path.join(FLAGS.root, f"table{table}_{FLAGS.dataset}")
    with open(stem + ".md") as f:
        print(f.read())
    print(
        f"written: {stem}.md, {stem}.json, {stem}_curves.png ({(time.time() - start) / 60:.1f} min)"
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
