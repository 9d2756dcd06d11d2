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
"""

from __future__ import annotations

from typing import Any

import ml_collections

from at_jax.compilation_cache import default_cache_dir

__all__ = ["base_config", "apply_method", "table1_recipe", "set_path", "METHODS", "BETA"]

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


def base_config() -> ml_collections.ConfigDict:
    """The reference CIFAR recipe (REFERENCE.md): SGD 0.9, lr 0.1, wd 5e-4, batch 128, 200
    epochs, lr × 0.2 at 60/120/160, reflect-pad-4 crop + flip; a WRN-16-1 trained alone."""
    config = ml_collections.ConfigDict()
    config.model = "wrn-16-1"
    config.model_overrides = ml_collections.ConfigDict()  # e.g. batch_norm=False for NIN

    config.data = ml_collections.ConfigDict()
    # In memory: cifar10 | cifar100 | fashion_mnist | mnist. Streamed (Grain): imagefolder |
    # cub | scenes | imagenet2012 | caltech_birds2011 (the last two prepared by TFDS).
    config.data.name = "cifar10"
    config.data.source = "auto"  # in-memory sets: auto (local, then TFDS) | local | tfds
    config.data.data_dir = ""  # where local files are (or the TFDS data_dir)
    config.data.train_size = 0  # > 0: use only the first N training examples
    config.data.test_size = 0
    config.data.augment = ml_collections.ConfigDict({"crop_pad": 4, "flip": True})
    config.data.image_size = 224  # streamed sets: training crop / evaluation size
    config.data.num_workers = 2  # streamed sets: Grain worker processes (0: in-process)
    config.data.read_threads = 1  # streamed sets: threads per worker (batches in flight)
    config.data.prefetch = 2  # streamed sets: batches put on the devices ahead

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
            "ce": {**term, "weight": 1.0},
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
            "grad_at": {**term, "squared": True},
            "min_l2": {**term, "squared": True},
            "symmetry": {**term, "squared": True},
        }
    )
    config.gradient = ml_collections.ConfigDict({"bn_mode": "batch_stats"})

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
