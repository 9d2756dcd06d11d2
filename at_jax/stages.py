"""Runs in two stages: the terms that train something of their own before the student's main
training (RepDistiller's ``init_epochs``: AB, FSP, FT).

A config says the first stage with the term's ``init_epochs`` (and ``init_lr``)::

    config.loss.ab = {"weight": 1.0, "init_epochs": 30}

:func:`plan` turns such a config into two runs. The first stage is an at_jax run of its own in
``WORKDIR/init_stage`` (its config derived from the run's: ``num_epochs`` = ``init_epochs``; the
loss the term alone with weight 1, the reference's ``sum(loss_group)``, called with
``stage="init"`` where the term has a main-stage loss too; the run's optimiser (RepDistiller's:
SGD, its momentum and weight decay) at a constant learning rate, ``init_lr`` or the term's
default or the run's base lr; the student's classifier frozen, or the whole student with batch
norm in eval mode where the term trains only its own modules). It checkpoints, resumes and
reports as any run, and a finished one is reused. The main stage is the run in ``WORKDIR`` (its
config the user's): every seed starts from the same seed of the first stage (the student's
variables, and the term's ``keeps`` modules, frozen: FT's paraphraser), with a fresh optimiser
and the run's schedule, as the reference's second ``optimizer``. A restarted run resumes in the
stage it was in: a first stage with results is not trained again.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import ml_collections

from at_jax.objective import ActiveTerms
from at_jax.optim import base_lr
from at_jax.terms import InitStage, init_stage_of, term_options

__all__ = ["INIT_DIR", "TwoStages", "plan", "init_stage_config", "describe"]

INIT_DIR = "init_stage"


@dataclasses.dataclass(frozen=True)
class TwoStages:
    """A run's two stages: the ``term`` that has a first stage (its :class:`InitStage`), the
    first stage's config and active terms, and the main stage's active terms."""

    term: str
    stage: InitStage
    init_config: ml_collections.ConfigDict
    init_terms: ActiveTerms
    main_terms: ActiveTerms

    @staticmethod
    def init_workdir(workdir: str) -> str:
        """Where the first stage runs: ``WORKDIR/init_stage``."""
        return os.path.join(workdir, INIT_DIR)


def _staged(terms: ActiveTerms) -> list[str]:
    return [n for n in terms if init_stage_of(n) is not None]


def plan(config: ml_collections.ConfigDict, terms: ActiveTerms) -> Optional[TwoStages]:
    """The two stages of ``config`` (its checked active ``terms``), or None for a run of one
    stage. Raises ``ValueError`` for two terms with first stages, or a term that trains only in
    its first stage (AB, FSP) without one."""
    staged = _staged(terms)
    if len(staged) > 1:
        raise ValueError(
            f"loss terms {staged} each train in a first stage of their own; a run takes one "
            "of them (as RepDistiller's --distill)"
        )
    if not staged:
        return None
    name = staged[0]
    stage = init_stage_of(name)
    assert stage is not None
    epochs = terms[name].get("init_epochs", 0)
    if epochs == 0:
        if stage.main:
            return None  # the main stage alone, with the term's modules untrained (allowed)
        raise ValueError(
            f"loss term {name!r} trains only in its first stage: set "
            f"config.loss.{name}.init_epochs > 0 (RepDistiller: 30)"
        )
    marker = {"stage": "init"} if stage.main else {}  # a term with two losses is told which
    init_terms = ActiveTerms({name: {**terms[name], "weight": 1.0, **marker}})
    main_terms = ActiveTerms(
        {n: o for n, o in terms.items() if n != name or stage.main}  # AB, FSP: none in main
    )
    if not main_terms:
        raise ValueError(
            f"the main stage after {name!r}'s first stage has no loss term: add "
            f"config.loss.ce (RepDistiller trains the student with cross-entropy after it)"
        )
    return TwoStages(name, stage, init_stage_config(config, name, stage), init_terms, main_terms)


def init_stage_config(
    config: ml_collections.ConfigDict, name: str, stage: InitStage
) -> ml_collections.ConfigDict:
    """The config of term ``name``'s first stage (see the module doc)."""
    first = ml_collections.ConfigDict(config.to_dict())
    options = dict(config.loss[name])
    first.num_epochs = int(options["init_epochs"])
    marker = {"stage": "init"} if stage.main else {}
    first.loss = ml_collections.ConfigDict(
        {name: {**term_options(options), "weight": 1.0, **marker}}
    )
    lr = options.get("init_lr", 0.0) or stage.init_lr
    if lr:  # as given; else the run's base lr (scaled with the batch size where it is)
        first.optimizer.lr, first.optimizer.lr_batch_size = float(lr), 0
    first.optimizer.lr_decay_epochs = ()
    with first.optimizer.ignore_type():
        first.optimizer.schedule = "step"
    if "ema_decay" in first.optimizer:
        first.optimizer.ema_decay = 0.0
    if stage.trains == "term":
        first.freeze.student, first.freeze.batch_norm = True, True
    else:
        first.freeze.classifier = True
    return first


def describe(stages: TwoStages) -> str:
    """One line: what the first stage trains, for how long, at which learning rate."""
    cfg = stages.init_config
    what = (
        f"{stages.term}'s modules (the student frozen)"
        if stages.stage.trains == "term"
        else f"the student's layers but its classifier, and {stages.term}'s modules"
    )
    return (
        f"first stage ({stages.term}, {cfg.num_epochs} epochs, lr "
        f"{base_lr(cfg.optimizer, cfg.batch_size):g} constant): "
        f"trains {what}"
    )
