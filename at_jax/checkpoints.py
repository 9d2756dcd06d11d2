"""A run's Orbax checkpoints: :class:`Checkpoints` (what the training loop saves and resumes
from, keyed by global step) and :func:`restore_variables` (a run's trained variables, for a
teacher or a fine-tuning start).

Each checkpoint holds the items ``state`` (train state and the epoch's metric sums), ``meta``
(JSON: wall time, skipped files) and, when the training batches have a position of their own
(streamed data: Grain's iterator state, one JSON file per process), ``data``. A checkpoint that
cannot be read (truncated, corrupted) is moved to ``WORKDIR/corrupt_checkpoints`` with a
warning and the run resumes from the newest readable one.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Optional

import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from at_jax.rundir import CHECKPOINT_DIR, CONFIG_FILE, CORRUPT_DIR, read_config

__all__ = ["Checkpoints", "CheckpointError", "restore_variables", "restore_seeds", "load_variables"]


class CheckpointError(RuntimeError):
    """No checkpoint of the run can be read."""


def _handlers() -> dict:
    """The checkpoint's items: train state, JSON metadata and the batches' position (if any)."""
    return {
        "state": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
    }


def _data_state(batches: Any) -> Optional[Any]:
    return None if batches is None else batches.checkpoint_state


def _any_step(directory: str) -> Optional[str]:
    return next((d for d in sorted(os.listdir(directory)) if d.isdigit()), None)


class Checkpoints:
    """The run's Orbax checkpoints, keyed by global step. ``batches`` (the run's
    :class:`~at_jax.data.TrainBatches`) are saved and restored with the state when they have a
    ``checkpoint_state``."""

    def __init__(self, workdir: str, keep: int):
        self.workdir = workdir
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_handlers=_handlers(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state_tree: Any, meta: dict, batches: Any = None) -> None:
        args = {"state": ocp.args.StandardSave(state_tree), "meta": ocp.args.JsonSave(meta)}
        data = _data_state(batches)
        if data is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data)
        self.manager.save(step, args=ocp.args.Composite(**args))

    def restore_latest(self, target: Any, batches: Any = None) -> Optional[tuple[int, Any, dict]]:
        """``(step, state_tree, meta)`` of the newest readable checkpoint (``batches`` with a
        position of their own are set to the saved one), or None when there is none.
        Unreadable ones are moved aside with a warning; if none can be read,
        :class:`CheckpointError`."""
        failures: list[tuple[int, str]] = []
        data = _data_state(batches)
        for step in reversed(self.steps()):
            args = {"state": ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}
            if data is not None:
                args["data"] = grain.checkpoint.CheckpointRestore(data)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**args))
            except Exception as e:  # a truncated or corrupted checkpoint: try an older one
                first_line = str(e).splitlines()[0][:200] if str(e) else ""
                failures.append((step, f"{type(e).__name__}: {first_line}"))
                continue
            if failures:
                self._set_aside(failures)
            return step, restored["state"], dict(restored["meta"] or {})
        if failures:
            reasons = "; ".join(f"step {step}: {reason}" for step, reason in failures)
            raise CheckpointError(
                f"no usable checkpoint in {self.directory} ({reasons}). Delete "
                f"{self.workdir!r} (or its checkpoints/) to start the run over."
            )
        return None

    def _set_aside(self, failures: list[tuple[int, str]]) -> None:
        """Move unreadable checkpoints to ``WORKDIR/corrupt_checkpoints`` (kept, not deleted)."""
        for step, reason in failures:
            message = (
                f"checkpoint {step} in {self.directory} is unreadable ({reason}); "
                "resuming from an older one"
            )
            logging.warning(message)
            if jax.process_index() == 0:
                print(f"warning: {message}", flush=True)
                aside = os.path.join(self.workdir, CORRUPT_DIR)
                os.makedirs(aside, exist_ok=True)
                shutil.move(os.path.join(self.directory, str(step)), os.path.join(aside, str(step)))
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _local(metadata: Any) -> Any:
    """Abstract arrays on this process's first device for a tree of array metadata: a run saved
    on another topology (8 GPUs, 2 hosts) restores on this one."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        metadata,
        is_leaf=lambda m: hasattr(m, "shape"),
    )


def restore_variables(
    workdir: str, seed_index: int = 0, step: Optional[int] = None, what: str = "teacher workdir"
) -> tuple[dict, ml_collections.ConfigDict, str]:
    """``(variables, config, where)`` of a run: ``{"params", "batch_stats"}`` of seed
    ``seed_index`` from its newest checkpoint (or ``step``), on this process's first device, and
    the run's config. Only the student's parameters and BN statistics are read (not the optimizer
    state). ``what`` names the setting that pointed here, for error messages."""
    restored, n_seeds, config, where = _restore_student(workdir, step, what)
    if not 0 <= seed_index < n_seeds:
        raise ValueError(
            f"seed_index={seed_index} but the run in {workdir!r} has {n_seeds} seed(s)"
        )
    pick = lambda tree: jax.tree.map(lambda a: jnp.asarray(a[seed_index]), tree)  # noqa: E731
    variables = {"params": pick(restored["params"]["student"])}
    if restored.get("batch_stats"):
        variables["batch_stats"] = pick(restored["batch_stats"])
    return variables, config, where


def restore_seeds(
    workdir: str, terms: tuple[str, ...] = (), what: str = "the first stage"
) -> tuple[dict, dict, int]:
    """``(variables, term_params, seeds)`` of every seed of a run's newest checkpoint, each leaf
    with a leading seed axis (host arrays): the student's ``{"params", "batch_stats"}`` and the
    parameters of the term modules named in ``terms``. A two-stage run's main stage starts
    from these (:mod:`at_jax.stages`)."""
    restored, n_seeds, _, _ = _restore_student(workdir, None, what, terms)
    variables = {"params": restored["params"]["student"]}
    if restored.get("batch_stats"):
        variables["batch_stats"] = restored["batch_stats"]
    term_params = dict(restored["params"].get("terms", {}))
    return jax.device_get(variables), jax.device_get(term_params), n_seeds


def _restore_student(
    workdir: str, step: Optional[int], what: str, terms: tuple[str, ...] = ()
) -> tuple[dict, int, ml_collections.ConfigDict, str]:
    """The student's parameters and BN statistics (and the named ``terms``' parameters) of all
    seeds of ``workdir``'s checkpoint ``step`` (None: the newest), the seed count, the run's
    config and where it was read."""
    config = read_config(workdir)
    if config is None:
        raise FileNotFoundError(
            f"{what} {workdir!r} has no {CONFIG_FILE}: train that run first "
            "(python -m at_jax.main --config configs/... --workdir "
            f"{workdir}) or convert torchvision weights into it "
            "(python -m at_jax.convert)"
        )
    ckpt_dir = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    if not os.path.isdir(ckpt_dir) or _any_step(ckpt_dir) is None:
        raise FileNotFoundError(f"{what} {workdir!r} has no checkpoint in {ckpt_dir}")
    handlers = {**_handlers(), "state": ocp.PyTreeCheckpointHandler()}
    manager = ocp.CheckpointManager(ckpt_dir, item_handlers=handlers)
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"{what} {workdir!r} has no checkpoint in {ckpt_dir}")
        step = steps[-1] if step is None else step
        saved = manager.item_metadata(step)["state"]["train_state"]
        wanted: dict = {"params": {"student": _local(saved["params"]["student"])}}
        saved_terms = saved["params"].get("terms") or {}
        missing = [t for t in terms if t not in saved_terms]
        if missing:
            raise ValueError(f"{what} {workdir!r} has no parameters of the term(s) {missing}")
        if terms:
            wanted["params"]["terms"] = {t: _local(saved_terms[t]) for t in terms}
        if saved.get("batch_stats"):
            wanted["batch_stats"] = _local(saved["batch_stats"])
        n_seeds = int(saved["step"].shape[0])
        target = {"train_state": wanted}
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True,
                )
            ),
        )["state"]["train_state"]
    finally:
        manager.close()
    return restored, n_seeds, config, f"{ckpt_dir} (step {step})"


def load_variables(workdir: str, seed_index: int = 0, what: str = "config.init_from") -> dict:
    """The variables (host arrays) of ``workdir``'s newest checkpoint: a fine-tuning start."""
    variables, _, _ = restore_variables(workdir, seed_index, what=what)
    return jax.device_get(variables)
