"""A run's numbers: error counts on the device (:func:`error_counts`), metric rows
(:func:`epoch_row`, :func:`window_row`), and where they go: JSON lines and TensorBoard event
files (:class:`MetricsWriter`; tensorboardX, no TensorFlow). Writing files atomically is
:mod:`at_jax.files`."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

# read_jsonl and write_json_atomic lived here before at_jax.files: importable from here too
from at_jax.files import read_jsonl, write_json_atomic, write_json_lines_atomic  # noqa: F401
from at_jax.rundir import METRICS_FILE, RESULTS_FILE

__all__ = [
    "error_counts",
    "MetricsWriter",
    "epoch_row",
    "window_row",
    "run_results",
    "train_means",
    "METRICS_FILE",
    "RESULTS_FILE",
]


def _summary_writer_class() -> Any:
    """tensorboardX's ``SummaryWriter``, imported without PyTorch: tensorboardX imports torch
    when it is installed (about 2 s, in every run and every Grain worker) only to accept torch
    tensors, which this module never gives it. Where torch is already imported it is used."""
    import sys

    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` -> ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


# metrics that are counts over the steps (reported as totals, not as means per example)
COUNTS = ("train/skipped_images",)


def error_counts(
    logits: jax.Array, labels: jax.Array, mask: Optional[jax.Array] = None
) -> dict[str, jax.Array]:
    """Top-1 and top-5 error counts of a batch (``mask`` 0 drops padding examples), and the
    example count, as on-device sums."""
    mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    k = min(5, logits.shape[-1])
    top_k = jax.lax.top_k(logits, k)[1]
    top1 = (jnp.argmax(logits, -1) != labels).astype(jnp.float32)
    topk = jnp.all(top_k != labels[:, None], axis=-1).astype(jnp.float32)
    return {
        "errors": jnp.sum(top1 * mask),
        "top5_errors": jnp.sum(topk * mask),
        "count": jnp.sum(mask),
    }


class MetricsWriter:
    """Rows to ``metrics.jsonl`` and TensorBoard (x-axis: the global step). Epoch rows have an
    ``epoch`` key; rows every ``config.log_every_steps`` steps do not. On resume, rows after the
    restored step are dropped (they belong to the interrupted attempt) and TensorBoard is purged
    there."""

    def __init__(self, workdir: str, resume_step: int, enabled: bool = True):
        self.path = os.path.join(workdir, METRICS_FILE)
        self.enabled = enabled
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
        self.history = kept
        if enabled:
            write_json_lines_atomic(self.path, kept)
            self.tb = _summary_writer_class()(
                os.path.join(workdir, "tensorboard"),
                purge_step=resume_step + 1 if resume_step else None,
            )

    def epochs(self) -> list[dict]:
        """The epoch rows written so far (earlier attempts included)."""
        return [r for r in self.history if "epoch" in r]

    def write(self, row: Mapping[str, Any]) -> None:
        self.history.append(dict(row))
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        for key, value in row.items():
            if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                self.tb.add_scalar(key, value, row["step"])
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.tb.close()


def train_means(sums: Mapping[str, Any]) -> dict[str, float]:
    """Per-seed metric sums -> the row's train metrics: the median over seeds of each loss term's
    mean, ``train/error``, ``train/top5_error`` in %, and counts (``train/skipped_images``: the
    broken images replaced) as totals."""
    sums = dict(sums)
    count = np.maximum(np.asarray(sums.pop("train/count")), 1)
    row = {}
    for key, value in sums.items():
        if key in COUNTS:
            row[key] = float(np.max(value))
            continue
        mean = np.asarray(value) / count
        if key.endswith("errors"):
            row[key[:-1]] = float(np.median(mean)) * 100.0
        else:
            row[key] = float(np.median(mean))
    return row


# evaluate() names -> metrics.jsonl names (the per-pair attention distances keep theirs:
# "test/attention/<student><-<teacher>")
TEST_KEYS = {
    "error": "test/error",
    "top5_error": "test/top5_error",
    "attention/mean": "test/attention_distance",
    "ema_error": "test/ema_error",
}


def epoch_row(
    sums,
    test: Optional[Mapping[str, np.ndarray]],
    epoch: int,
    step: int,
    lr: float,
    train_time: float,
    epoch_time: float,
) -> dict[str, Any]:
    """An epoch's metrics row: train means, test errors and attention distances to the teacher
    (median over seeds, and per seed)."""
    count = float(np.max(sums["train/count"]))
    row: dict[str, Any] = {
        "epoch": epoch,
        "step": step,
        "lr": lr,
        "epoch_time_s": epoch_time,
        "images_per_s": count * len(np.atleast_1d(sums["train/count"])) / max(train_time, 1e-9),
    }
    row.update(train_means(sums))
    if test is not None:
        for name, value in test.items():
            values = np.atleast_1d(value)
            key = TEST_KEYS.get(name, f"test/{name}")
            row[key] = float(np.median(values))
            if len(values) > 1 and name in TEST_KEYS:
                row[f"{key}_per_seed"] = [float(v) for v in values]
    return row


def window_row(sums, step: int, steps_per_epoch: int, lr: float, seconds: float) -> dict[str, Any]:
    """A row every ``log_every_steps`` steps: train means over the steps since the last one."""
    count = float(np.max(sums["train/count"]))
    row = {
        "step": step,
        "epoch_progress": step / steps_per_epoch,
        "lr": lr,
        "images_per_s": count * len(np.atleast_1d(sums["train/count"])) / max(seconds, 1e-9),
    }
    row.update(train_means(sums))
    return row


def run_results(
    history: list[dict],
    facts: Mapping[str, Any],
    teacher_eval: Optional[dict],
    wall_time: float,
    skipped_files: Optional[list[str]] = None,
) -> dict[str, Any]:
    """A run's ``results.json`` from its epoch rows: final and best test errors (median over
    seeds, and per seed), attention distances, skipped images, the teacher's errors; ``facts``:
    what identifies the run (``config_hash``, ``model``, ``dataset``, ``loss_terms``)."""
    evaluated = [r for r in history if "test/error" in r]
    per_seed = np.asarray([r.get("test/error_per_seed", [r["test/error"]]) for r in evaluated])
    top5 = np.asarray(
        [r.get("test/top5_error_per_seed", [r["test/top5_error"]]) for r in evaluated]
    )
    final, best = per_seed[-1].tolist(), per_seed.min(axis=0).tolist()
    out = {
        "final_test_error": float(np.median(final)),
        "best_test_error": float(np.median(best)),
        "final_test_top5_error": float(np.median(top5[-1])),
        "best_test_top5_error": float(np.median(top5.min(axis=0))),
        "epochs": history[-1]["epoch"],
        "wall_time_s": wall_time,
        **facts,
    }
    if len(final) > 1:
        out["final_test_error_per_seed"] = final
        out["best_test_error_per_seed"] = best
    if "test/ema_error" in evaluated[-1]:  # an EMA of the weights (config.optimizer.ema_decay)
        ema = np.asarray(
            [r.get("test/ema_error_per_seed", [r["test/ema_error"]]) for r in evaluated]
        )
        out["final_ema_test_error"] = float(np.median(ema[-1]))
        out["best_ema_test_error"] = float(np.median(ema.min(axis=0)))
    distances = {
        k[len("test/attention/") :]: v
        for k, v in evaluated[-1].items()
        if k.startswith("test/attention/")
    }
    if distances:
        distances["mean"] = evaluated[-1]["test/attention_distance"]
        out["final_attention_distance"] = distances
    if "train/skipped_images" in history[-1]:
        out["skipped_images"] = int(sum(r.get("train/skipped_images", 0.0) for r in history))
        out["skipped_files"] = list(skipped_files or [])[:10]
    if teacher_eval is not None:
        out["teacher_test_error"] = teacher_eval["error"]
        out["teacher_test_top5_error"] = teacher_eval["top5_error"]
    return out
