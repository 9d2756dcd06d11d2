"""The paper's methods as config edits, shared by the per-dataset configs.

Table 1 columns: ``teacher`` (WRN-16-2 by default), ``student`` (alone), ``at``, ``factt``, ``kd``,
``at_kd`` and ``at_kd_decay`` (β follows the learning-rate schedule, the paper's decaying β).
Table 2 mapping functions: ``at_fsum`` (F_sum), ``at_fsum2`` (F_sum^2), ``at_fsum4`` (F_sum^4),
``at_fmax1`` (F_max^1); ``student`` is the "none" row. AT uses β = 1e3 with the reference code's
per-element mean ("code" mode) and one loss per group. Defined in ``at_jax/recipes.py``.
"""

from at_jax.recipes import BETA, METHODS, apply_method, set_path  # noqa: F401
