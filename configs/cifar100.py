"""CIFAR-100: WRN teachers and students for every column of the paper's Table 1 and Table 2.

    python -m at_jax.main --config configs/cifar100.py:teacher --workdir runs/cifar100/wrn-16-2
    python -m at_jax.main --config configs/cifar100.py:student --workdir runs/cifar100/wrn-16-1
    python -m at_jax.main --config configs/cifar100.py:at      --workdir runs/cifar100/wrn-16-1-at
    (methods: teacher, student, at, factt, kd, at_kd, at_kd_decay, at_fsum, at_fsum2, at_fsum4,
     at_fmax1; the distillation baselines fitnet, sp, cc, vid, rkd, pkt, nst, dkd, ab, fsp,
     ft, crd, crd_kd with RepDistiller's weights — see at_jax/recipes.py and README.md)

RepDistiller's benchmark (its recipe: SGD 0.9, lr 0.05, wd 5e-4, batch 64, 240 epochs, ×0.1 at
150/180/210, KD at T 4; at_jax.distill.methods): METHOD,TEACHER,STUDENT with the reference's
model names, e.g.

    python -m at_jax.main --config configs/cifar100.py:teacher,wrn_40_2,wrn_16_2 \
        --workdir runs/cifar100/repdistiller/wrn_40_2
    python -m at_jax.main --config configs/cifar100.py:crd,wrn_40_2,wrn_16_2 \
        --workdir runs/cifar100/repdistiller/crd-wrn_40_2-wrn_16_2

(methods: teacher, student, kd, at and every baseline; the student reads its teacher from
runs/cifar100/repdistiller/TEACHER).

Students read their teacher from runs/cifar100/wrn-16-2 (override with
--config.teacher.workdir); other pairs: --config.model=wrn-16-2 with a wrn-40-2 teacher, etc.
Expected: peers report (WRN-40-2 → WRN-16-2, 240 epochs) top-1 accuracy: teacher 75.61, student
73.26, KD 74.92, AT 74.08.

KD uses today's form (``loss.kd.legacy=False``, what the CIFAR-100 peers ran); BN scales start
from U(0, 1) as in the reference CIFAR code.
"""

from at_jax import recipes
from at_jax.distill.methods import repdistiller_edits

TEACHER_WORKDIR = "runs/cifar100/wrn-16-2"
REPDISTILLER_TEACHERS = "runs/cifar100/repdistiller"


def get_config(method: str = "student"):
    config = recipes.base_config()
    config.data.name = "cifar100"
    parts = [p.strip() for p in method.split(",")]
    if len(parts) == 1:
        return recipes.table1_recipe(config, method, TEACHER_WORKDIR, legacy_kd=False)
    return repdistiller_config(config, parts, REPDISTILLER_TEACHERS)


def repdistiller_config(config, parts, teachers_dir):
    """``METHOD,TEACHER,STUDENT`` of RepDistiller's benchmark on ``config``'s data; students
    read their teacher from ``teachers_dir/TEACHER``."""
    if len(parts) != 3:
        raise ValueError(
            f"expected METHOD,TEACHER,STUDENT (e.g. crd,wrn_40_2,wrn_16_2), got {','.join(parts)!r}"
        )
    method, teacher, student = parts
    for path, value in repdistiller_edits(method, teacher, student).items():
        recipes.set_path(config, path, value)
    if method not in ("teacher", "student"):
        config.teacher.workdir = f"{teachers_dir}/{teacher}"
    return config
