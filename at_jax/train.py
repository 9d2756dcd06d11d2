"""``train_and_evaluate(config, workdir)``: a whole, resumable teacher or student run.

Writes to ``workdir``: ``config.json`` (the resolved config, read back when this run serves as a
teacher), ``checkpoints/`` (Orbax, the last ``config.keep_checkpoints`` epochs), ``metrics.jsonl``
and ``tensorboard/`` (per epoch: every loss term by name, train/test error, lr, images/s) and, at
the end, ``results.json``. Restarting the same command resumes from the latest checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import serialization, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from at_jax import trainer as trainer_lib
from at_jax.data import Dataset, load_dataset
from at_jax.metrics import RESULTS_FILE, MetricsWriter, write_json_atomic

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def config_hash(config: ml_collections.ConfigDict) -> str:
    text = json.dumps(json.loads(config.to_json()), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# Fields that may change when a run is resumed (extending it, moving its data); any other change
# means a different run, which must not be mixed into this workdir's checkpoints.
RESUMABLE_KEYS = ("num_epochs", "checkpoint_every_epochs", "keep_checkpoints", "eval_batch_size",
                  "data.data_dir", "data.source")


def check_same_run(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Raise if ``workdir`` holds a run whose saved config differs from ``config`` in more than
    :data:`RESUMABLE_KEYS`."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        saved = traverse_util.flatten_dict(json.load(f), sep=".")
    new = traverse_util.flatten_dict(json.loads(config.to_json()), sep=".")
    differ = sorted(k for k in set(saved) | set(new)
                    if saved.get(k) != new.get(k) and k not in RESUMABLE_KEYS)
    if differ:
        shown = ", ".join(f"{k}: {saved.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}"
                          for k in differ[:6])
        raise ValueError(
            f"{workdir!r} holds a run with a different config ({shown}"
            f"{', ...' if len(differ) > 6 else ''}). Use a new --workdir for a new run, or delete "
            f"{workdir!r} to start over; only {', '.join(RESUMABLE_KEYS)} may change on resume.")


def _finished_results(workdir: str, config: ml_collections.ConfigDict) -> Optional[dict]:
    """The saved results of this exact run if it already finished, else None."""
    path = os.path.join(workdir, RESULTS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        results = json.load(f)
    done = results.get("epochs") == config.num_epochs
    return results if done and results.get("config_hash") == config_hash(config) else None


def _checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


# --------------------------------------------------------------------------- teacher

def load_teacher(workdir: str, num_classes: int, image_shape: tuple, seed_index: int = 0,
                 step: int = 0) -> tuple[trainer_lib.Teacher, ml_collections.ConfigDict]:
    """Restore a trained run as a fixed teacher: architecture from its ``config.json``, variables
    from its checkpoint (the latest, or epoch ``step``), seed ``seed_index`` of a multi-seed run."""
    config_path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"teacher workdir {workdir!r} has no {CONFIG_FILE}: train the "
                                "teacher first (python -m at_jax.main --config configs/... "
                                f"--workdir {workdir})")
    with open(config_path) as f:
        teacher_config = ml_collections.ConfigDict(json.load(f))
    ckpt_dir = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    manager = ocp.CheckpointManager(ckpt_dir) if os.path.isdir(ckpt_dir) else None
    latest = manager.latest_step() if manager else None
    if latest is None:
        raise FileNotFoundError(f"teacher workdir {workdir!r} has no checkpoint in {ckpt_dir}")
    step = step or latest
    restored = manager.restore(step, args=ocp.args.StandardRestore())
    model = trainer_lib.build_model(teacher_config, num_classes)
    if _dataset_classes(teacher_config) not in (None, num_classes):
        raise ValueError(f"teacher in {workdir!r} was trained on {teacher_config.data.name} "
                         f"({_dataset_classes(teacher_config)} classes); this run has "
                         f"{num_classes} classes")
    n_seeds = int(np.shape(restored["step"])[0])
    if not 0 <= seed_index < n_seeds:
        raise ValueError(f"config.teacher.seed_index={seed_index} but the teacher has {n_seeds} "
                         "seed(s)")
    pick = lambda tree: jax.tree.map(lambda a: jnp.asarray(a[seed_index]), tree)  # noqa: E731
    variables = {"params": pick(restored["params"]["student"])}
    if restored.get("batch_stats"):
        variables["batch_stats"] = pick(restored["batch_stats"])
    expected = jax.eval_shape(model.init, jax.random.key(0),
                              jnp.zeros((1,) + tuple(image_shape), jnp.float32))
    got = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)
    if jax.tree.structure(expected) != jax.tree.structure(got) or any(
            e.shape != g.shape for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got))):
        raise ValueError(
            f"the checkpoint in {ckpt_dir} (epoch {step}) does not match the architecture in "
            f"{config_path} (model {teacher_config.model!r}, {num_classes} classes, input "
            f"{tuple(image_shape)}): was config.json edited, or the checkpoint copied from "
            "another run?")
    # The teacher computes in float32 even if the student uses bfloat16.
    model = model.clone(dtype=jnp.float32)
    return trainer_lib.Teacher(variables=variables, model=model), teacher_config


def _dataset_classes(config) -> Optional[int]:
    from at_jax.data import DATASETS
    name = config.get("data", {}).get("name")
    return DATASETS[name]["num_classes"] if name in DATASETS else None


# --------------------------------------------------------------------------- the run

def epoch_indices(config, epoch: int, n_train: int, steps: int) -> np.ndarray:
    """(steps, seeds, batch) example indices: a fresh permutation per seed and epoch, derived from
    (seed, epoch) alone so that a resumed run sees exactly the batches an uninterrupted one would."""
    b = config.batch_size
    perms = [np.random.default_rng([int(config.seed) + s, epoch]).permutation(n_train)[:steps * b]
             for s in range(int(config.num_seeds))]
    return np.stack(perms).reshape(len(perms), steps, b).transpose(1, 0, 2).astype(np.int32)


def _validate(config, data: Dataset, n_devices: int) -> None:
    if config.batch_size < 1 or config.batch_size > len(data.train_labels):
        raise ValueError(f"config.batch_size={config.batch_size} must be between 1 and the "
                         f"number of training examples ({len(data.train_labels)})")
    if config.batch_size % n_devices:
        raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                         f"{n_devices} devices of the mesh; use a multiple of {n_devices}")
    if config.num_epochs < 1:
        raise ValueError(f"config.num_epochs must be >= 1, got {config.num_epochs}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       progress: bool = True) -> dict[str, Any]:
    """Train (or resume) the run described by ``config`` in ``workdir``; returns the results.

    A finished run with the same config returns its saved results without training again."""
    start_time = time.time()
    os.makedirs(workdir, exist_ok=True)
    config = ml_collections.ConfigDict(config)
    manager = _checkpoint_manager(workdir, config.keep_checkpoints)
    try:
        return _run(config, workdir, manager, progress, start_time)
    finally:
        manager.close()


def _run(config, workdir: str, manager: ocp.CheckpointManager, progress: bool,
         start_time: float) -> dict[str, Any]:
    is_main = jax.process_index() == 0
    start_epoch = manager.latest_step() or 0
    if start_epoch or os.path.isfile(os.path.join(workdir, RESULTS_FILE)):
        check_same_run(workdir, config)
    if start_epoch > config.num_epochs:
        raise ValueError(f"{workdir!r} has a checkpoint at epoch {start_epoch}, beyond "
                         f"config.num_epochs={config.num_epochs}; use a new --workdir")
    finished = _finished_results(workdir, config)
    if finished is not None:
        if progress and is_main:
            print(f"{workdir}: finished earlier ({finished['epochs']} epochs), results reused",
                  flush=True)
        return finished

    data = load_dataset(config.data.name, config.data.source, config.data.data_dir or None,
                        config.data.train_size, config.data.test_size)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    _validate(config, data, mesh.size)
    logging.info("data: %s train %s test %s from %s", config.data.name,
                 data.train_images.shape, data.test_images.shape, data.source)

    teacher, teacher_error = None, None
    if config.teacher.workdir:
        teacher, teacher_cfg = load_teacher(config.teacher.workdir, data.num_classes,
                                            data.image_shape, config.teacher.seed_index)
        teacher_error = trainer_lib.evaluate_teacher(teacher, data.test_images, data.test_labels,
                                                     data.mean, data.std, mesh=mesh)
        logging.info("teacher %s from %s: test error %.2f%%", teacher_cfg.model,
                     config.teacher.workdir, teacher_error)
        if progress and is_main:
            print(f"teacher {teacher_cfg.model} ({config.teacher.workdir}): test error "
                  f"{teacher_error:.2f}%", flush=True)

    steps = len(data.train_labels) // config.batch_size
    trainer = trainer_lib.Trainer(config, data.num_classes, data.image_shape, data.mean, data.std,
                                  steps, teacher, mesh)
    if is_main:
        write_json_atomic(os.path.join(workdir, CONFIG_FILE), json.loads(config.to_json()))

    state = trainer.init_state()
    if start_epoch:
        target = serialization.to_state_dict(state)
        restored = manager.restore(start_epoch, args=ocp.args.StandardRestore(target))
        state = serialization.from_state_dict(state, restored)
        logging.info("resumed from epoch %d", start_epoch)
        if progress and is_main:
            print(f"resuming {workdir} from epoch {start_epoch}", flush=True)

    replicated = trainer.replicated
    train_images = trainer_lib.global_array(data.train_images, replicated)
    train_labels = trainer_lib.global_array(data.train_labels, replicated)
    writer = MetricsWriter(workdir, start_epoch, enabled=is_main)
    eval_batch = trainer_lib.eval_batch_size(config.eval_batch_size, len(data.test_labels),
                                             mesh.size)

    def test_error(st) -> np.ndarray:
        fn = lambda x, y, m: trainer.eval_step(st.params, st.batch_stats, x, y, m)  # noqa: E731
        errors = trainer_lib.batched_errors(fn, data.test_images, data.test_labels, eval_batch,
                                            mesh)
        return 100.0 * errors / len(data.test_labels)

    try:
        for epoch in range(start_epoch + 1, config.num_epochs + 1):
            idx = epoch_indices(config, epoch, len(data.train_labels), steps)
            idx = trainer_lib.global_array(idx, NamedSharding(mesh, P(None, None, "data")))
            sums = trainer.empty_sums()
            lr = float(trainer.schedule(int((epoch - 1) * steps)))
            t0 = time.time()
            bar = _progress(steps, f"epoch {epoch}/{config.num_epochs}", progress and is_main)
            for i in range(steps):
                state, sums = trainer.train_step(state, sums, train_images, train_labels, idx[i])
                bar.update(1)
            sums = jax.device_get(sums)  # the epoch's one host sync
            train_time = time.time() - t0
            count = sums.pop("train/count")
            means = {k: v / count for k, v in sums.items()}
            if not all(np.isfinite(v).all() for v in means.values()):
                bad = {k: v.tolist() for k, v in means.items() if not np.isfinite(v).all()}
                last = manager.latest_step()
                kept = f"the last good checkpoint (epoch {last}) is kept" if last else \
                    "no checkpoint was written"
                raise TrainingDiverged(
                    f"loss is NaN/Inf at epoch {epoch} ({bad}); stopped without saving this "
                    f"epoch — {kept}. Lower config.optimizer.lr or the transfer-term weights "
                    "and rerun.")
            test_err = test_error(state)
            row = {"epoch": epoch, "step": int(epoch * steps), "lr": lr,
                   "images_per_s": steps * config.batch_size * trainer.num_seeds / train_time,
                   "epoch_time_s": time.time() - t0}
            for key, value in means.items():
                name = "train/error" if key == "train/errors" else key
                scale = 100.0 if key == "train/errors" else 1.0
                row[name] = float(np.median(value)) * scale
            row["test/error"] = float(np.median(test_err))
            if trainer.num_seeds > 1:
                row["test/error_per_seed"] = [float(e) for e in test_err]
            writer.write(row)
            bar.set_postfix_str(f"loss {row['train/loss']:.3f} test error {row['test/error']:.2f}%")
            bar.close()
            if epoch % config.checkpoint_every_epochs == 0 or epoch == config.num_epochs:
                manager.save(epoch, args=ocp.args.StandardSave(serialization.to_state_dict(state)))
        manager.wait_until_finished()
    finally:
        writer.close()

    earlier = sum(r.get("epoch_time_s", 0.0) for r in writer.history if r["epoch"] <= start_epoch)
    results = _results(config, writer.history, teacher_error, earlier + time.time() - start_time)
    if is_main:
        write_json_atomic(os.path.join(workdir, RESULTS_FILE), results)
    return results


def _results(config, history, teacher_error, wall_time) -> dict[str, Any]:
    per_seed = [r.get("test/error_per_seed", [r["test/error"]]) for r in history]
    final = per_seed[-1]
    best = np.min(np.asarray(per_seed), axis=0).tolist()
    results = {"final_test_error": float(np.median(final)),
               "best_test_error": float(np.median(best)),
               "epochs": history[-1]["epoch"], "wall_time_s": wall_time,
               "config_hash": config_hash(config), "model": config.model,
               "dataset": config.data.name, "loss_terms": sorted(
                   k for k, v in config.loss.items() if v.get("weight", 1.0) != 0)}
    if len(final) > 1:
        results["final_test_error_per_seed"] = final
        results["best_test_error_per_seed"] = best
    if teacher_error is not None:
        results["teacher_test_error"] = float(teacher_error)
    return results


class _NullBar:
    def update(self, n): pass
    def set_postfix_str(self, s): pass
    def close(self): pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NullBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="step", leave=True, dynamic_ncols=True)
