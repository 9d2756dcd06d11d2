"""Running a grid of runs (the table runners' cells) in one process, in order.

A cell whose loss becomes NaN or infinite (:class:`at_jax.train.TrainingDiverged`) does not stop
the grid: it is recorded as diverged (its results are ``{"diverged": message}``; the tables show
it as such, as a PyTorch grid would show the NaN accuracy of that cell) and the grid goes on.
Rerunning the grid tries the cell again, from its last good checkpoint where one was saved. A
run that others learn from (a teacher) diverging stops the grid: nothing that needs it could
run.
"""

from __future__ import annotations

import os

from at_jax import train

__all__ = ["DIVERGED", "diverged", "run_all"]

DIVERGED = "diverged"


def diverged(results: dict) -> bool:
    """Whether a cell's results are a divergence record rather than a finished run's."""
    return DIVERGED in results


def _teachers(runs: list[dict]) -> set[str]:
    out = set()
    for run in runs:
        teacher = run["config"].get("teacher")
        if teacher is not None and teacher.get("workdir"):
            out.add(os.path.abspath(teacher.workdir))
    return out


def run_all(runs: list[dict], progress: bool = True) -> list[dict]:
    """Train (or reuse) every run in order, saying which one of how many is going; a diverged
    cell is recorded and the grid goes on (see the module's docstring)."""
    teachers = _teachers(runs)
    for i, run in enumerate(runs, 1):
        config = run["config"]
        print(
            f"\n[{i}/{len(runs)}] {run['row']} {run['column']}: {config.model}, "
            f"{config.num_seeds} seed(s), {config.num_epochs} epochs -> {run['workdir']}",
            flush=True,
        )
        try:
            run["results"] = train.train_and_evaluate(config, run["workdir"], progress=progress)
        except train.TrainingDiverged as e:
            if os.path.abspath(run["workdir"]) in teachers:
                raise
            print(f"{run['row']} {run['column']} diverged; the grid goes on: {e}", flush=True)
            run["results"] = {DIVERGED: str(e)}
    failed = [f"{r['row']} {r['column']}" for r in runs if diverged(r["results"])]
    if failed:
        print(
            f"\n{len(failed)} cell(s) diverged (shown as such in the table; rerunning the "
            f"grid tries them again, from their last good checkpoint where one was saved): "
            + ", ".join(failed),
            flush=True,
        )
    return runs
