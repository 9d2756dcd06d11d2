"""Base config: the reference CIFAR recipe, a WRN-16-1 student trained alone (cross-entropy).

    python -m at_jax.main --config configs/default.py --workdir runs/cifar10/wrn-16-1

Every other config starts from the same ``at_jax.recipes.base_config()`` and changes a few
fields (config files import only the installed ``at_jax``, so they load from any directory).
Recipe (docs/reference.md): SGD momentum 0.9 (not Nesterov), lr 0.1, weight decay 5e-4, batch 128,
200 epochs, lr × 0.2 at 60/120/160, reflect-pad 4 + random crop + flip. Expected: ~8.8% test
error on CIFAR-10 (paper Table 1). The fields and their meaning: ``at_jax/recipes.py``
(``base_config``).
"""

import ml_collections

from at_jax import recipes


def get_config() -> ml_collections.ConfigDict:
    return recipes.base_config()
