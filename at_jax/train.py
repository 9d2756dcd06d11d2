"""``train_and_evaluate(config, workdir)``: the loop of a whole, resumable teacher or student run.

Batches in (:func:`at_jax.data.open_data`, in memory or streamed), steps
(:mod:`at_jax.step`), and the cadence: a metrics row every ``config.log_every_steps`` steps and
per epoch, the test error every ``config.eval_every_epochs`` epochs (and after the last), a
checkpoint every ``config.checkpoint_every_steps`` steps and every ``checkpoint_every_epochs``
epochs (:mod:`at_jax.runs`). Restarting the same command resumes from the newest checkpoint at
the exact next batch, with the interrupted epoch's metric sums, so the run ends with the same
numbers as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import serialization
from tqdm import tqdm

from at_jax import evaluate, finetune, runs, step as step_lib
from at_jax.data import open_data
from at_jax.metrics import RESULTS_FILE, MetricsWriter, epoch_row, window_row, write_json_atomic
from at_jax.sharding import data_mesh, replicated

__all__ = ["train_and_evaluate", "TrainingDiverged"]


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def _validate(config, data, n_devices: int) -> None:
    if config.batch_size < 1 or config.batch_size > data.n_train:
        raise ValueError(
            f"config.batch_size={config.batch_size} must be between 1 and the "
            f"number of training examples ({data.n_train})"
        )
    if config.batch_size % n_devices:
        raise ValueError(
            f"config.batch_size={config.batch_size} is not divisible by the "
            f"{n_devices} devices of the mesh; use a multiple of {n_devices}"
        )
    if config.num_epochs < 1:
        raise ValueError(f"config.num_epochs must be >= 1, got {config.num_epochs}")
    for key in ("log_every_steps", "checkpoint_every_steps"):
        if config[key] < 0:
            raise ValueError(f"config.{key} must be >= 0 (0 = off), got {config[key]}")
    for key in ("eval_every_epochs", "checkpoint_every_epochs"):
        if config[key] < 1:
            raise ValueError(f"config.{key} must be >= 1, got {config[key]}")


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, progress: bool = True
) -> dict[str, Any]:
    """Train (or resume) the run described by ``config`` in ``workdir``; returns the results.

    A finished run with the same config returns its saved results without training again."""
    start_time = time.time()
    os.makedirs(workdir, exist_ok=True)
    config = ml_collections.ConfigDict(config)
    is_main = jax.process_index() == 0
    say = (
        (lambda message: print(message, flush=True))
        if progress and is_main
        else (lambda message: None)
    )
    if os.path.isfile(os.path.join(workdir, runs.CONFIG_FILE)):
        runs.check_same_run(workdir, config)
    finished = runs.finished_results(workdir, config)
    if finished is not None:
        say(f"{workdir}: finished earlier ({finished['epochs']} epochs), results reused")
        return finished

    mesh = data_mesh()
    data = open_data(config, mesh)
    _validate(config, data, mesh.size)
    logging.info(
        "data: %s, %d train / %d test, %s",
        config.data.name,
        data.n_train,
        data.n_test,
        data.description,
    )

    teacher_model, teacher_eval = None, None
    teacher_variables: Any = {}
    if config.teacher.workdir:
        teacher_model, teacher_variables, teacher_cfg = runs.load_run_variables(
            config.teacher.workdir, data.num_classes, data.image_shape, config.teacher.seed_index
        )
        # host copies first: a global (multi-process) array is built from the same values on
        # every process
        teacher_variables = jax.device_put(jax.device_get(teacher_variables), replicated(mesh))
        measured = evaluate.evaluate(
            evaluate.make_eval_fn(teacher_model, data.mean, data.std),
            teacher_variables,
            data.eval_batches(),
        )
        teacher_eval = {k: float(v) for k, v in measured.items()}
        say(
            f"teacher {teacher_cfg.model} ({config.teacher.workdir}): test error "
            f"{teacher_eval['error']:.2f}% (top-5 {teacher_eval['top5_error']:.2f}%)"
        )

    init_variables = None
    if config.init_from:
        init_variables = runs.load_variables(config.init_from)
    step = step_lib.Step(
        config,
        data.num_classes,
        data.image_shape,
        data.mean,
        data.std,
        data.steps_per_epoch,
        teacher_model,
        teacher_variables,
        mesh,
        init_variables,
    )
    if init_variables is not None:
        replaced = finetune.describe(step.replaced, step.variable_shapes, init_variables)
        say(
            f"starting from {config.init_from}"
            + (f" (new classifier: {replaced})" if replaced else "")
        )
    if step.frozen:
        trained, frozen = finetune.trainable_count(step.frozen, step.variable_shapes["params"])
        modules = ", ".join(finetune.module_names(config.freeze.modules)) or "no module"
        say(
            f"frozen: {frozen:,} parameters ({modules}"
            f"{' + batch norm' if config.freeze.batch_norm else ''}); trained: {trained:,}"
        )
    if is_main:
        write_json_atomic(os.path.join(workdir, runs.CONFIG_FILE), json.loads(config.to_json()))
        runs.write_data_info(workdir, data.num_classes, data.image_shape, data.mean, data.std)
    checkpoints = runs.Checkpoints(workdir, config.keep_checkpoints, data.streamed)
    try:
        return _loop(
            config,
            workdir,
            data,
            step,
            teacher_variables,
            teacher_eval,
            checkpoints,
            progress and is_main,
            start_time,
        )
    finally:
        checkpoints.close()


def _loop(
    config, workdir, data, step, teacher_variables, teacher_eval, checkpoints, progress, start_time
) -> dict[str, Any]:
    is_main = jax.process_index() == 0
    steps_per_epoch = data.steps_per_epoch
    total_steps = int(config.num_epochs) * steps_per_epoch
    state, sums = step.init_state(), step.empty_sums()
    window = step.empty_sums()
    train_iter = data.train_iterator() if data.streamed else None
    target = {"train_state": serialization.to_state_dict(state), "sums": sums, "window": window}
    restored = checkpoints.restore_latest(target, train_iter)
    start_step, earlier_time = 0, 0.0
    if restored is not None:
        start_step, tree, meta = restored
        if start_step > total_steps:
            raise ValueError(
                f"{workdir!r} has a checkpoint at step {start_step} (epoch "
                f"{start_step / steps_per_epoch:g}), beyond config.num_epochs="
                f"{config.num_epochs}; use a new --workdir"
            )
        state = serialization.from_state_dict(state, tree["train_state"])
        sums, window = tree["sums"], tree["window"]
        earlier_time = float(meta.get("wall_time_s", 0.0))
        logging.info("resumed from step %d", start_step)
        if progress:
            print(
                f"resuming {workdir} from step {start_step} (epoch "
                f"{start_step // steps_per_epoch}, step {start_step % steps_per_epoch} of "
                f"{steps_per_epoch})",
                flush=True,
            )
    batches: Iterator[dict] = (
        train_iter if train_iter is not None else data.train_batches(start_step)
    )
    writer = MetricsWriter(workdir, start_step, enabled=is_main)
    eval_fn = evaluate.make_eval_fn(
        step.model,
        data.mean,
        data.std,
        step.dtype,
        seeds=step.num_seeds,
        teacher_model=step.teacher_model,
        pairs=step.attention_pairs(),
        seed_strategy=step.seed_strategy(),
    )
    accumulate = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=0)
    session_start = start_time  # this attempt's time, data loading and teacher evaluation included

    def elapsed() -> float:
        return earlier_time + time.time() - session_start

    def save(at_step: int) -> None:
        _check_finite(jax.device_get(sums), f"step {at_step}", checkpoints)
        checkpoints.save(
            at_step,
            {"train_state": serialization.to_state_dict(state), "sums": sums, "window": window},
            {"wall_time_s": elapsed()},
            train_iter,
        )

    current = start_step
    try:
        epoch = current // steps_per_epoch + 1
        bar = _progress(steps_per_epoch, current % steps_per_epoch, epoch, config, progress)
        t_epoch, t_window = time.time(), time.time()
        while current < total_steps:
            batch = next(batches)
            state, metrics = step.train_step(state, batch, teacher_variables)
            sums = accumulate(sums, metrics)
            if config.log_every_steps:
                window = accumulate(window, metrics)
            current += 1
            bar.update(1)
            if config.log_every_steps and current % config.log_every_steps == 0:
                host = jax.device_get(window)
                _check_finite(host, f"step {current}", checkpoints)
                writer.write(
                    window_row(
                        host,
                        current,
                        steps_per_epoch,
                        float(step.schedule(current - 1)),
                        time.time() - t_window,
                    )
                )
                window, t_window = step.empty_sums(), time.time()
            if current % steps_per_epoch == 0:
                epoch = current // steps_per_epoch
                host = jax.device_get(sums)
                _check_finite(host, f"epoch {epoch}", checkpoints)
                train_time = time.time() - t_epoch
                test = None
                if epoch % config.eval_every_epochs == 0 or epoch == config.num_epochs:
                    test = evaluate.evaluate(
                        eval_fn,
                        evaluate.student_variables(state),
                        data.eval_batches(),
                        teacher_variables,
                    )
                row = epoch_row(
                    host,
                    test,
                    epoch,
                    current,
                    float(step.schedule((epoch - 1) * steps_per_epoch)),
                    train_time,
                    time.time() - t_epoch,
                )
                writer.write(row)
                bar.set_postfix_str(
                    f"loss {row['train/loss']:.3f}"
                    + (f" test error {row['test/error']:.2f}%" if test is not None else "")
                )
                bar.close()
                sums = step.empty_sums()
                if epoch % config.checkpoint_every_epochs == 0 or current == total_steps:
                    save(current)
                if current < total_steps:
                    bar = _progress(steps_per_epoch, 0, epoch + 1, config, progress)
                t_epoch = time.time()
            elif config.checkpoint_every_steps and current % config.checkpoint_every_steps == 0:
                save(current)
        checkpoints.wait()
    finally:
        writer.close()
        if train_iter is not None:
            train_iter.close()

    results = _results(config, writer.epochs(), teacher_eval, elapsed())
    if is_main:
        write_json_atomic(os.path.join(workdir, RESULTS_FILE), results)
    return results


def _check_finite(host_sums: dict, where: str, checkpoints: runs.Checkpoints) -> None:
    bad = {k: np.asarray(v).tolist() for k, v in host_sums.items() if not np.isfinite(v).all()}
    if bad:
        last = checkpoints.latest_step()
        kept = (
            f"the last good checkpoint (step {last}) is kept"
            if last
            else "no checkpoint was written"
        )
        raise TrainingDiverged(
            f"loss is NaN/Inf at {where} ({bad}); stopped without saving — {kept}. Lower "
            "config.optimizer.lr or the transfer-term weights and rerun."
        )


def _results(config, history, teacher_eval: Optional[dict], wall_time) -> dict[str, Any]:
    evaluated = [r for r in history if "test/error" in r]
    per_seed = np.asarray([r.get("test/error_per_seed", [r["test/error"]]) for r in evaluated])
    top5 = np.asarray(
        [r.get("test/top5_error_per_seed", [r["test/top5_error"]]) for r in evaluated]
    )
    final, best = per_seed[-1].tolist(), per_seed.min(axis=0).tolist()
    results = {
        "final_test_error": float(np.median(final)),
        "best_test_error": float(np.median(best)),
        "final_test_top5_error": float(np.median(top5[-1])),
        "best_test_top5_error": float(np.median(top5.min(axis=0))),
        "epochs": history[-1]["epoch"],
        "wall_time_s": wall_time,
        "config_hash": runs.config_hash(config),
        "model": config.model,
        "dataset": config.data.name,
        "loss_terms": sorted(k for k, v in config.loss.items() if v.get("weight", 1.0) != 0),
    }
    if len(final) > 1:
        results["final_test_error_per_seed"] = final
        results["best_test_error_per_seed"] = best
    distances = {
        k[len("test/attention/") :]: v
        for k, v in evaluated[-1].items()
        if k.startswith("test/attention/")
    }
    if distances:
        distances["mean"] = evaluated[-1]["test/attention_distance"]
        results["final_attention_distance"] = distances
    if teacher_eval is not None:
        results["teacher_test_error"] = teacher_eval["error"]
        results["teacher_test_top5_error"] = teacher_eval["top5_error"]
    return results


class _NullBar:
    def update(self, n):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


def _progress(total: int, done: int, epoch: int, config, enabled: bool):
    if not enabled:
        return _NullBar()
    return tqdm(
        total=total,
        initial=done,
        desc=f"epoch {epoch}/{config.num_epochs}",
        unit="step",
        leave=True,
        dynamic_ncols=True,
    )
