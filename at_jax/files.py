"""Files a run writes so that a crash never leaves half of one: :func:`write_json_atomic`,
:func:`write_json_lines_atomic` (a temporary file in the same folder, then a rename), and
:func:`read_jsonl`, which drops a last line cut by a kill."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

__all__ = ["write_json_atomic", "write_json_lines_atomic", "read_jsonl"]


def _replace_atomically(path: str, suffix: str, write: Any) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    try:
        with os.fdopen(fd, "w") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str, payload: Any) -> None:
    """Write ``payload`` as JSON (sorted keys, indented) to ``path``, atomically."""

    def write(f):
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")

    _replace_atomically(path, ".json", write)


def write_json_lines_atomic(path: str, rows: list[dict]) -> None:
    """Write ``rows`` as JSON lines to ``path``, atomically."""

    def write(f):
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")

    _replace_atomically(path, ".jsonl", write)


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON-lines file ([] if there is none), up to a line cut by a kill."""
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
