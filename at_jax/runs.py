"""A run directory, in one import: use a trained (or converted) run as a teacher in any code
(:func:`load_teacher`), and what the training loop uses of it. Each part lives in its own
module and is re-exported here:

* :mod:`at_jax.rundir` — the directory's files and identity: ``config.json``, "same run?"
  (:func:`check_same_run`, :func:`config_hash`, :data:`RESUMABLE_KEYS`), finished results;
* :mod:`at_jax.checkpoints` — its Orbax checkpoints (:class:`Checkpoints`,
  :func:`restore_variables`, the corrupt-checkpoint fallback);
* :mod:`at_jax.teacher` — :class:`Teacher`, :func:`load_teacher`, ``data.json``.

``from at_jax.runs import load_teacher`` imports no train step, objective or optax.
"""

from __future__ import annotations

from at_jax.checkpoints import CheckpointError, Checkpoints, load_variables, restore_variables
from at_jax.rundir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    CORRUPT_DIR,
    DATA_FILE,
    NEUTRAL_DEFAULTS,
    RESUMABLE_KEYS,
    check_same_run,
    config_hash,
    finished_results,
    flat_config,
    read_config,
)
from at_jax.teacher import (
    Teacher,
    load_run_variables,
    load_teacher,
    read_data_info,
    write_data_info,
)

__all__ = [
    "load_teacher",
    "Teacher",
    "restore_variables",
    "load_variables",
    "load_run_variables",
    "read_config",
    "read_data_info",
    "write_data_info",
    "check_same_run",
    "finished_results",
    "flat_config",
    "config_hash",
    "Checkpoints",
    "CheckpointError",
    "CONFIG_FILE",
    "DATA_FILE",
    "CHECKPOINT_DIR",
    "CORRUPT_DIR",
    "RESUMABLE_KEYS",
    "NEUTRAL_DEFAULTS",
]
