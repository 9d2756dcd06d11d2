"""The loop of one attempt at a run: :class:`Loop` takes the run's batches
(:class:`~at_jax.data.TrainBatches`) through its :class:`~at_jax.step.Step` at the
:class:`Cadence` of its config — a metrics row every ``log_every_steps`` steps and per epoch,
the test error every ``eval_every_epochs`` epochs (and after the last), a checkpoint every
``checkpoint_every_steps`` steps and every ``checkpoint_every_epochs`` epochs — and stops
cleanly: a signal or a broken image saves a checkpoint first (:mod:`at_jax.preemption`), a
NaN/Inf loss keeps the last good one (:func:`check_finite`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import serialization
from tqdm import tqdm

from at_jax import evaluate
from at_jax.checkpoints import Checkpoints
from at_jax.data.transforms import BadImageError
from at_jax.files import write_json_atomic
from at_jax.metrics import MetricsWriter, epoch_row, run_results, window_row
from at_jax.optim import ema_params
from at_jax.preemption import (
    Stopped,
    StopSignals,
    TrainingDiverged,
    signal_name,
    stopped_before_training,
)
from at_jax.rundir import RESULTS_FILE
from at_jax.step import Step

__all__ = ["Loop", "Cadence", "check_finite", "position"]


@dataclasses.dataclass(frozen=True)
class Cadence:
    """When the loop writes, evaluates and saves (the config's keys of the same names)."""

    num_epochs: int
    log_every_steps: int = 0
    eval_every_epochs: int = 1
    checkpoint_every_steps: int = 0
    checkpoint_every_epochs: int = 1

    @classmethod
    def from_config(cls, config: Any) -> Cadence:
        return cls(*(int(config[f.name]) for f in dataclasses.fields(cls)))


def position(step: int, steps_per_epoch: int) -> str:
    """``"epoch E, step S of T"`` for a global step, with the progress bar's numbering
    (epochs from 1; the last step of epoch E is "epoch E, step T of T")."""
    epoch = max(1, -(-step // steps_per_epoch))
    return f"epoch {epoch}, step {step - (epoch - 1) * steps_per_epoch} of {steps_per_epoch}"


def check_finite(host_sums: Mapping, where: str, checkpoints: Checkpoints) -> None:
    """Raise :class:`~at_jax.preemption.TrainingDiverged` if a metric sum is NaN or Inf."""
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


class _Bar:
    """The epoch's progress bar (nothing when progress is off)."""

    def __init__(self, enabled: bool, num_epochs: int, steps_per_epoch: int):
        self.enabled, self.num_epochs, self.total = enabled, num_epochs, steps_per_epoch
        self.bar: Any = None

    def start(self, epoch: int, done: int = 0) -> None:
        if self.enabled:
            self.bar = tqdm(
                total=self.total,
                initial=done,
                desc=f"epoch {epoch}/{self.num_epochs}",
                unit="step",
                leave=True,
                dynamic_ncols=True,
            )

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def postfix(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _DataWarnings:
    """Warnings, once per epoch, about what the batches met: broken images skipped (the first
    ten file names are kept for ``results.json``) and boxes outside their image."""

    def __init__(self, data: Any, batches: Any, say: Any):
        self.data, self.batches, self.say = data, batches, say
        self.skipped_files: list[str] = []
        self.reported = 0  # skipped images already warned about

    def epoch(self, epoch: int, evaluated: bool) -> None:
        report, data = self.batches.report, self.data
        new = report.skipped[self.reported :]
        if new:
            self.reported = len(report.skipped)
            room = 10 - len(self.skipped_files)
            self.skipped_files += data.image_names(new, "train")[: max(0, room)]
            self.say(
                f"warning: epoch {epoch}: replaced {len(new)} unreadable training image(s) "
                "(config.data.on_bad_image=skip): " + data.describe_skipped(new, "train")
            )
        if report.box_outside:
            self.say(
                f"warning: epoch {epoch}: {report.box_outside} bounding box(es) lay "
                "outside their image; the whole image was used for them"
            )
            report.box_outside = 0
        skipped_test = data.eval_report.skipped
        if evaluated and skipped_test:
            self.say(
                f"warning: epoch {epoch}: left {len(skipped_test)} unreadable test "
                "image(s) out of the test error (config.data.on_bad_image=skip): "
                + data.describe_skipped(skipped_test, "test")
            )


class _Saved:
    """The part of an attempt a checkpoint holds — train state, the epoch's and the window's
    metric sums, the step, the wall time so far, the skipped files — and stopping with a
    checkpoint (a signal, a broken image)."""

    def __init__(self, loop: Loop):
        self.loop, self.checkpoints = loop, loop.checkpoints
        self.state = loop.step.init_state()
        self.sums, self.window = loop.empty_sums(), loop.empty_sums()
        self.current = self.saved = 0
        self.earlier_time = 0.0

    def tree(self) -> dict:
        state = serialization.to_state_dict(self.state)
        return {"train_state": state, "sums": self.sums, "window": self.window}

    def restore(self, batches: Any) -> None:
        loop = self.loop
        restored = self.checkpoints.restore_latest(self.tree(), batches)
        if restored is None:
            return
        start, tree, meta = restored
        if start > loop.total_steps:
            raise ValueError(
                f"{loop.workdir!r} has a checkpoint at step {start} (epoch "
                f"{start / loop.steps_per_epoch:g}), beyond config.num_epochs="
                f"{loop.cadence.num_epochs}; use a new --workdir"
            )
        saved_state = dict(tree["train_state"])
        saved_state.setdefault("term_state", {})  # a checkpoint from before terms kept state
        self.state = serialization.from_state_dict(self.state, saved_state)
        self.sums, self.window = tree["sums"], tree["window"]
        self.earlier_time = float(meta.get("wall_time_s", 0.0))
        loop.warnings.skipped_files = list(meta.get("skipped_files", []))
        self.current = self.saved = start
        batches.start_at(start)
        logging.info("resumed from step %d", start)
        if loop.progress:
            where = position(start, loop.steps_per_epoch)
            print(f"resuming {loop.workdir} from step {start} ({where})", flush=True)

    def save(self, at_step: int) -> None:
        check_finite(jax.device_get(self.sums), f"step {at_step}", self.checkpoints)
        meta = {
            "wall_time_s": self.loop.elapsed(),
            "skipped_files": self.loop.warnings.skipped_files[:10],
        }
        self.checkpoints.save(at_step, self.tree(), meta, self.loop.batches)
        self.saved = at_step

    def save_now(self) -> str:
        """A checkpoint at the current step (if it has none yet), written to disk; says where
        the run will resume."""
        if self.current > self.saved:
            self.save(self.current)
        self.checkpoints.wait()
        return f"step {self.current} ({position(self.current, self.loop.steps_per_epoch)})"

    def stop_if_asked(self, stop: StopSignals) -> None:
        signum = stop.requested(self.current)
        if signum is None:
            return
        self.loop.bar.close()
        if self.current == 0:  # no step taken: the run starts afresh anyway
            raise stopped_before_training(signum)
        at = self.save_now()
        raise Stopped(
            signum,
            f"stopped by {signal_name(signum)} at {at}; "
            "checkpoint saved; run the same command to resume",
        )

    def bad_image(self, error: BadImageError) -> ValueError:
        self.loop.bar.close()
        at = self.save_now()
        return ValueError(
            f"{error}. Set config.data.on_bad_image=skip to replace unreadable images (or fix or "
            f"remove the file; python -m at_jax.data.verify --data_dir "
            f"{self.loop.data_dir or 'DIR'} lists every one); the run stopped at {at} "
            "with a checkpoint and resumes from there"
        )


class Loop:
    """The steps of one attempt at a run in ``workdir``: batches in, steps, metrics rows,
    evaluations and checkpoints, and stopping cleanly (signals, broken images).

    Keyword arguments: ``data`` (:class:`~at_jax.data.RunData`), ``step``, ``cadence``,
    ``checkpoints``, ``stop`` (:class:`~at_jax.preemption.StopSignals`), the teacher's
    ``teacher_variables`` and measured ``teacher_eval``, ``facts`` (what identifies the run,
    for :func:`at_jax.metrics.run_results`), ``data_dir`` (named in the broken-image advice),
    ``progress`` and ``start_time`` (this attempt's, data loading and teacher included)."""

    def __init__(
        self,
        *,
        workdir: str,
        data: Any,
        step: Step,
        cadence: Cadence,
        checkpoints: Checkpoints,
        stop: StopSignals,
        facts: Mapping[str, Any],
        teacher_variables: Any = None,
        teacher_eval: Optional[dict] = None,
        data_dir: str = "",
        progress: bool = True,
        start_time: Optional[float] = None,
    ):
        self.workdir, self.data, self.step, self.cadence = workdir, data, step, cadence
        self.checkpoints, self.stop, self.facts = checkpoints, stop, facts
        self.teacher_variables, self.teacher_eval = teacher_variables, teacher_eval
        self.data_dir, self.progress = data_dir, progress
        self.is_main = jax.process_index() == 0
        self.steps_per_epoch = data.steps_per_epoch
        self.total_steps = cadence.num_epochs * self.steps_per_epoch
        self.session_start = time.time() if start_time is None else start_time
        self.batches = data.train_batches()
        self.warnings = _DataWarnings(data, self.batches, self.say)
        self.bar = _Bar(progress, cadence.num_epochs, self.steps_per_epoch)
        self.at = _Saved(self)

    def empty_sums(self) -> dict:
        return self.step.empty_sums(self.data.counts_skipped)

    def elapsed(self) -> float:
        return self.at.earlier_time + time.time() - self.session_start

    def say(self, message: str) -> None:
        if self.is_main:
            (tqdm.write if self.progress else print)(message)

    def run(self) -> dict[str, Any]:
        """Train to the end (or to a signal), then write and return the results."""
        at = self.at
        at.restore(self.batches)
        self.writer = MetricsWriter(self.workdir, at.current, enabled=self.is_main)
        self.eval_fn = evaluate.student_eval_fn(self.step)
        self.accumulate = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=0)
        epoch, done = divmod(at.current, self.steps_per_epoch)
        self.bar.start(epoch + 1, done)
        try:
            self.t_epoch = self.t_window = time.time()
            while at.current < self.total_steps:
                at.stop_if_asked(self.stop)
                try:
                    batch = next(self.batches)
                except BadImageError as e:
                    raise at.bad_image(e) from None
                self.train_one(batch)
            self.checkpoints.wait()
        finally:
            self.bar.close()
            self.writer.close()
            self.batches.close()
        history, skipped = self.writer.epochs(), self.warnings.skipped_files
        out = run_results(history, self.facts, self.teacher_eval, self.elapsed(), skipped)
        if self.is_main:
            write_json_atomic(os.path.join(self.workdir, RESULTS_FILE), out)
        return out

    def train_one(self, batch: dict) -> None:
        cadence, step, at = self.cadence, self.step, self.at
        at.state, metrics = step.train_step(at.state, batch, self.teacher_variables)
        at.sums = self.accumulate(at.sums, metrics)
        if cadence.log_every_steps:
            at.window = self.accumulate(at.window, metrics)
        at.current += 1
        current = at.current
        self.bar.update()
        if cadence.log_every_steps and current % cadence.log_every_steps == 0:
            host = jax.device_get(at.window)
            check_finite(host, f"step {current}", self.checkpoints)
            lr = float(step.schedule(current - 1))
            seconds = time.time() - self.t_window
            self.writer.write(window_row(host, current, self.steps_per_epoch, lr, seconds))
            at.window, self.t_window = self.empty_sums(), time.time()
        if current % self.steps_per_epoch == 0:
            self.end_epoch(current // self.steps_per_epoch)
        elif cadence.checkpoint_every_steps and current % cadence.checkpoint_every_steps == 0:
            at.save(current)

    def test(self) -> dict:
        """The test errors (and attention distances) of every seed now; with an EMA of the
        weights (``config.optimizer.ema_decay``) its errors too (``ema_error``,
        ``ema_top5_error``)."""
        state = self.at.state
        runs = {"": evaluate.student_variables(state)}
        ema = ema_params(state.opt_state)
        if ema is not None:
            runs["ema_"] = {**runs[""], "params": ema["student"]}
        out: dict = {}
        try:
            for prefix, variables in runs.items():
                result = evaluate.evaluate(
                    self.eval_fn, variables, self.data.eval_batches(), self.teacher_variables
                )
                if prefix:
                    result = {k: v for k, v in result.items() if "error" in k}
                out.update({prefix + k: v for k, v in result.items()})
        except BadImageError as e:
            raise self.at.bad_image(e) from None
        return out

    def end_epoch(self, epoch: int) -> None:
        cadence, at = self.cadence, self.at
        host = jax.device_get(at.sums)
        check_finite(host, f"epoch {epoch}", self.checkpoints)
        train_time = time.time() - self.t_epoch
        due = epoch % cadence.eval_every_epochs == 0 or epoch == cadence.num_epochs
        test = self.test() if due else None
        lr = float(self.step.schedule((epoch - 1) * self.steps_per_epoch))
        row = epoch_row(host, test, epoch, at.current, lr, train_time, time.time() - self.t_epoch)
        self.writer.write(row)
        self.bar.postfix(
            f"loss {row['train/loss']:.3f}"
            + (f" test error {row['test/error']:.2f}%" if test is not None else "")
        )
        self.bar.close()
        self.warnings.epoch(epoch, test is not None)
        at.sums = self.empty_sums()
        if epoch % cadence.checkpoint_every_epochs == 0 or at.current == self.total_steps:
            at.save(at.current)
        if at.current < self.total_steps:
            self.bar.start(epoch + 1)
        self.t_epoch = time.time()
