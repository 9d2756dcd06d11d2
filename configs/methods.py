"""The paper's methods as config edits, shared by the per-dataset configs.

Table 1 columns: ``teacher`` (WRN-16-2 by default), ``student`` (alone), ``at``, ``factt``, ``kd``,
``at_kd`` and ``at_kd_decay`` (β follows the learning-rate schedule, the paper's decaying β).
Table 2 mapping functions: ``at_fsum`` (F_sum), ``at_fsum2`` (F_sum^2), ``at_fsum4`` (F_sum^4),
``at_fmax1`` (F_max^1); ``student`` is the "none" row. AT uses β = 1e3 with the reference code's
per-element mean ("code" mode) and one loss per group. Defined in ``at_jax/recipes.py``.

``table1_recipe`` adds what the reference CIFAR code did beyond the base recipe: BN scales drawn
from U(0, 1), and (``legacy_kd``) its KD before the 2018-07-11 fix — the form the paper's CIFAR-10
numbers came from (2/C times today's KL term; see ``at_jax.losses.kd_loss``).
"""

from at_jax.recipes import BETA, METHODS, apply_method, set_path  # noqa: F401


def table1_recipe(config, method: str, teacher_workdir: str, legacy_kd: bool):
    """Table 1/2 settings on top of ``config``, then ``method``'s edits."""
    config.model_overrides = {"bn_scale_init": "uniform"}
    config.loss.kd.legacy = legacy_kd
    return apply_method(config, method, teacher_workdir)
