"""A run directory: call :func:`load_teacher` to use a trained (or converted) run as a teacher in
any code; :class:`Checkpoints`, :func:`check_same_run` and :func:`restore_variables` are what the
training loop uses. ::

    WORKDIR/config.json        the resolved config (read back when this run serves as a teacher)
    WORKDIR/data.json          its data: num_classes, image_shape, mean, std (for load_teacher)
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
from collections.abc import Callable
from typing import Any, Optional

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from at_jax import finetune, step as step_lib
from at_jax.data.augment import normalize
from at_jax.data.catalog import dataset_info, dataset_num_classes
from at_jax.metrics import RESULTS_FILE, write_json_atomic
from at_jax.models import forward

__all__ = [
    "load_teacher",
    "Teacher",
    "restore_variables",
    "load_variables",
    "load_run_variables",
    "read_config",
    "check_same_run",
    "finished_results",
    "config_hash",
    "Checkpoints",
    "CheckpointError",
    "CONFIG_FILE",
    "CHECKPOINT_DIR",
    "RESUMABLE_KEYS",
]

CONFIG_FILE = "config.json"
DATA_FILE = "data.json"  # what the run's images were: class count, shape, mean/std
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"

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
}


class CheckpointError(RuntimeError):
    """No checkpoint of the run can be read."""


def flat_config(config) -> dict[str, Any]:
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


def _json(value):
    return json.loads(json.dumps(value))


def config_hash(config: ml_collections.ConfigDict) -> str:
    """A hash of what defines the run's numbers (the :data:`RESUMABLE_KEYS` excluded)."""
    kept = {k: v for k, v in flat_config(config).items() if k not in RESUMABLE_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:12]


def write_data_info(
    workdir: str, num_classes: int, image_shape: tuple, mean: Any, std: Any
) -> None:
    """Record what the run's images are (``data.json``): :func:`load_teacher` reads it."""
    write_json_atomic(
        os.path.join(workdir, DATA_FILE),
        {
            "num_classes": int(num_classes),
            "image_shape": [int(d) for d in image_shape],
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
        },
    )


def read_data_info(workdir: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The run's ``data.json``, or (runs made before it existed) what its config implies."""
    path = os.path.join(workdir, DATA_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        return {
            **saved,
            "image_shape": tuple(saved["image_shape"]),
            "mean": tuple(saved["mean"]),
            "std": tuple(saved["std"]),
        }
    return dataset_info(config)


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


# --------------------------------------------------------------------------- checkpoints


def _handlers(streamed: bool) -> dict:
    """The checkpoint's items: train state, JSON metadata and (streamed runs) Grain's state."""
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    if streamed:
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
            self.directory,
            item_handlers=_handlers(streamed),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state_tree: Any, meta: dict, data_iterator=None) -> None:
        args = {"state": ocp.args.StandardSave(state_tree), "meta": ocp.args.JsonSave(meta)}
        if self.streamed:
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


# --------------------------------------------------------------------------- teacher


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
    streamed = os.path.isdir(os.path.join(ckpt_dir, str(_any_step(ckpt_dir)), "data"))
    handlers = {**_handlers(streamed), "state": ocp.PyTreeCheckpointHandler()}
    manager = ocp.CheckpointManager(ckpt_dir, item_handlers=handlers)
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"{what} {workdir!r} has no checkpoint in {ckpt_dir}")
        step = steps[-1] if step is None else step
        saved = manager.item_metadata(step)["state"]["train_state"]
        wanted = {"params": {"student": _local(saved["params"]["student"])}}
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
    if not 0 <= seed_index < n_seeds:
        raise ValueError(
            f"seed_index={seed_index} but the run in {workdir!r} has {n_seeds} seed(s)"
        )
    pick = lambda tree: jax.tree.map(lambda a: jnp.asarray(a[seed_index]), tree)  # noqa: E731
    variables = {"params": pick(restored["params"]["student"])}
    if restored.get("batch_stats"):
        variables["batch_stats"] = pick(restored["batch_stats"])
    return variables, config, f"{ckpt_dir} (step {step})"


def load_variables(workdir: str, seed_index: int = 0, what: str = "config.init_from") -> dict:
    """The variables (host arrays) of ``workdir``'s newest checkpoint: a fine-tuning start."""
    variables, _, _ = restore_variables(workdir, seed_index, what=what)
    return jax.device_get(variables)


def load_run_variables(
    workdir: str,
    num_classes: int,
    image_shape: tuple,
    seed_index: int = 0,
    step: Optional[int] = None,
) -> tuple[Any, dict, ml_collections.ConfigDict]:
    """Restore a trained run's model for evaluation: ``(model, variables, config)``.

    Architecture from its ``config.json``, variables from its newest checkpoint (or ``step``),
    seed ``seed_index`` of a multi-seed run. The model computes in float32."""
    variables, config, where = restore_variables(workdir, seed_index, step)
    model = _evaluation_model(workdir, variables, config, where, num_classes, image_shape)
    return model, variables, config


def _evaluation_model(
    workdir: str,
    variables: dict,
    config: ml_collections.ConfigDict,
    where: str,
    num_classes: int,
    image_shape: tuple,
) -> nn.Module:
    """The run's model (float32) for ``num_classes`` and ``image_shape``, checked against its
    restored ``variables``."""
    trained_classes = dataset_num_classes(config)
    if trained_classes not in (None, num_classes):
        raise ValueError(
            f"teacher in {workdir!r} was trained on {config.data.name} "
            f"({trained_classes} classes); this run has {num_classes} classes"
        )
    model = step_lib.build_model(config, num_classes)
    expected = jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((1, *tuple(image_shape)), jnp.float32)
    )
    try:  # the same check as a fine-tuning start, where only the classifier may differ
        replaced = finetune.plan(expected, variables, config.model, num_classes, workdir)
    except ValueError:
        raise ValueError(
            f"the checkpoint in {where} does not match the architecture in "
            f"{os.path.join(workdir, CONFIG_FILE)} (model {config.model!r}, {num_classes} "
            f"classes, input {tuple(image_shape)}): was config.json edited, or the checkpoint "
            "copied from another run?"
        ) from None
    if replaced:
        trained = traverse_util.flatten_dict(variables)[min(replaced)].shape[-1]
        raise ValueError(
            f"the run in {workdir!r} classifies {trained} classes; this run has "
            f"{num_classes}. A teacher must know this run's classes: fine-tune it "
            "on this data first (config.init_from, e.g. configs/transfer.py:"
            "teacher,DATASET)"
        )
    # The teacher computes in float32 even if the student uses bfloat16.
    return model.clone(dtype=jnp.float32)


def _saved_num_classes(
    config: ml_collections.ConfigDict, variables: dict, image_shape: tuple
) -> int:
    """The class count of a run's classifier, read off its variables (image-folder runs)."""
    expected = jax.eval_shape(
        step_lib.build_model(config, 1).init,
        jax.random.key(0),
        jnp.zeros((1, *tuple(image_shape)), jnp.float32),
    )
    new = traverse_util.flatten_dict(expected)
    old = traverse_util.flatten_dict(variables)
    classes = {old[p].shape[-1] for p in new if p in old and new[p].shape != old[p].shape}
    if len(classes) != 1:
        raise ValueError(f"cannot tell the class count of the run's classifier ({sorted(classes)})")
    return int(classes.pop())


class Teacher:
    """A trained (or converted) run, ready to run in eval mode: ``logits, acts = teacher(images)``.

    Attributes: ``model`` (the Flax module, float32), ``variables`` (``{"params",
    "batch_stats"}``), ``num_classes``, ``image_shape`` (H, W, C), ``mean`` and ``std`` (per
    channel, for images scaled to [0, 1]), ``config`` (the run's config) and ``workdir``.
    Built by :func:`load_teacher`.
    """

    def __init__(
        self,
        model: nn.Module,
        variables: dict,
        num_classes: int,
        image_shape: tuple,
        mean: tuple,
        std: tuple,
        config: ml_collections.ConfigDict,
        workdir: str,
    ):
        self.model, self.variables = model, variables
        self.num_classes, self.image_shape = num_classes, tuple(image_shape)
        self.mean, self.std = tuple(mean), tuple(std)
        self.config, self.workdir = config, workdir
        self._apply: Callable = jax.jit(lambda v, x: forward(model, v, x)[:2])

    def preprocess(self, images_uint8: Any) -> jax.Array:
        """uint8 images (B, H, W, C) — or (B, H, W) for a one-channel teacher — to the float32
        input the teacher was trained on (scaled to [0, 1], normalised with its mean/std)."""
        x = jnp.asarray(images_uint8)
        if x.ndim == 3 and self.image_shape[-1] == 1:
            x = x[..., None]
        if x.ndim != 4 or x.shape[-1] != self.image_shape[-1]:
            raise ValueError(
                f"the teacher in {self.workdir!r} takes images of shape (B, H, W, "
                f"{self.image_shape[-1]}) (trained on {self.image_shape}); got "
                f"{tuple(x.shape)}"
            )
        if x.dtype != jnp.uint8:
            raise ValueError(f"preprocess takes uint8 images (0-255), got {x.dtype}")
        return normalize(x, self.mean, self.std)

    def apply(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``(logits, acts)`` of already preprocessed float input (eval mode, jitted); ``acts``
        are the model's transfer points (WRN ``group0..2``, NIN ``block0..2``, ResNet
        ``layer1..4``, and WRN's per-block ``groupG.blockI``)."""
        return self._apply(self.variables, x)

    def __call__(self, images: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``(logits, acts)`` of uint8 images, preprocessed as in training (float input is taken
        as already preprocessed). Eval mode, jitted; no gradient flows to the teacher's
        variables (they are not an argument)."""
        x = (
            images
            if jnp.issubdtype(jnp.asarray(images).dtype, jnp.floating)
            else self.preprocess(images)
        )
        return self.apply(x)

    def __repr__(self) -> str:
        return (
            f"Teacher({self.config.model!r} from {self.workdir!r}, {self.num_classes} "
            f"classes, images {self.image_shape})"
        )


def load_teacher(workdir: str, seed_index: int = 0) -> Teacher:
    """A CLI-trained or converted run as a teacher, in one line::

        teacher = load_teacher("runs/cifar10/wrn-16-2")
        logits, acts = teacher(images_uint8)      # eval mode, jitted; acts["group0"], ...

    Reads the run's ``config.json`` (architecture), ``data.json`` (class count, image shape,
    mean and std of its images; for older runs, what the dataset's name implies) and its newest
    checkpoint (seed ``seed_index`` of a multi-seed run; only parameters and
    BN statistics). Raises with what to do when the run is missing or does not match its config.
    """
    variables, config, where = restore_variables(workdir, seed_index)
    info = read_data_info(workdir, config)
    image_shape = tuple(info["image_shape"])
    num_classes = info["num_classes"] or _saved_num_classes(config, variables, image_shape)
    model = _evaluation_model(workdir, variables, config, where, num_classes, image_shape)
    return Teacher(
        model, variables, num_classes, image_shape, info["mean"], info["std"], config, workdir
    )
