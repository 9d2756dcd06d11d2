"""CIFAR-100: WRN teachers and students for every column of the paper's Table 1 and Table 2.

    python -m at_jax.main --config configs/cifar100.py:teacher --workdir runs/cifar100/wrn-16-2
    python -m at_jax.main --config configs/cifar100.py:student --workdir runs/cifar100/wrn-16-1
    python -m at_jax.main --config configs/cifar100.py:at      --workdir runs/cifar100/wrn-16-1-at
    (methods: teacher, student, at, factt, kd, at_kd, at_kd_decay, at_fsum, at_fsum2, at_fsum4,
     at_fmax1; the distillation baselines fitnet, sp, cc, vid, rkd, pkt, nst, dkd, ab, fsp,
     ft, crd, crd_kd with RepDistiller's weights — see at_jax/recipes.py and README.md)

Students read their teacher from runs/cifar100/wrn-16-2 (override with
--config.teacher.workdir); other pairs: --config.model=wrn-16-2 with a wrn-40-2 teacher, etc.
Expected: peers report (WRN-40-2 → WRN-16-2, 240 epochs) top-1 accuracy: teacher 75.61, student
73.26, KD 74.92, AT 74.08.

KD uses today's form (``loss.kd.legacy=False``, what the CIFAR-100 peers ran); BN scales start
from U(0, 1) as in the reference CIFAR code.
"""

from at_jax import recipes

TEACHER_WORKDIR = "runs/cifar100/wrn-16-2"


def get_config(method: str = "student"):
    config = recipes.base_config()
    config.data.name = "cifar100"
    return recipes.table1_recipe(config, method, TEACHER_WORKDIR, legacy_kd=False)
