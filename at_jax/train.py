"""``train_and_evaluate(config, workdir)``: the loop of a whole, resumable teacher or student run.

Batches in (:func:`at_jax.data.open_data`, in memory or streamed), steps
(:mod:`at_jax.step`), and the cadence: a metrics row every ``config.log_every_steps`` steps and
per epoch, the test error every ``config.eval_every_epochs`` epochs (and after the last), a
checkpoint every ``config.checkpoint_every_steps`` steps and every ``checkpoint_every_epochs``
epochs (:mod:`at_jax.runs`). Restarting the same command resumes from the newest checkpoint at
the exact next batch, with the interrupted epoch's metric sums, so the run ends with the same
numbers as an uninterrupted one.

Stopping: SIGTERM (preemption) or SIGINT finishes the step in flight, saves a checkpoint and
raises :class:`Stopped` (the CLI exits with 128 + the signal number); a second signal exits at
once. An image that cannot be decoded stops the run the same way, with the file named
(``config.data.on_bad_image="skip"`` replaces such images instead, and counts them). Every
config value is checked first (:func:`validate_config`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
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

from at_jax import evaluate, finetune, objective, runs, step as step_lib
from at_jax.data import DATASETS, STREAMED, open_data
from at_jax.data.transforms import ON_BAD_IMAGE, BadImageError
from at_jax.metrics import RESULTS_FILE, MetricsWriter, epoch_row, window_row, write_json_atomic
from at_jax.preemption import StopSignals, signal_name
from at_jax.seeds import SEED_STRATEGIES
from at_jax.sharding import data_mesh, replicated

__all__ = [
    "train_and_evaluate",
    "validate_config",
    "Stopped",
    "exit_when_stopped",
    "TrainingDiverged",
    "position",
]


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Stopped(Exception):
    """The run stopped on SIGTERM or SIGINT after saving a checkpoint (see
    :mod:`at_jax.preemption`); rerunning the same command resumes it. ``exit_code`` is
    128 + the signal number, what a process killed by it would return."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


@contextlib.contextmanager
def exit_when_stopped(note: str = "") -> Iterator[None]:
    """For command-line programs: a :class:`Stopped` run ends the process with its one line
    (and ``note``) on stderr and its exit code, 128 + the signal, without a traceback."""
    try:
        yield
    except Stopped as e:
        print(f"{e}{note}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)


def _stopped_before_training(signum: int) -> Stopped:
    return Stopped(
        signum,
        f"stopped by {signal_name(signum)} before training started; nothing new to save; "
        "run the same command to continue",
    )


def position(step: int, steps_per_epoch: int) -> str:
    """``"epoch E, step S of T"`` for a global step, with the progress bar's numbering
    (epochs from 1; the last step of epoch E is "epoch E, step T of T")."""
    epoch = max(1, -(-step // steps_per_epoch))
    return f"epoch {epoch}, step {step - (epoch - 1) * steps_per_epoch} of {steps_per_epoch}"


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Check every value of ``config`` that can be checked without the data, before anything is
    built; raises ``ValueError`` naming the key, what it got and what it takes."""
    problems = []

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            value = config
            for part in key.split("."):
                value = value.get(part) if hasattr(value, "get") else None
            problems.append(f"config.{key} must be {what}, got {value!r}")

    for key in (
        "batch_size",
        "num_epochs",
        "eval_batch_size",
        "num_seeds",
        "keep_checkpoints",
        "eval_every_epochs",
        "checkpoint_every_epochs",
    ):
        need(_positive_int(config.get(key)), key, "an integer >= 1")
    for key in ("log_every_steps", "checkpoint_every_steps"):
        value = config.get(key)
        need(isinstance(value, int) and value >= 0, key, "an integer >= 0 (0 = off)")
    need(isinstance(config.get("seed"), int), "seed", "an integer")
    need(
        config.get("seed_strategy") in SEED_STRATEGIES, "seed_strategy", f"one of {SEED_STRATEGIES}"
    )
    need(config.get("dtype") in step_lib.DTYPES, "dtype", f"one of {sorted(step_lib.DTYPES)}")
    data = config.data
    known = (*DATASETS, *STREAMED)
    need(data.get("name") in known, "data.name", f"one of {', '.join(known)}")
    need(data.get("source") in ("auto", "local", "tfds"), "data.source", "auto, local or tfds")
    for key in ("train_size", "test_size", "num_workers"):
        value = data.get(key)
        need(isinstance(value, int) and value >= 0, f"data.{key}", "an integer >= 0")
    for key in ("read_threads", "prefetch"):
        need(_positive_int(data.get(key)), f"data.{key}", "an integer >= 1")
    image_size = data.get("image_size")
    need(isinstance(image_size, int) and image_size >= 8, "data.image_size", "an integer >= 8")
    need(
        data.get("on_bad_image", "error") in ON_BAD_IMAGE,
        "data.on_bad_image",
        f"one of {ON_BAD_IMAGE}",
    )
    crop_pad = data.augment.get("crop_pad")
    need(isinstance(crop_pad, int) and crop_pad >= 0, "data.augment.crop_pad", "an integer >= 0")
    opt = config.optimizer
    need(opt.get("name") == "sgd", "optimizer.name", "'sgd'")
    need(isinstance(opt.get("lr"), (int, float)) and opt.lr > 0, "optimizer.lr", "a number > 0")
    momentum = opt.get("momentum")
    need(
        isinstance(momentum, (int, float)) and 0 <= momentum < 1,
        "optimizer.momentum",
        "a number in [0, 1)",
    )
    decay = opt.get("weight_decay")
    need(isinstance(decay, (int, float)) and decay >= 0, "optimizer.weight_decay", "a number >= 0")
    factor = opt.get("lr_decay_factor")
    need(
        isinstance(factor, (int, float)) and factor > 0, "optimizer.lr_decay_factor", "a number > 0"
    )
    need(
        all(isinstance(e, int) and e >= 0 for e in opt.get("lr_decay_epochs", ())),
        "optimizer.lr_decay_epochs",
        "integers >= 0",
    )
    reference = opt.get("lr_batch_size", 0)
    need(
        isinstance(reference, int) and reference >= 0,
        "optimizer.lr_batch_size",
        "an integer >= 0 (0 = lr as given)",
    )
    need(
        config.get("gradient", {}).get("bn_mode", "batch_stats") in step_lib.BN_MODES,
        "gradient.bn_mode",
        f"one of {step_lib.BN_MODES}",
    )
    seed_index = config.teacher.get("seed_index", 0)
    need(isinstance(seed_index, int) and seed_index >= 0, "teacher.seed_index", "an integer >= 0")
    if problems:
        raise ValueError("; ".join(problems))
    objective.validate_terms(dict(config.loss))


def _validate_with_data(config: ml_collections.ConfigDict, data: Any, n_devices: int) -> None:
    if config.batch_size > data.n_train:
        raise ValueError(
            f"config.batch_size={config.batch_size} must be between 1 and the "
            f"number of training examples ({data.n_train})"
        )
    if config.batch_size % n_devices:
        raise ValueError(
            f"config.batch_size={config.batch_size} is not divisible by the "
            f"{n_devices} devices of the mesh; use a multiple of {n_devices}"
        )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, progress: bool = True
) -> dict[str, Any]:
    """Train (or resume) the run described by ``config`` in ``workdir``; returns the results.

    A finished run with the same config returns its saved results without training again.
    SIGTERM or SIGINT stops the run at the next step boundary with a checkpoint
    (:class:`Stopped`); an image that cannot be decoded stops it with a checkpoint too, unless
    ``config.data.on_bad_image="skip"``."""
    config = ml_collections.ConfigDict(config)
    validate_config(config)
    with StopSignals() as stop:
        results = _train(config, workdir, progress, stop)
    if stop.signum is not None:  # it came after the last step: the run is done, but a caller
        # running several (the demo, the table runner) must stop too, not start the next one
        raise Stopped(
            stop.signum,
            f"stopped by {signal_name(stop.signum)} as the run finished; its results are "
            f"saved in {os.path.join(workdir, RESULTS_FILE)}",
        )
    return results


def _train(
    config: ml_collections.ConfigDict, workdir: str, progress: bool, stop: StopSignals
) -> dict[str, Any]:
    start_time = time.time()
    os.makedirs(workdir, exist_ok=True)
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

    def stop_early() -> None:  # a signal while loading, evaluating the teacher or compiling
        if stop.signum is not None:
            raise _stopped_before_training(stop.signum)

    mesh = data_mesh()
    data = open_data(config, mesh)
    _validate_with_data(config, data, mesh.size)
    if is_main:
        for warning in getattr(data, "source_warnings", []):
            print(f"warning: {warning}", flush=True)
    logging.info(
        "data: %s, %d train / %d test, %s",
        config.data.name,
        data.n_train,
        data.n_test,
        data.description,
    )
    stop_early()

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
        stop_early()

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
        return _Loop(
            config,
            workdir,
            data,
            step,
            teacher_variables,
            teacher_eval,
            checkpoints,
            progress and is_main,
            start_time,
            stop,
        ).run()
    finally:
        checkpoints.close()


class _Loop:
    """The steps of one attempt at a run: batches in, steps, the cadence of metrics rows,
    evaluations and checkpoints, and stopping cleanly (signals, broken images)."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str,
        data: Any,
        step: step_lib.Step,
        teacher_variables: Any,
        teacher_eval: Optional[dict],
        checkpoints: runs.Checkpoints,
        progress: bool,
        start_time: float,
        stop: StopSignals,
    ):
        self.config, self.workdir, self.data, self.step = config, workdir, data, step
        self.teacher_variables, self.teacher_eval = teacher_variables, teacher_eval
        self.checkpoints, self.progress, self.stop = checkpoints, progress, stop
        self.is_main = jax.process_index() == 0
        self.steps_per_epoch = data.steps_per_epoch
        self.total_steps = int(config.num_epochs) * self.steps_per_epoch
        self.session_start = start_time  # this attempt, data loading and teacher included
        self.state, self.sums, self.window = step.init_state(), step.empty_sums(), step.empty_sums()
        self.train_iter = data.train_iterator() if data.streamed else None
        self.earlier_time = 0.0
        self.current = self.saved_step = 0
        self.skipped_files: list[str] = []  # names of the broken images skipped (first 10)
        self.reported = 0  # skipped images already warned about

    def elapsed(self) -> float:
        return self.earlier_time + time.time() - self.session_start

    def say(self, message: str) -> None:
        if self.is_main:
            (tqdm.write if self.progress else print)(message)

    def restore(self) -> None:
        target = {
            "train_state": serialization.to_state_dict(self.state),
            "sums": self.sums,
            "window": self.window,
        }
        restored = self.checkpoints.restore_latest(target, self.train_iter)
        if restored is None:
            return
        start, tree, meta = restored
        if start > self.total_steps:
            raise ValueError(
                f"{self.workdir!r} has a checkpoint at step {start} (epoch "
                f"{start / self.steps_per_epoch:g}), beyond config.num_epochs="
                f"{self.config.num_epochs}; use a new --workdir"
            )
        self.state = serialization.from_state_dict(self.state, tree["train_state"])
        self.sums, self.window = tree["sums"], tree["window"]
        self.earlier_time = float(meta.get("wall_time_s", 0.0))
        self.skipped_files = list(meta.get("skipped_files", []))
        self.current = self.saved_step = start
        logging.info("resumed from step %d", start)
        if self.progress:
            print(
                f"resuming {self.workdir} from step {start} "
                f"({position(start, self.steps_per_epoch)})",
                flush=True,
            )

    def save(self, at_step: int) -> None:
        _check_finite(jax.device_get(self.sums), f"step {at_step}", self.checkpoints)
        self.checkpoints.save(
            at_step,
            {
                "train_state": serialization.to_state_dict(self.state),
                "sums": self.sums,
                "window": self.window,
            },
            {"wall_time_s": self.elapsed(), "skipped_files": self.skipped_files[:10]},
            self.train_iter,
        )
        self.saved_step = at_step

    def save_now(self) -> str:
        """A checkpoint at the current step (if it has none yet), written to disk; says where
        the run will resume."""
        if self.current > self.saved_step:
            self.save(self.current)
        self.checkpoints.wait()
        return f"step {self.current} ({position(self.current, self.steps_per_epoch)})"

    def run(self) -> dict[str, Any]:
        self.restore()
        batches: Iterator[dict] = (
            self.train_iter
            if self.train_iter is not None
            else self.data.train_batches(self.current)
        )
        self.writer = MetricsWriter(self.workdir, self.current, enabled=self.is_main)
        self.eval_fn = evaluate.make_eval_fn(
            self.step.model,
            self.data.mean,
            self.data.std,
            self.step.dtype,
            seeds=self.step.num_seeds,
            teacher_model=self.step.teacher_model,
            pairs=self.step.attention_pairs(),
            seed_strategy=self.step.seed_strategy(),
        )
        self.accumulate = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=0)
        epoch = self.current // self.steps_per_epoch + 1
        self.bar = _progress(
            self.steps_per_epoch,
            self.current % self.steps_per_epoch,
            epoch,
            self.config,
            self.progress,
        )
        try:
            self.t_epoch = self.t_window = time.time()
            while self.current < self.total_steps:
                signum = self.stop.requested(self.current)
                if signum is not None:
                    self.bar.close()
                    if self.current == 0:  # no step taken: the run starts afresh anyway
                        raise _stopped_before_training(signum)
                    at = self.save_now()
                    raise Stopped(
                        signum,
                        f"stopped by {signal_name(signum)} at {at}; "
                        "checkpoint saved; run the same command to resume",
                    )
                try:
                    batch = next(batches)
                except BadImageError as e:
                    self.bar.close()
                    raise self.bad_image(e) from None
                self.train_one(batch)
            self.checkpoints.wait()
        finally:
            self.bar.close()
            self.writer.close()
            if self.train_iter is not None:
                self.train_iter.close()
        results = _results(
            self.config, self.writer.epochs(), self.teacher_eval, self.elapsed(), self.skipped_files
        )
        if self.is_main:
            write_json_atomic(os.path.join(self.workdir, RESULTS_FILE), results)
        return results

    def bad_image(self, error: BadImageError) -> ValueError:
        at = self.save_now()
        return ValueError(
            f"{error}. Set config.data.on_bad_image=skip to replace unreadable images (or fix or "
            f"remove the file; python -m at_jax.data.verify --data_dir "
            f"{self.config.data.data_dir or 'DIR'} lists every one); the run stopped at {at} "
            "with a checkpoint and resumes from there"
        )

    def train_one(self, batch: dict) -> None:
        config, step = self.config, self.step
        self.state, metrics = step.train_step(self.state, batch, self.teacher_variables)
        self.sums = self.accumulate(self.sums, metrics)
        if config.log_every_steps:
            self.window = self.accumulate(self.window, metrics)
        self.current += 1
        current = self.current
        self.bar.update(1)
        if config.log_every_steps and current % config.log_every_steps == 0:
            host = jax.device_get(self.window)
            _check_finite(host, f"step {current}", self.checkpoints)
            self.writer.write(
                window_row(
                    host,
                    current,
                    self.steps_per_epoch,
                    float(step.schedule(current - 1)),
                    time.time() - self.t_window,
                )
            )
            self.window, self.t_window = step.empty_sums(), time.time()
        if current % self.steps_per_epoch == 0:
            self.end_epoch(current // self.steps_per_epoch)
        elif config.checkpoint_every_steps and current % config.checkpoint_every_steps == 0:
            self.save(current)

    def end_epoch(self, epoch: int) -> None:
        config, step, current = self.config, self.step, self.current
        host = jax.device_get(self.sums)
        _check_finite(host, f"epoch {epoch}", self.checkpoints)
        train_time = time.time() - self.t_epoch
        test = None
        if epoch % config.eval_every_epochs == 0 or epoch == config.num_epochs:
            try:
                test = evaluate.evaluate(
                    self.eval_fn,
                    evaluate.student_variables(self.state),
                    self.data.eval_batches(),
                    self.teacher_variables,
                )
            except BadImageError as e:
                self.bar.close()
                raise self.bad_image(e) from None
        row = epoch_row(
            host,
            test,
            epoch,
            current,
            float(step.schedule((epoch - 1) * self.steps_per_epoch)),
            train_time,
            time.time() - self.t_epoch,
        )
        self.writer.write(row)
        self.bar.set_postfix_str(
            f"loss {row['train/loss']:.3f}"
            + (f" test error {row['test/error']:.2f}%" if test is not None else "")
        )
        self.bar.close()
        self.report_data(epoch, test is not None)
        self.sums = step.empty_sums()
        if epoch % config.checkpoint_every_epochs == 0 or current == self.total_steps:
            self.save(current)
        if current < self.total_steps:
            self.bar = _progress(self.steps_per_epoch, 0, epoch + 1, config, self.progress)
        self.t_epoch = time.time()

    def report_data(self, epoch: int, evaluated: bool) -> None:
        """Warnings about the epoch's broken images (skipped) and boxes outside their image."""
        if self.train_iter is None:
            return
        report = self.train_iter.report
        new = report.skipped[self.reported :]
        if new:
            self.reported = len(report.skipped)
            self.skipped_files += [self.data.train_source[i]["image"] for i in new][
                : 10 - len(self.skipped_files)
            ]
            self.say(
                f"warning: epoch {epoch}: replaced {len(new)} unreadable training image(s) "
                "(config.data.on_bad_image=skip): "
                + self.data.describe_skipped(new, self.data.train_source)
            )
        if report.box_outside:
            self.say(
                f"warning: epoch {epoch}: {report.box_outside} bounding box(es) lay "
                "outside their image; the whole image was used for them"
            )
            report.box_outside = 0
        test_report = self.data.eval_report
        if evaluated and test_report.skipped:
            self.say(
                f"warning: epoch {epoch}: left {len(test_report.skipped)} unreadable test "
                "image(s) out of the test error (config.data.on_bad_image=skip): "
                + self.data.describe_skipped(test_report.skipped, self.data.test_source)
            )


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


def _results(
    config,
    history,
    teacher_eval: Optional[dict],
    wall_time,
    skipped_files: Optional[list[str]] = None,
) -> dict[str, Any]:
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
    skipped = sum(r.get("train/skipped_images", 0.0) for r in history)
    if "train/skipped_images" in history[-1]:
        results["skipped_images"] = int(skipped)
        results["skipped_files"] = list(skipped_files or [])[:10]
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
