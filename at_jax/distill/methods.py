"""The distillation baselines as config edits (:data:`BASELINE_METHODS`, part of
:data:`at_jax.recipes.METHODS`): each method's term with the reference's weight and every option
at its default, so that ``configs/cifar100.py:<name>`` and ``configs/fashion_mnist.py:<name>``
run it and each option can be overridden from the command line."""

from __future__ import annotations

import inspect
from typing import Any

from at_jax.distill import REFERENCE_WEIGHTS
from at_jax.terms import init_stage_of, registered

__all__ = ["BASELINE_METHODS", "INIT_EPOCHS", "baseline_term"]

# RepDistiller's first stage (its --init_epochs) of the baselines that have one
INIT_EPOCHS = 30


def baseline_term(name: str) -> dict[str, Any]:
    """``config.loss.<name>`` of a distillation baseline: the β of the reference's
    ``scripts/run_cifar_distill.sh`` (:data:`at_jax.distill.REFERENCE_WEIGHTS`), every option
    at the term's default (so that each can be overridden: ``--config.loss.crd.k=4096``), and
    ``init_epochs`` for the terms with a first stage."""
    fn = registered(name)
    assert fn is not None, name
    options = {
        k: p.default
        for k, p in inspect.signature(fn).parameters.items()
        if k not in ("out", "stage") and p.default is not inspect.Parameter.empty
    }
    stage = {"init_epochs": INIT_EPOCHS} if init_stage_of(name) is not None else {}
    return {"weight": REFERENCE_WEIGHTS[name], **options, **stage}


# The baselines' config edits (at_jax.recipes.METHODS has them: configs/cifar100.py:crd ...):
# the student's CE (γ = 1, α = 0, as the reference's commands) plus the method's term; CRD+KD
# adds KD with α = 1 (today's KL·T², the reference's DistillKL with -a 1, whatever form of KD
# the file's own kd method uses).
BASELINE_METHODS: dict[str, dict[str, Any]] = {
    name: {f"loss.{name}": baseline_term(name)} for name in REFERENCE_WEIGHTS
}
BASELINE_METHODS["crd_kd"] = {
    **BASELINE_METHODS["crd"],
    "loss.kd.weight": 1.0,
    "loss.kd.alpha": 1.0,
    "loss.kd.legacy": False,
}
