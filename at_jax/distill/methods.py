"""The distillation baselines as config edits (:data:`BASELINE_METHODS`, part of
:data:`at_jax.recipes.METHODS`): each method's term with the reference's weight and every option
at its default, so that ``configs/cifar100.py:<name>`` and ``configs/fashion_mnist.py:<name>``
run it and each option can be overridden from the command line."""

from __future__ import annotations

import inspect
from typing import Any

from at_jax.distill import REFERENCE_WEIGHTS
from at_jax.terms import init_stage_of, registered

__all__ = [
    "BASELINE_METHODS",
    "INIT_EPOCHS",
    "baseline_term",
    "REPDISTILLER_RECIPE",
    "REPDISTILLER_METHODS",
    "repdistiller_edits",
]

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


# RepDistiller's CIFAR-100 recipe (train_teacher.py and train_student.py defaults): SGD 0.9,
# lr 0.05 (0.01 for the MobileNet/ShuffleNet students), weight decay 5e-4, batch 64, 240 epochs,
# lr × 0.1 at 150/180/210; RandomCrop(32, padding=4) with black borders and flips; KD at T 4
# in today's form (its DistillKL).
REPDISTILLER_RECIPE: dict[str, Any] = {
    "batch_size": 64,
    "num_epochs": 240,
    "optimizer.lr": 0.05,
    "optimizer.momentum": 0.9,
    "optimizer.weight_decay": 5e-4,
    "optimizer.lr_decay_epochs": (150, 180, 210),
    "optimizer.lr_decay_factor": 0.1,
    "data.augment.crop_pad": 4,
    "data.augment.crop_pad_mode": "zeros",
    "data.augment.flip": True,
    "loss.kd.temperature": 4.0,
    "loss.kd.legacy": False,
    "model_overrides": {},  # BN scales start at 1 (not the AT code's U(0, 1))
}
SMALL_LR_MODELS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")
# the methods of the reference's run_cifar_distill.sh besides the baselines: KD (-r 0.1 -a 0.9,
# i.e. 0.1·CE + 0.9·KL·T²) and AT (β 1000 on every group; maps of other sizes compared as its
# Attention.at_loss: the larger activation adaptive-average-pooled)
REPDISTILLER_METHODS: dict[str, dict[str, Any]] = {
    "teacher": {},
    "student": {},
    "kd": {"loss.ce.weight": 0.0, "loss.kd.weight": 1.0, "loss.kd.alpha": 0.9},
    "at": {"loss.at.weight": 1000.0, "loss.at.pool": "activation"},
    **BASELINE_METHODS,
}


def repdistiller_edits(method: str, teacher: str, student: str) -> dict[str, Any]:
    """The config edits (``path -> value``) of one cell of RepDistiller's CIFAR-100 benchmark:
    its recipe, the model (``teacher`` for ``method="teacher"``, else ``student``), the
    method's terms and weights (``kd``, ``at`` and every baseline), the lr of its small
    students. Names are the reference's or ours (``wrn_40_2`` or ``wrn-40-2``)."""
    if method not in REPDISTILLER_METHODS:
        raise ValueError(
            f"unknown method {method!r} of RepDistiller's benchmark; known: "
            + ", ".join(REPDISTILLER_METHODS)
        )
    model = teacher if method == "teacher" else student
    edits = {**REPDISTILLER_RECIPE, "model": model, **REPDISTILLER_METHODS[method]}
    if model in SMALL_LR_MODELS:
        edits["optimizer.lr"] = 0.01
    return edits
