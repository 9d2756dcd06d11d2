"""Where a run's numbers go: JSON lines, TensorBoard event files (tensorboardX, no TensorFlow),
and an atomically written ``results.json``."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Mapping

METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"


def write_json_atomic(path: str, payload: Any) -> None:
    """Write JSON via a temporary file and rename, so a crash never leaves a partial file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill: drop it
                    break
    return rows


class MetricsWriter:
    """Per-epoch rows to ``metrics.jsonl`` and TensorBoard. On resume, rows after the restored
    epoch are dropped (they belong to the interrupted attempt) and TensorBoard is purged there."""

    def __init__(self, workdir: str, resume_epoch: int, enabled: bool = True):
        self.path = os.path.join(workdir, METRICS_FILE)
        self.enabled = enabled
        kept = [r for r in read_jsonl(self.path) if r.get("epoch", 0) <= resume_epoch]
        self.history = kept
        if enabled:
            write_json_lines_atomic(self.path, kept)
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                    purge_step=resume_epoch + 1 if resume_epoch else None)

    def write(self, row: Mapping[str, Any]) -> None:
        self.history.append(dict(row))
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        for key, value in row.items():
            if isinstance(value, (int, float)) and key != "epoch":
                self.tb.add_scalar(key, value, row["epoch"])
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.tb.close()


def write_json_lines_atomic(path: str, rows: list[dict]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".jsonl")
    with os.fdopen(fd, "w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    os.replace(tmp, path)
