"""The data part of a run's config (``config.data``): :func:`default_data_config`, the reference
recipe's values, which :func:`at_jax.recipes.base_config` and the data tools start from."""

from __future__ import annotations

import ml_collections

__all__ = ["default_data_config"]


def default_data_config() -> ml_collections.ConfigDict:
    data = ml_collections.ConfigDict()
    # In memory: cifar10 | cifar100 | fashion_mnist | mnist. Streamed (Grain): imagefolder |
    # cub | scenes | imagenet2012 | caltech_birds2011 (the last two prepared by TFDS).
    data.name = "cifar10"
    data.source = "auto"  # in-memory sets: auto (local, then TFDS) | local | tfds
    data.data_dir = ""  # where local files are (or the TFDS data_dir)
    data.train_size = 0  # > 0: use only the first N training examples
    data.test_size = 0
    # crop_pad/flip: in-memory sets (streamed sets crop and flip on the host). On the device for
    # both (at_jax.mixing, MAE's recipe): random_erasing (its probability), mixup and cutmix
    # (their α; 0 = off), mixup_prob, mixup_switch_prob (CutMix's share when both are on)
    data.augment = ml_collections.ConfigDict(
        {
            "crop_pad": 4,
            "flip": True,
            "random_erasing": 0.0,
            "mixup": 0.0,
            "cutmix": 0.0,
            "mixup_prob": 1.0,
            "mixup_switch_prob": 0.5,
            # streamed sets, on the host: a timm RandAugment policy ("" = off; MAE's recipe:
            # "rand-m9-mstd0.5-inc1"), see at_jax.data.randaugment
            "randaugment": "",
        }
    )
    data.image_size = 224  # streamed sets: training crop / evaluation size
    data.num_workers = 2  # streamed sets: Grain worker processes (0: in-process)
    data.read_threads = 1  # streamed sets: threads per worker (batches in flight)
    data.prefetch = 2  # streamed sets: batches put on the devices ahead
    return data
