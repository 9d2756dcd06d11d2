"""Configs as data, inside the library: the reference recipe and the paper's methods as edits.

The top-level ``configs/`` files (what users pass to ``--config``) build on these; the library
itself (the CLI, the benchmarks) never imports ``configs/``, so the installed package works from
any directory.

``base_config()`` is the reference CIFAR recipe: a WRN-16-1 student trained alone. ``METHODS``
holds the paper's Table 1/2 columns as ``{config.path: value}`` edits (:func:`apply_method`):
``teacher`` (WRN-16-2 by default), ``student`` (alone), ``at``, ``factt``, ``kd``, ``at_kd`` and
``at_kd_decay`` (β follows the learning-rate schedule, the paper's decaying β); the Table 2
mapping functions ``at_fsum`` (F_sum), ``at_fsum2`` (F_sum²), ``at_fsum4`` (F_sum⁴), ``at_fmax1``
(F_max¹) — ``student`` is the "none" row. AT uses β = 1e3 with the reference code's per-element
mean ("code" mode) and one loss per group. :func:`table1_recipe` adds what the reference CIFAR
code did beyond the base recipe.

Config files (``configs/*.py``) import only this module, so that they load from any directory.
:func:`validate_config` checks a whole config once, before a run builds anything.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from at_jax.attention_copy import AttentionCopy
from at_jax.compilation_cache import default_cache_dir
from at_jax.data import DATASETS, STREAMED
from at_jax.data.augment import PAD_MODES
from at_jax.data.config import default_data_config
from at_jax.data.randaugment import parse_policy
from at_jax.data.transforms import ON_BAD_IMAGE
from at_jax.distill.methods import BASELINE_METHODS
from at_jax.gradient import BN_MODES
from at_jax.models.build import DTYPES
from at_jax.objective import ActiveTerms, validate_terms
from at_jax.optim import LAYER_DECAY_FORMS, OPTIMIZERS, SCHEDULES
from at_jax.seeds import SEED_STRATEGIES

__all__ = [
    "base_config",
    "validate_config",
    "validate_with_data",
    "apply_method",
    "table1_recipe",
    "set_path",
    "METHODS",
    "BETA",
]

BETA = 1e3

METHODS: dict[str, dict[str, Any]] = {
    "teacher": {"model": "wrn-16-2"},
    "student": {},
    "at": {"loss.at.weight": BETA},
    # F-ActT decays β with the learning rate, as AT+KD (the paper's §4.1.2)
    "factt": {"loss.factt.weight": BETA, "loss.factt.weight_schedule": "lr"},
    "kd": {"loss.ce.weight": 0.0, "loss.kd.weight": 1.0},
    "at_kd": {"loss.ce.weight": 0.0, "loss.kd.weight": 1.0, "loss.at.weight": BETA},
    "at_kd_decay": {
        "loss.ce.weight": 0.0,
        "loss.kd.weight": 1.0,
        "loss.at.weight": BETA,
        "loss.at.weight_schedule": "lr",
    },
    "at_fsum": {"loss.at.weight": BETA, "loss.at.p": 1.0, "loss.at.reduce": "sum"},
    "at_fsum2": {"loss.at.weight": BETA, "loss.at.p": 2.0, "loss.at.reduce": "sum"},
    "at_fsum4": {"loss.at.weight": BETA, "loss.at.p": 4.0, "loss.at.reduce": "sum"},
    "at_fmax1": {"loss.at.weight": BETA, "loss.at.p": 1.0, "loss.at.reduce": "max"},
}

METHODS.update(BASELINE_METHODS)  # the distillation baselines (configs/cifar100.py:crd ...)


def base_config() -> ml_collections.ConfigDict:
    """The reference CIFAR recipe (docs/reference.md): SGD 0.9, lr 0.1, wd 5e-4, batch 128, 200
    epochs, lr × 0.2 at 60/120/160, reflect-pad-4 crop + flip; a WRN-16-1 trained alone."""
    config = ml_collections.ConfigDict()
    config.model = "wrn-16-1"
    config.model_overrides = ml_collections.ConfigDict()  # e.g. batch_norm=False for NIN

    config.data = default_data_config()  # at_jax.data.config: what each key means

    config.teacher = ml_collections.ConfigDict({"workdir": "", "seed_index": 0})

    # Fine-tuning. init_from: a run directory (trained, or made by `python -m at_jax.convert`)
    # whose weights and BN statistics start the student; a classifier for another class count is
    # replaced by a fresh one. freeze.batch_norm: BN normalises with its running statistics in
    # training too, which stay unchanged, and its scale/offset are not trained. freeze.modules:
    # top-level modules not trained; "layer1" also names the group's blocks layer1_0, layer1_1...
    config.init_from = ""
    config.freeze = ml_collections.ConfigDict({"batch_norm": False, "modules": ()})

    # The objective: {term: {weight, weight_schedule ('constant' | 'lr'), start_epoch, **options}};
    # terms with weight 0 are off, so any composition is one override away:
    # --config.loss.at.weight=1000. start_epoch > 1: the term counts from that epoch on.
    # kd.legacy: the reference code's KD before 2018-07-11 (2/C times today's KL term; the form
    # the paper's CIFAR-10 numbers came from). Gradient terms: squared norms (eq. 5) by default.
    term = {"weight": 0.0, "weight_schedule": "constant", "start_epoch": 0}
    config.loss = ml_collections.ConfigDict(
        {
            "ce": {**term, "weight": 1.0, "label_smoothing": 0.0},
            "kd": {**term, "temperature": 4.0, "alpha": 0.9, "legacy": False},
            "at": {
                **term,
                "p": 2.0,
                "reduce": "mean",
                "mode": "code",
                "normalize": "l2",
                "pairs": "groups",
            },
            "factt": {**term, "pairs": "groups"},
            # attention distillation between ViTs (Li et al. 2024): blocks 0..depth+end_layer-1
            "atd": {**term, "end_layer": -3, "target": "attention"},
            "grad_at": {**term, "squared": True},
            "min_l2": {**term, "squared": True},
            "symmetry": {**term, "squared": True},
        }
    )
    config.gradient = ml_collections.ConfigDict({"bn_mode": "batch_stats"})
    # Attention copy between ViTs (Li et al. 2024; at_jax.attention_copy): target "" (off),
    # "attention", "q", "k" or "v"; the student's blocks 0..teacher depth+end_layer-1 use the
    # teacher's (config.teacher.workdir)
    config.attention_copy = ml_collections.ConfigDict({"target": "", "end_layer": -3})

    config.optimizer = ml_collections.ConfigDict(
        {
            "name": "sgd",
            "lr": 0.1,
            "momentum": 0.9,
            "nesterov": False,
            "weight_decay": 5e-4,
            "lr_decay_epochs": (60, 120, 160),
            "lr_decay_factor": 0.2,
            # > 0: lr is given for batches of this size and the run uses lr × batch_size /
            # lr_batch_size (the ImageNet recipe's "0.1 per 256 images"); 0: lr as given
            "lr_batch_size": 0,
            # MAE's fine-tuning recipe (at_jax.optim): name "adamw" (b1, b2), schedule
            # "warmup_cosine" (warmup_epochs, then cosine to min_lr at cosine_epochs: not
            # num_epochs, so that extending a run does not change its schedule), layer_decay
            # < 1 for ViTs (form "port" or "mae"), clip_grad_norm > 0, ema_decay > 0
            "schedule": "step",
            "b1": 0.9,
            "b2": 0.999,
            "warmup_epochs": 0.0,
            "min_lr": 0.0,
            "cosine_epochs": 0.0,
            "layer_decay": 1.0,
            "layer_decay_form": "port",
            "clip_grad_norm": 0.0,
            "ema_decay": 0.0,
        }
    )
    config.batch_size = 128  # global batch (all devices and processes)
    config.eval_batch_size = 1000
    config.num_epochs = 200
    config.dtype = "float32"  # float32 | bfloat16 (compute; params stay float32)

    config.seed = 0
    config.num_seeds = 1  # > 1: independent students trained together
    config.seed_strategy = "auto"  # auto (unroll on CPU, vmap elsewhere) | vmap | unroll
    config.log_every_steps = 0  # > 0: a metrics row every N steps (long epochs)
    config.eval_every_epochs = 1  # test error every N epochs (and after the last)
    config.checkpoint_every_epochs = 1
    config.checkpoint_every_steps = 0  # > 0: also every N steps (0 = per epoch only)
    config.keep_checkpoints = 3
    # JAX's persistent compilation cache ("" = off): a second identical run loads its compiled
    # programs instead of compiling them again. Not part of the run's identity.
    config.compilation_cache_dir = default_cache_dir()
    return config


def set_path(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
    """``set_path(config, "loss.at.weight", 1e3)``."""
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


def apply_method(
    config: ml_collections.ConfigDict, method: str, teacher_workdir: str
) -> ml_collections.ConfigDict:
    """Apply a method's edits; students get ``teacher_workdir`` unless they need no teacher."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    for path, value in METHODS[method].items():
        set_path(config, path, value)
    if method not in ("teacher", "student"):
        config.teacher.workdir = teacher_workdir
    return config


def table1_recipe(
    config: ml_collections.ConfigDict, method: str, teacher_workdir: str, legacy_kd: bool
) -> ml_collections.ConfigDict:
    """Table 1/2 settings on top of ``config``, then ``method``'s edits: BN scales drawn from
    U(0, 1) as the reference CIFAR code, and (``legacy_kd``) its KD before the 2018-07-11 fix —
    the form the paper's CIFAR-10 numbers came from (2/C times today's KL term; see
    :func:`at_jax.losses.kd_loss`)."""
    config.model_overrides = {"bn_scale_init": "uniform"}
    config.loss.kd.legacy = legacy_kd
    return apply_method(config, method, teacher_workdir)


# --------------------------------------------------------------------------- checks


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Problems:
    """Every problem of a config, collected to be reported at once."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config, self.found = config, list[str]()

    def need(self, ok: bool, key: str, what: str) -> None:
        if not ok:
            self.found.append(f"config.{key} must be {what}, got {self.value(key)!r}")

    def value(self, key: str, default: Any = None) -> Any:
        node: Any = self.config
        for part in key.split("."):
            node = node.get(part, default) if hasattr(node, "get") else default
        return node


def _check_run(p: _Problems) -> None:
    for key in (
        "batch_size",
        "num_epochs",
        "eval_batch_size",
        "num_seeds",
        "keep_checkpoints",
        "eval_every_epochs",
        "checkpoint_every_epochs",
    ):
        p.need(_positive_int(p.value(key)), key, "an integer >= 1")
    for key in ("log_every_steps", "checkpoint_every_steps"):
        value = p.value(key)
        p.need(isinstance(value, int) and value >= 0, key, "an integer >= 0 (0 = off)")
    p.need(isinstance(p.value("seed"), int), "seed", "an integer")
    p.need(
        p.value("seed_strategy") in SEED_STRATEGIES, "seed_strategy", f"one of {SEED_STRATEGIES}"
    )
    p.need(p.value("dtype") in DTYPES, "dtype", f"one of {sorted(DTYPES)}")
    bn_mode = p.value("gradient.bn_mode", "batch_stats")
    p.need(bn_mode in BN_MODES, "gradient.bn_mode", f"one of {BN_MODES}")
    seed_index = p.value("teacher.seed_index", 0)
    p.need(isinstance(seed_index, int) and seed_index >= 0, "teacher.seed_index", "an integer >= 0")


def _check_data(p: _Problems) -> None:
    known = (*DATASETS, *STREAMED)
    p.need(p.value("data.name") in known, "data.name", f"one of {', '.join(known)}")
    p.need(
        p.value("data.source") in ("auto", "local", "tfds"), "data.source", "auto, local or tfds"
    )
    for key in ("train_size", "test_size", "num_workers"):
        value = p.value(f"data.{key}")
        p.need(isinstance(value, int) and value >= 0, f"data.{key}", "an integer >= 0")
    for key in ("read_threads", "prefetch"):
        p.need(_positive_int(p.value(f"data.{key}")), f"data.{key}", "an integer >= 1")
    mode = p.value("data.augment.crop_pad_mode", "reflect")
    p.need(mode in PAD_MODES, "data.augment.crop_pad_mode", f"one of {PAD_MODES}")
    size = p.value("data.image_size")
    p.need(isinstance(size, int) and size >= 8, "data.image_size", "an integer >= 8")
    on_bad = p.value("data.on_bad_image", "error")
    p.need(on_bad in ON_BAD_IMAGE, "data.on_bad_image", f"one of {ON_BAD_IMAGE}")
    crop_pad = p.value("data.augment.crop_pad")
    p.need(isinstance(crop_pad, int) and crop_pad >= 0, "data.augment.crop_pad", "an integer >= 0")


def _check_optimizer(p: _Problems) -> None:
    p.need(p.value("optimizer.name") in OPTIMIZERS, "optimizer.name", f"one of {list(OPTIMIZERS)}")
    lr = p.value("optimizer.lr")
    p.need(_number(lr) and lr > 0, "optimizer.lr", "a number > 0")
    momentum = p.value("optimizer.momentum")
    p.need(_number(momentum) and 0 <= momentum < 1, "optimizer.momentum", "a number in [0, 1)")
    decay = p.value("optimizer.weight_decay")
    p.need(_number(decay) and decay >= 0, "optimizer.weight_decay", "a number >= 0")
    factor = p.value("optimizer.lr_decay_factor")
    p.need(_number(factor) and factor > 0, "optimizer.lr_decay_factor", "a number > 0")
    epochs = p.value("optimizer.lr_decay_epochs", ())
    p.need(
        all(isinstance(e, int) and e >= 0 for e in epochs),
        "optimizer.lr_decay_epochs",
        "integers >= 0",
    )
    reference = p.value("optimizer.lr_batch_size", 0)
    p.need(
        isinstance(reference, int) and reference >= 0,
        "optimizer.lr_batch_size",
        "an integer >= 0 (0 = lr as given)",
    )


def _check_mae_recipe(p: _Problems) -> None:
    """MAE's fine-tuning recipe: AdamW, the warm-up + cosine schedule, layer decay, EMA,
    label smoothing, mixup/CutMix, random erasing."""
    schedule = p.value("optimizer.schedule", "step")
    p.need(schedule in SCHEDULES, "optimizer.schedule", f"one of {SCHEDULES}")
    for key, low, high in (("b1", 0, 1), ("b2", 0, 1), ("ema_decay", 0, 1)):
        value = p.value(f"optimizer.{key}", 0.0)
        p.need(_number(value) and low <= value < high, f"optimizer.{key}", "a number in [0, 1)")
    if schedule == "warmup_cosine":
        cosine, warmup = p.value("optimizer.cosine_epochs"), p.value("optimizer.warmup_epochs")
        p.need(
            _number(cosine) and cosine > 0,
            "optimizer.cosine_epochs",
            "a number > 0 with schedule warmup_cosine (the epoch the cosine reaches min_lr; "
            "usually num_epochs)",
        )
        p.need(
            _number(warmup) and 0 <= warmup < (cosine if _number(cosine) else 0),
            "optimizer.warmup_epochs",
            "a number in [0, cosine_epochs)",
        )
        min_lr = p.value("optimizer.min_lr")
        p.need(_number(min_lr) and min_lr >= 0, "optimizer.min_lr", "a number >= 0")
    decay = p.value("optimizer.layer_decay", 1.0)
    p.need(_number(decay) and 0 < decay <= 1, "optimizer.layer_decay", "a number in (0, 1]")
    form = p.value("optimizer.layer_decay_form", "port")
    p.need(form in LAYER_DECAY_FORMS, "optimizer.layer_decay_form", f"one of {LAYER_DECAY_FORMS}")
    clip = p.value("optimizer.clip_grad_norm", 0.0)
    p.need(_number(clip) and clip >= 0, "optimizer.clip_grad_norm", "a number >= 0 (0 = off)")
    smoothing = p.value("loss.ce.label_smoothing", 0.0)
    p.need(_number(smoothing) and 0 <= smoothing < 1, "loss.ce.label_smoothing", "in [0, 1)")
    for key in ("mixup", "cutmix"):
        alpha = p.value(f"data.augment.{key}", 0.0)
        p.need(_number(alpha) and alpha >= 0, f"data.augment.{key}", "an α >= 0 (0 = off)")
    for key, default in (("random_erasing", 0.0), ("mixup_prob", 1.0), ("mixup_switch_prob", 0.5)):
        value = p.value(f"data.augment.{key}", default)
        p.need(_number(value) and 0 <= value <= 1, f"data.augment.{key}", "a probability in [0, 1]")
    policy = p.value("data.augment.randaugment", "")
    if policy:
        try:
            parse_policy(policy)
        except ValueError as e:
            p.found.append(f"config.data.augment.randaugment: {e}")
        if p.value("data.name") in DATASETS:
            p.found.append(
                f"config.data.augment.randaugment runs in the streamed pipeline (on the host); "
                f"{p.value('data.name')} is held in memory and augmented on the device: set it "
                "to '' (or use a streamed set: imagefolder, imagenet2012, ...)"
            )
    mixing = any(p.value(f"data.augment.{k}", 0.0) for k in ("mixup", "cutmix"))
    if mixing and p.value("loss.kd.weight", 0.0):
        p.found.append(
            "config.loss.kd and data.augment.mixup/cutmix do not combine: KD's label term needs "
            "the images' own labels; use ce (its soft targets) with mixing, or turn mixing off"
        )


def _check_copy(p: _Problems) -> None:
    try:
        copy = AttentionCopy.from_config(p.config)
    except ValueError as e:
        p.found.append(str(e))
        return
    if copy.on and not p.value("teacher.workdir"):
        p.found.append(
            f"config.attention_copy.target={copy.target!r} copies a teacher's attention: set "
            "config.teacher.workdir to a trained ViT teacher's run (or a converted MAE/timm one)"
        )


def validate_config(config: ml_collections.ConfigDict) -> ActiveTerms:
    """Check every value of ``config`` that can be checked without the data, before anything is
    built, and return the objective's active terms (checked once here; pass them on).

    Raises ``ValueError`` naming every key that is wrong, what it got and what it takes."""
    problems = _Problems(config)
    for check in (_check_run, _check_data, _check_optimizer, _check_mae_recipe, _check_copy):
        check(problems)
    if problems.found:
        raise ValueError("; ".join(problems.found))
    return validate_terms(dict(config.loss))


def validate_with_data(config: ml_collections.ConfigDict, n_train: int, n_devices: int) -> None:
    """The checks that need the opened data (its size) and the mesh (its device count)."""
    if config.batch_size > n_train:
        raise ValueError(
            f"config.batch_size={config.batch_size} must be between 1 and the "
            f"number of training examples ({n_train})"
        )
    if config.batch_size % n_devices:
        raise ValueError(
            f"config.batch_size={config.batch_size} is not divisible by the "
            f"{n_devices} devices of the mesh; use a multiple of {n_devices}"
        )
