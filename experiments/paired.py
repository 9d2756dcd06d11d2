"""Comparing runs seed by seed, for the experiments that train several seeds of several methods
in one program (``make demo``, ``experiments.vit_attention``): seed s of every run starts from
the same initialisation and sees the same batches, so methods are compared by their per-seed
differences and a paired t-test over the seeds."""

import os

import numpy as np
from scipy import stats

from at_jax.files import read_jsonl

__all__ = ["ALPHA", "per_seed", "paired", "seed_errors", "spread", "verdict"]

ALPHA = 0.05  # the paired t-test's level (two-sided)


def seed_errors(results: dict) -> list[float]:
    """A run's final test error per seed (one value for a single-seed run's results)."""
    return results.get("final_test_error_per_seed", [results["final_test_error"]])


def per_seed(results: dict, workdir: str) -> dict[str, np.ndarray]:
    """A run's final test error and attention distance, one value per seed."""
    errors = seed_errors(results)
    last = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "test/error" in r][-1]
    distance = last.get(
        "test/attention_distance_per_seed",
        [last["test/attention_distance"]] if "test/attention_distance" in last else [],
    )
    return {"error": np.asarray(errors, float), "distance": np.asarray(distance, float)}


def paired(values: np.ndarray, baseline: np.ndarray) -> dict:
    """The per-seed differences ``values − baseline``, their mean and range, and whether a
    paired t-test over the seeds rejects "no difference" at level :data:`ALPHA`."""
    diff = values - baseline
    p = (
        float(stats.ttest_rel(values, baseline).pvalue)
        if len(diff) > 1 and diff.std() > 0
        else (0.0 if len(diff) > 1 and diff.mean() != 0 else 1.0)
    )
    return {
        "mean": float(diff.mean()),
        "min": float(diff.min()),
        "max": float(diff.max()),
        "p": p,
        "clear": p < ALPHA,
    }


def spread(values: np.ndarray, fmt: str) -> str:
    median = format(float(np.median(values)), fmt)
    if len(values) < 2:
        return median
    return f"{median} ({format(values.min(), fmt)}–{format(values.max(), fmt)})"


def verdict(d: dict, fmt: str, lower: str, higher: str) -> str:
    sign = lower if d["mean"] < 0 else higher
    word = f"clearly {sign}" if d["clear"] else "not clear"
    return (
        f"{format(d['mean'], '+' + fmt)} [{format(d['min'], '+' + fmt)}, "
        f"{format(d['max'], '+' + fmt)}] {word}"
    )
