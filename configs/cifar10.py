"""CIFAR-10: WRN teachers and students for every column of the paper's Table 1 and Table 2.

    python -m at_jax.main --config configs/cifar10.py:teacher --workdir runs/cifar10/wrn-16-2
    python -m at_jax.main --config configs/cifar10.py:student --workdir runs/cifar10/wrn-16-1
    python -m at_jax.main --config configs/cifar10.py:at      --workdir runs/cifar10/wrn-16-1-at
    (methods: teacher, student, at, factt, kd, at_kd, at_kd_decay, at_fsum, at_fsum2, at_fsum4,
     at_fmax1 — see at_jax/recipes.py)

Students read their teacher from runs/cifar10/wrn-16-2 (override with
--config.teacher.workdir); other pairs: --config.model=wrn-16-2 with a wrn-40-2 teacher, etc.
Expected (% test error, paper Table 1, WRN-16-2 → WRN-16-1, 200 epochs): student 8.77 · AT 7.93
· F-ActT 8.51 · KD 7.41 · AT+KD 7.51 · teacher (WRN-16-2) 6.31. Runtime: a full run has not
been timed yet (see benchmarks/RESULTS.md for measured step throughput).

KD uses the reference code's 2017 form (``loss.kd.legacy=True``: 2/C times today's KL term), the
one the paper's numbers came from; ``--config.loss.kd.legacy=False`` for today's. BN scales start
from U(0, 1) as in the reference CIFAR code.
"""

from at_jax import recipes

TEACHER_WORKDIR = "runs/cifar10/wrn-16-2"


def get_config(method: str = "student"):
    config = recipes.base_config()
    return recipes.table1_recipe(config, method, TEACHER_WORKDIR, legacy_kd=True)
