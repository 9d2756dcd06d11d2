"""``train_and_evaluate(config, workdir)``: a whole, resumable teacher or student run.

The config is checked once (:func:`at_jax.recipes.validate_config`), then the run is set up in
named steps — its data (:func:`at_jax.data.open_data`), its teacher (:func:`run_teacher`), where
it starts from (:func:`starting_point`), its train step (:class:`at_jax.step.Step`) — and handed
to the loop (:class:`at_jax.loop.Loop`). Restarting the same command resumes from the newest
checkpoint at the exact next batch, with the interrupted epoch's metric sums, so the run ends
with the same numbers as an uninterrupted one.

Stopping: SIGTERM (preemption) or SIGINT finishes the step in flight, saves a checkpoint and
raises :class:`~at_jax.preemption.Stopped` (the CLI exits with 128 + the signal number); a
second signal exits at once. An image that cannot be decoded stops the run the same way, with
the file named (``config.data.on_bad_image="skip"`` replaces such images instead, and counts
them).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any, Optional

import jax
import ml_collections
from absl import logging

from at_jax import evaluate, finetune, rundir, stages as stages_lib, teacher as teacher_lib
from at_jax.checkpoints import Checkpoints, load_variables, restore_seeds
from at_jax.data import RunData, open_data
from at_jax.files import write_json_atomic
from at_jax.loop import Cadence, Loop, position
from at_jax.preemption import (
    Stopped,
    StopSignals,
    TrainingDiverged,
    exit_when_stopped,
    signal_name,
    stopped_before_training,
)
from at_jax.recipes import validate_config, validate_with_data
from at_jax.sharding import data_mesh, replicated
from at_jax.step import StageStart, Step
from at_jax.terms import TermData, state_factory

__all__ = [
    "train_and_evaluate",
    "run_teacher",
    "starting_point",
    "validate_config",
    "Stopped",
    "exit_when_stopped",
    "TrainingDiverged",
    "position",
]


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, progress: bool = True
) -> dict[str, Any]:
    """Train (or resume) the run described by ``config`` in ``workdir``; returns the results.

    A finished run with the same config returns its saved results without training again.
    SIGTERM or SIGINT stops the run at the next step boundary with a checkpoint
    (:class:`~at_jax.preemption.Stopped`); an image that cannot be decoded stops it with a
    checkpoint too, unless ``config.data.on_bad_image="skip"``.

    A term with a first stage of its own (``config.loss.<ab|fsp|ft>.init_epochs``) trains it
    first as a run in ``WORKDIR/init_stage`` (:mod:`at_jax.stages`); a restarted run resumes in
    the stage it was in."""
    config = ml_collections.ConfigDict(config)
    terms = validate_config(config)
    two = stages_lib.plan(config, terms)
    with StopSignals() as stop:
        if two is None:
            results = _train(config, terms, workdir, progress, stop)
        else:
            results = _train_two_stages(config, two, workdir, progress, stop)
    if stop.signum is not None:  # it came after the last step: the run is done, but a caller
        # running several (the demo, the table runner) must stop too, not start the next one
        raise Stopped(
            stop.signum,
            f"stopped by {signal_name(stop.signum)} as the run finished; its results are "
            f"saved in {os.path.join(workdir, rundir.RESULTS_FILE)}",
        )
    return results


# Terms that read only a ViT teacher's attention: with them (or attention copy) alone, the
# teacher may classify other classes (a head-less MAE checkpoint, an ImageNet teacher).
ATTENTION_ONLY_TERMS = frozenset({"ce", "atd"})


def run_teacher(
    teacher: ml_collections.ConfigDict,
    data: RunData,
    mesh: Any,
    say: Callable[[str], None],
    attention_only: bool = False,
) -> tuple[Any, Any, Optional[dict]]:
    """The run's teacher (``config.teacher``: ``workdir``, ``seed_index``) on ``mesh``:
    ``(model, variables, test errors)``, measured on ``data``'s test set; ``(None, {}, None)``
    without one. ``attention_only``: the run uses only the teacher's attention (attention
    copy, the ``atd`` term), so a teacher of other classes is taken (its errors not measured)."""
    if not teacher.workdir:
        return None, {}, None
    spec = data.spec
    model, variables, teacher_cfg = teacher_lib.load_run_variables(
        teacher.workdir,
        None if attention_only else spec.class_count(),
        spec.image_shape,
        teacher.get("seed_index", 0),
    )
    # host copies first: a global (multi-process) array is built from the same values on every
    # process
    variables = jax.device_put(jax.device_get(variables), replicated(mesh))
    if model.num_classes != spec.class_count():
        say(
            f"teacher {teacher_cfg.model} ({teacher.workdir}): {model.num_classes} classes, "
            f"this run has {spec.class_count()}: an attention teacher, its test error is not "
            "measured"
        )
        return model, variables, None
    eval_fn = evaluate.make_eval_fn(model, spec.mean, spec.std)
    measured = evaluate.evaluate(eval_fn, variables, data.eval_batches())
    errors = {k: float(v) for k, v in measured.items()}
    say(
        f"teacher {teacher_cfg.model} ({teacher.workdir}): test error "
        f"{errors['error']:.2f}% (top-5 {errors['top5_error']:.2f}%)"
    )
    return model, variables, errors


def _train_two_stages(
    config: ml_collections.ConfigDict,
    two: stages_lib.TwoStages,
    workdir: str,
    progress: bool,
    stop: StopSignals,
) -> dict[str, Any]:
    """The first stage in ``WORKDIR/init_stage``, then the main stage from it."""
    finished = rundir.finished_results(workdir, config)
    if finished is not None:  # (check_same_run first: another run's workdir must not pass)
        return _train(config, two.main_terms, workdir, progress, stop)
    say = _printer(progress and jax.process_index() == 0)
    first_dir = two.init_workdir(workdir)
    rundir.check_same_run(workdir, config)
    say(stages_lib.describe(two) + f", in {first_dir}")
    first = _train(two.init_config, two.init_terms, first_dir, progress, stop)
    if stop.signum is not None:
        raise Stopped(
            stop.signum,
            f"stopped by {signal_name(stop.signum)} as the first stage finished; run the same "
            "command again for the main stage",
        )
    variables, term_params, n_seeds = restore_seeds(
        first_dir, (two.term,) if two.stage.keeps else ()
    )
    keeps = two.stage.keeps
    kept = {two.term: {k: term_params[two.term][k] for k in keeps}} if keeps else {}
    start = StageStart(variables, kept, n_seeds, first_dir)
    start.facts = {
        "term": two.term,
        "workdir": first_dir,
        "epochs": int(two.init_config.num_epochs),
        "final_test_error": first["final_test_error"],
    }
    frozen = f"; frozen: {two.term}'s {', '.join(keeps)}" if kept else ""
    say(
        f"main stage: every seed starts from its first stage ({first_dir}: test error "
        f"{first['final_test_error']:.2f}%){frozen}"
    )
    return _train(config, two.main_terms, workdir, progress, stop, start=start)


def starting_point(config: ml_collections.ConfigDict) -> Optional[dict]:
    """The variables that start every seed (``config.init_from``'s run), or None (fresh)."""
    return load_variables(config.init_from) if config.init_from else None


def _describe_start(config: ml_collections.ConfigDict, step: Step, say: Callable) -> None:
    if step.init_variables is not None:
        replaced = finetune.describe(step.replaced, step.variable_shapes, step.init_variables)
        new = f" (new classifier: {replaced})" if replaced else ""
        say(f"starting from {config.init_from}{new}")
    if step.frozen:
        trained, frozen = finetune.trainable_count(step.frozen, step.variable_shapes["params"])
        modules = ", ".join(finetune.module_names(config.freeze.modules)) or "no module"
        if config.freeze.get("student", False):
            modules = "the whole student"
        elif config.freeze.get("classifier", False):
            modules = "the classifier" + ("" if modules == "no module" else f", {modules}")
        bn = " + batch norm" if config.freeze.batch_norm else ""
        say(f"frozen: {frozen:,} parameters ({modules}{bn}); trained: {trained:,}")


def _open(config: ml_collections.ConfigDict, mesh: Any, is_main: bool) -> RunData:
    data = open_data(config, mesh)
    validate_with_data(config, data.n_train, mesh.size)
    if is_main:
        for warning in data.warnings:
            print(f"warning: {warning}", flush=True)
    logging.info(
        "data: %s, %d train / %d test, %s",
        config.data.name,
        data.n_train,
        data.n_test,
        data.description,
    )
    return data


def _train(
    config: ml_collections.ConfigDict,
    terms: Any,
    workdir: str,
    progress: bool,
    stop: StopSignals,
    start: Optional[StageStart] = None,
) -> dict[str, Any]:
    start_time = time.time()
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    say = _printer(progress and is_main)
    rundir.check_same_run(workdir, config)
    finished = rundir.finished_results(workdir, config)
    if finished is not None:
        say(f"{workdir}: finished earlier ({finished['epochs']} epochs), results reused")
        return finished

    def stop_early() -> None:  # a signal while loading, evaluating the teacher or compiling
        if stop.signum is not None:
            raise stopped_before_training(stop.signum)

    mesh = data_mesh()
    data = _open(config, mesh, is_main)
    stop_early()
    attention_only = set(terms) <= ATTENTION_ONLY_TERMS and (
        "atd" in terms or bool(config.get("attention_copy", {}).get("target"))
    )
    teacher_model, teacher_variables, teacher_eval = run_teacher(
        config.teacher, data, mesh, say, attention_only
    )
    stop_early()
    step = Step.from_config(
        config,
        data.spec,
        data.steps_per_epoch,
        terms=terms,
        teacher_model=teacher_model,
        teacher_variables=teacher_variables,
        init_variables=None if start is not None else starting_point(config),
        mesh=mesh,
        term_data=_term_data(terms, data),
        start=start,
    )
    _describe_start(config, step, say)
    if is_main:
        write_json_atomic(os.path.join(workdir, rundir.CONFIG_FILE), json.loads(config.to_json()))
        teacher_lib.write_data_info(workdir, data.spec)
    facts = {
        "config_hash": rundir.config_hash(config),
        "model": config.model,
        "dataset": config.data.name,
        "loss_terms": sorted(terms),
    }
    if step.networks.copy.on:
        facts["attention_copy"] = step.networks.copy.target
    if start is not None:
        facts["first_stage"] = start.facts
    checkpoints = Checkpoints(workdir, config.keep_checkpoints)
    try:
        return Loop(
            workdir=workdir,
            data=data,
            step=step,
            cadence=Cadence.from_config(config),
            checkpoints=checkpoints,
            stop=stop,
            facts=facts,
            teacher_variables=teacher_variables,
            teacher_eval=teacher_eval,
            data_dir=config.data.data_dir,
            progress=progress and is_main,
            start_time=start_time,
        ).run()
    finally:
        checkpoints.close()


def _term_data(terms: Any, data: RunData) -> TermData:
    """The training set's size, and its labels where a term keeps a memory of it (CRD)."""
    if not any(state_factory(name) is not None for name in terms):
        return TermData(data.n_train)
    return TermData(data.n_train, data.train_labels())


def _printer(enabled: bool) -> Callable[[str], None]:
    """``print`` with a flush, or nothing."""
    if not enabled:
        return lambda message: None
    return lambda message: print(message, flush=True)
