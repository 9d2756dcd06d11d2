"""A run directory: its config, checkpoints and results, and restoring a run (to continue it, or
as a teacher).

    WORKDIR/config.json        the resolved config (read back when this run serves as a teacher)
    WORKDIR/checkpoints/STEP/  Orbax: "state" (train state + the epoch's metric sums), "meta"
                               (JSON: wall time), "data" (the Grain iterator's state, streamed
                               runs; one JSON file per process)
    WORKDIR/metrics.jsonl      rows per epoch (and every config.log_every_steps steps)
    WORKDIR/results.json       written at the end

A checkpoint that cannot be read (truncated, corrupted) is moved to ``WORKDIR/corrupt_checkpoints``
with a warning and the run resumes from the newest readable one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from at_jax import finetune, step as step_lib

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"

# Fields that may change when a run is resumed (extending it, moving its data, how it is fed and
# reported); any other change means a different run, which must not be mixed into this workdir.
RESUMABLE_KEYS = ("num_epochs", "checkpoint_every_epochs", "checkpoint_every_steps",
                  "keep_checkpoints", "eval_batch_size", "eval_every_epochs", "log_every_steps",
                  "data.data_dir", "data.source", "data.prefetch", "compilation_cache_dir")


# Keys added after runs were made, at the value that keeps such runs' meaning: a saved config
# without them is the same run (its hash does not change either).
NEUTRAL_DEFAULTS = {"init_from": "", "freeze.batch_norm": False, "freeze.modules": [],
                    "optimizer.lr_batch_size": 0}


class CheckpointError(RuntimeError):
    """No checkpoint of the run can be read."""


def flat_config(config) -> dict[str, Any]:
    """The config as ``{"a.b.c": value}``, without the options of loss terms that are off
    (weight 0): they do not change the run's numbers."""
    as_dict = config if isinstance(config, dict) else json.loads(config.to_json())
    flat = traverse_util.flatten_dict(as_dict, sep=".")
    off = {k.split(".")[1] for k, v in flat.items()
           if k.startswith("loss.") and k.endswith(".weight") and v == 0}
    return {k: v for k, v in flat.items()
            if not (k.startswith("loss.") and k.split(".")[1] in off and not k.endswith(".weight"))
            and not (k in NEUTRAL_DEFAULTS and _json(v) == NEUTRAL_DEFAULTS[k])}


def _json(value):
    return json.loads(json.dumps(value))


def config_hash(config: ml_collections.ConfigDict) -> str:
    """A hash of what defines the run's numbers (the :data:`RESUMABLE_KEYS` excluded)."""
    kept = {k: v for k, v in flat_config(config).items() if k not in RESUMABLE_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:12]


def read_config(workdir: str) -> Optional[ml_collections.ConfigDict]:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def check_same_run(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Raise if ``workdir`` holds a run whose saved config differs from ``config`` in more than
    :data:`RESUMABLE_KEYS`."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        saved = flat_config(json.load(f))
    new = flat_config(config)
    differ = sorted(k for k in set(saved) | set(new)
                    if saved.get(k) != new.get(k) and k not in RESUMABLE_KEYS)
    if differ:
        shown = ", ".join(f"{k}: {saved.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}"
                          for k in differ[:6])
        raise ValueError(
            f"{workdir!r} holds a run with a different config ({shown}"
            f"{', ...' if len(differ) > 6 else ''}). Use a new --workdir for a new run, or delete "
            f"{workdir!r} to start over; only {', '.join(RESUMABLE_KEYS)} may change on resume.")


def finished_results(workdir: str, config: ml_collections.ConfigDict) -> Optional[dict]:
    """The saved results of this exact run if it already finished, else None."""
    from at_jax.metrics import RESULTS_FILE
    path = os.path.join(workdir, RESULTS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        results = json.load(f)
    done = results.get("epochs") == config.num_epochs
    return results if done and results.get("config_hash") == config_hash(config) else None


# --------------------------------------------------------------------------- checkpoints

def _handlers(streamed: bool) -> dict:
    """The checkpoint's items: train state, JSON metadata and (streamed runs) Grain's state."""
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    if streamed:
        import grain
        handlers["data"] = grain.checkpoint.CheckpointHandler()
    return handlers


def _any_step(directory: str) -> Optional[str]:
    return next((d for d in sorted(os.listdir(directory)) if d.isdigit()), None)


class Checkpoints:
    """The run's Orbax checkpoints, keyed by global step."""

    def __init__(self, workdir: str, keep: int, streamed: bool):
        self.workdir = workdir
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
        self.streamed = streamed
        self.manager = ocp.CheckpointManager(
            self.directory, item_handlers=_handlers(streamed),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state_tree: Any, meta: dict, data_iterator=None) -> None:
        args = {"state": ocp.args.StandardSave(state_tree), "meta": ocp.args.JsonSave(meta)}
        if self.streamed:
            import grain
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**args))

    def restore_latest(self, target: Any, data_iterator=None) -> Optional[tuple[int, Any, dict]]:
        """``(step, state_tree, meta)`` of the newest readable checkpoint (the data iterator, if
        given, is set to its saved position), or None when there is none. Unreadable ones are
        moved aside with a warning; if none can be read, :class:`CheckpointError`."""
        failures: list[tuple[int, str]] = []
        for step in reversed(self.steps()):
            args = {"state": ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}
            if self.streamed:
                import grain
                args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
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
                f"{self.workdir!r} (or its checkpoints/) to start the run over.")
        return None

    def _set_aside(self, failures: list[tuple[int, str]]) -> None:
        """Move unreadable checkpoints to ``WORKDIR/corrupt_checkpoints`` (kept, not deleted)."""
        for step, reason in failures:
            message = (f"checkpoint {step} in {self.directory} is unreadable ({reason}); "
                       "resuming from an older one")
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


# --------------------------------------------------------------------------- teacher

def _local_target(manager: ocp.CheckpointManager, step: int) -> Any:
    """Abstract arrays on this process's first device: a run saved on another topology (8
    GPUs, 2 hosts) restores on this one."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    metadata = manager.item_metadata(step)["state"]
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        metadata, is_leaf=lambda m: hasattr(m, "shape"))


def restore_variables(workdir: str, seed_index: int = 0, step: Optional[int] = None,
                      what: str = "teacher workdir"
                      ) -> tuple[dict, ml_collections.ConfigDict, str]:
    """``(variables, config, where)`` of a run: ``{"params", "batch_stats"}`` of seed
    ``seed_index`` from its newest checkpoint (or ``step``), on this process's first device, and
    the run's config. ``what`` names the setting that pointed here, for error messages."""
    config = read_config(workdir)
    if config is None:
        raise FileNotFoundError(f"{what} {workdir!r} has no {CONFIG_FILE}: train that run first "
                                "(python -m at_jax.main --config configs/... --workdir "
                                f"{workdir}) or convert torchvision weights into it "
                                "(python -m at_jax.convert)")
    ckpt_dir = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    if not os.path.isdir(ckpt_dir) or _any_step(ckpt_dir) is None:
        raise FileNotFoundError(f"{what} {workdir!r} has no checkpoint in {ckpt_dir}")
    manager = ocp.CheckpointManager(ckpt_dir, item_handlers=_handlers(
        os.path.isdir(os.path.join(ckpt_dir, str(_any_step(ckpt_dir)), "data"))))
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"{what} {workdir!r} has no checkpoint in {ckpt_dir}")
        step = steps[-1] if step is None else step
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_local_target(manager, step))))["state"]["train_state"]
    finally:
        manager.close()
    n_seeds = int(np.shape(restored["step"])[0])
    if not 0 <= seed_index < n_seeds:
        raise ValueError(f"seed_index={seed_index} but the run in {workdir!r} has {n_seeds} "
                         "seed(s)")
    pick = lambda tree: jax.tree.map(lambda a: jnp.asarray(a[seed_index]), tree)  # noqa: E731
    variables = {"params": pick(restored["params"]["student"])}
    if restored.get("batch_stats"):
        variables["batch_stats"] = pick(restored["batch_stats"])
    return variables, config, f"{ckpt_dir} (step {step})"


def load_run_variables(workdir: str, num_classes: int, image_shape: tuple, seed_index: int = 0,
                       step: Optional[int] = None
                       ) -> tuple[Any, dict, ml_collections.ConfigDict]:
    """Restore a trained run's model for evaluation: ``(model, variables, config)``.

    Architecture from its ``config.json``, variables from its newest checkpoint (or ``step``),
    seed ``seed_index`` of a multi-seed run. The model computes in float32."""
    variables, config, where = restore_variables(workdir, seed_index, step)
    from at_jax.data import dataset_num_classes
    trained_classes = dataset_num_classes(config)
    if trained_classes not in (None, num_classes):
        raise ValueError(f"teacher in {workdir!r} was trained on {config.data.name} "
                         f"({trained_classes} classes); this run has {num_classes} classes")
    model = step_lib.build_model(config, num_classes)
    expected = jax.eval_shape(model.init, jax.random.key(0),
                              jnp.zeros((1,) + tuple(image_shape), jnp.float32))
    try:  # the same check as a fine-tuning start, where only the classifier may differ
        replaced = finetune.plan(expected, variables, config.model, num_classes, workdir)
    except ValueError:
        raise ValueError(
            f"the checkpoint in {where} does not match the architecture in "
            f"{os.path.join(workdir, CONFIG_FILE)} (model {config.model!r}, {num_classes} "
            f"classes, input {tuple(image_shape)}): was config.json edited, or the checkpoint "
            "copied from another run?") from None
    if replaced:
        trained = traverse_util.flatten_dict(variables)[min(replaced)].shape[-1]
        raise ValueError(f"the run in {workdir!r} classifies {trained} classes; this run has "
                         f"{num_classes}. A teacher must know this run's classes: fine-tune it "
                         "on this data first (config.init_from, e.g. configs/transfer.py:"
                         "teacher,DATASET)")
    # The teacher computes in float32 even if the student uses bfloat16.
    return model.clone(dtype=jnp.float32), variables, config
