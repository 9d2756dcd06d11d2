"""A run directory's identity: what its files are called, its saved config, and whether a
config describes the same run (:func:`check_same_run`, :func:`config_hash`,
:data:`RESUMABLE_KEYS`). ::

    WORKDIR/config.json        the resolved config (read back when this run serves as a teacher)
    WORKDIR/data.json          its data's DataSpec: num_classes, image_shape, mean, std
    WORKDIR/checkpoints/STEP/  Orbax (at_jax.checkpoints): "state", "meta", and "data" (the
                               Grain iterator's state, streamed runs)
    WORKDIR/metrics.jsonl      rows per epoch (and every config.log_every_steps steps)
    WORKDIR/results.json       written at the end
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

import ml_collections
from flax import traverse_util

__all__ = [
    "CONFIG_FILE",
    "DATA_FILE",
    "CHECKPOINT_DIR",
    "CORRUPT_DIR",
    "METRICS_FILE",
    "RESULTS_FILE",
    "RESUMABLE_KEYS",
    "NEUTRAL_DEFAULTS",
    "read_config",
    "flat_config",
    "config_hash",
    "check_same_run",
    "finished_results",
]

CONFIG_FILE = "config.json"
DATA_FILE = "data.json"  # what the run's images were: class count, shape, mean/std
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"

# Fields that may change when a run is resumed (extending it, moving its data, how it is fed and
# reported); any other change means a different run, which must not be mixed into this workdir.
RESUMABLE_KEYS = (
    "num_epochs",
    "checkpoint_every_epochs",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "eval_batch_size",
    "eval_every_epochs",
    "log_every_steps",
    "data.data_dir",
    "data.source",
    "data.prefetch",
    "compilation_cache_dir",
)

# Keys added after runs were made, at the value that keeps such runs' meaning: a saved config
# without them is the same run (its hash does not change either).
NEUTRAL_DEFAULTS = {
    "init_from": "",
    "freeze.batch_norm": False,
    "freeze.modules": [],
    "optimizer.lr_batch_size": 0,
    "loss.atd.weight": 0,
    "attention_copy.target": "",
    "attention_copy.end_layer": -3,
    "loss.ce.label_smoothing": 0,
    "optimizer.schedule": "step",
    "optimizer.b1": 0.9,
    "optimizer.b2": 0.999,
    "optimizer.warmup_epochs": 0,
    "optimizer.min_lr": 0,
    "optimizer.cosine_epochs": 0,
    "optimizer.layer_decay": 1,
    "optimizer.layer_decay_form": "port",
    "optimizer.clip_grad_norm": 0,
    "optimizer.ema_decay": 0,
    "data.augment.random_erasing": 0,
    "data.augment.mixup": 0,
    "data.augment.cutmix": 0,
    "data.augment.mixup_prob": 1,
    "data.augment.mixup_switch_prob": 0.5,
    "data.augment.randaugment": "",
}


def read_config(workdir: str) -> Optional[ml_collections.ConfigDict]:
    """The run's saved ``config.json``, or None when there is none."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def flat_config(config: Any) -> dict[str, Any]:
    """The config as ``{"a.b.c": value}``, without the options of loss terms that are off
    (weight 0): they do not change the run's numbers."""
    as_dict = config if isinstance(config, dict) else json.loads(config.to_json())
    flat = traverse_util.flatten_dict(as_dict, sep=".")
    off = {
        k.split(".")[1]
        for k, v in flat.items()
        if k.startswith("loss.") and k.endswith(".weight") and v == 0
    }
    return {
        k: v
        for k, v in flat.items()
        if not (k.startswith("loss.") and k.split(".")[1] in off and not k.endswith(".weight"))
        and not (k in NEUTRAL_DEFAULTS and _json(v) == NEUTRAL_DEFAULTS[k])
    }


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def config_hash(config: ml_collections.ConfigDict) -> str:
    """A hash of what defines the run's numbers (the :data:`RESUMABLE_KEYS` excluded)."""
    kept = {k: v for k, v in flat_config(config).items() if k not in RESUMABLE_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:12]


def check_same_run(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Raise if ``workdir`` holds a run whose saved config differs from ``config`` in more than
    :data:`RESUMABLE_KEYS`."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        saved = flat_config(json.load(f))
    new = flat_config(config)
    differ = sorted(
        k for k in set(saved) | set(new) if saved.get(k) != new.get(k) and k not in RESUMABLE_KEYS
    )
    if differ:
        shown = ", ".join(
            f"{k}: {saved.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}" for k in differ[:6]
        )
        raise ValueError(
            f"{workdir!r} holds a run with a different config ({shown}"
            f"{', ...' if len(differ) > 6 else ''}). Use a new --workdir for a new run, or delete "
            f"{workdir!r} to start over; only {', '.join(RESUMABLE_KEYS)} may change on resume."
        )


def finished_results(workdir: str, config: ml_collections.ConfigDict) -> Optional[dict]:
    """The saved results of this exact run if it already finished, else None."""
    path = os.path.join(workdir, RESULTS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        results = json.load(f)
    done = results.get("epochs") == config.num_epochs
    return results if done and results.get("config_hash") == config_hash(config) else None
