"""Base config: the reference CIFAR recipe, a WRN-16-1 student trained alone (cross-entropy).

    python -m at_jax.main --config configs/default.py --workdir runs/cifar10/wrn-16-1

Every other config imports this one and changes a few fields. Recipe (REFERENCE.md): SGD momentum
0.9 (not Nesterov), lr 0.1, weight decay 5e-4, batch 128, 200 epochs, lr × 0.2 at 60/120/160,
reflect-pad 4 + random crop + flip. Expected: ~8.8% test error on CIFAR-10 (paper Table 1).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = "wrn-16-1"
    config.model_overrides = ml_collections.ConfigDict()  # e.g. batch_norm=False for NIN

    config.data = ml_collections.ConfigDict()
    config.data.name = "cifar10"          # cifar10 | cifar100 | fashion_mnist | mnist
    config.data.source = "auto"           # auto (local files, then TFDS) | local | tfds
    config.data.data_dir = ""             # where local files are (or the TFDS data_dir)
    config.data.train_size = 0            # > 0: use only the first N training examples
    config.data.test_size = 0
    config.data.augment = ml_collections.ConfigDict({"crop_pad": 4, "flip": True})

    config.teacher = ml_collections.ConfigDict({"workdir": "", "seed_index": 0})

    # The objective: {term: {weight, weight_schedule ('constant' | 'lr'), **options}}; terms with
    # weight 0 are off, so any composition is one override away: --config.loss.at.weight=1000.
    config.loss = ml_collections.ConfigDict({
        "ce": {"weight": 1.0, "weight_schedule": "constant"},
        "kd": {"weight": 0.0, "weight_schedule": "constant", "temperature": 4.0, "alpha": 0.9},
        "at": {"weight": 0.0, "weight_schedule": "constant", "p": 2.0, "reduce": "mean",
               "mode": "code", "normalize": "l2", "pairs": "groups"},
        "factt": {"weight": 0.0, "weight_schedule": "constant", "pairs": "groups"},
        "grad_at": {"weight": 0.0, "weight_schedule": "constant", "squared": False},
        "min_l2": {"weight": 0.0, "weight_schedule": "constant", "squared": False},
        "symmetry": {"weight": 0.0, "weight_schedule": "constant", "squared": False},
    })
    config.gradient = ml_collections.ConfigDict({"bn_mode": "batch_stats"})

    config.optimizer = ml_collections.ConfigDict({
        "name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4,
        "lr_decay_epochs": (60, 120, 160), "lr_decay_factor": 0.2})
    config.batch_size = 128
    config.eval_batch_size = 1000
    config.num_epochs = 200
    config.dtype = "float32"              # float32 | bfloat16 (compute; params stay float32)

    config.seed = 0
    config.num_seeds = 1                  # > 1: independent students trained together (vmap)
    config.checkpoint_every_epochs = 1
    config.keep_checkpoints = 3
    return config
