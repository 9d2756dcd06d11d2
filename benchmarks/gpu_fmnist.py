"""The demo's experiment at full size on one GPU: the real Fashion-MNIST Table 1 pair.

    python benchmarks/gpu_fmnist.py --workdir runs/gpu_fmnist [--data_dir DIR]
    python benchmarks/gpu_fmnist.py --dry_run      # the demo command it runs, checked, not run

Runs ``experiments.demo`` on all 60,000 training and 10,000 test images: a WRN-16-2 teacher,
then WRN-16-1 students alone, + AT, + KD and + AT + KD, 5 seeds each in one program (seed s of
every student from the same initialisation and batches), with the demo's recipe (batch 64, SGD
lr 0.1, x0.2 at 50% and 75% of training, KD in today's form, BN scales from 1), and writes the
demo's table (median test error and attention distance per run, paired differences from the
student alone over the seeds, which are clear), ``summary.json`` and the attention-map figure
in the workdir. Interrupted, it resumes; finished runs are reused.

The schedule (teacher 20 epochs, students 10) is meant to fit 10 minutes on one H100/H200. It
is an estimate from the steps' sizes, not yet a measurement: the run prints its total minutes;
adjust ``--teacher_epochs``/``--student_epochs`` from that and record it in benchmarks/.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCHEDULE = {
    "train_size": 60000,
    "test_size": 10000,
    "teacher_epochs": 20,
    "student_epochs": 10,
    "seeds": 5,
}


def demo_argv(workdir: str, data_dir: str = "", **schedule: int) -> list[str]:
    """The ``experiments.demo`` command line for the full-size run."""
    values = {**SCHEDULE, **schedule}
    unknown = set(values) - set(SCHEDULE)
    if unknown:
        raise ValueError(f"unknown schedule keys {sorted(unknown)}; known: {sorted(SCHEDULE)}")
    bad = [k for k, v in values.items() if not (isinstance(v, int) and v >= 1)]
    if bad:
        raise ValueError(f"{bad[0]} must be an integer >= 1, got {values[bad[0]]!r}")
    argv = ["experiments.demo", f"--workdir={workdir}"] + [f"--{k}={v}" for k, v in values.items()]
    return argv + ([f"--data_dir={data_dir}"] if data_dir else [])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the demo at full size on one GPU")
    parser.add_argument("--workdir", default="runs/gpu_fmnist")
    parser.add_argument("--data_dir", default="", help="the Fashion-MNIST IDX files' folder")
    for key, value in SCHEDULE.items():
        parser.add_argument(f"--{key}", type=int, default=value)
    parser.add_argument("--dry_run", action="store_true", help="check and print the command")
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)  # experiments/ and configs/ of this repository
    from absl import app

    from at_jax.errors import one_line_errors
    from experiments import demo

    with one_line_errors():
        command = demo_argv(args.workdir, args.data_dir, **{k: getattr(args, k) for k in SCHEDULE})
    if args.dry_run:
        demo.FLAGS(command)  # the demo's own flag parsing: unknown or bad flags fail here
        print("python -m " + " ".join(command))
        return
    app.run(demo.main, argv=command)


if __name__ == "__main__":
    main()
