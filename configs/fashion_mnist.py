"""Fashion-MNIST (28×28 grey, from Debian's dataset-fashion-mnist or TFDS): WRN teachers and
students for every column of the paper's Table 1 and Table 2.

    python -m at_jax.main --config configs/fashion_mnist.py:teacher \
        --workdir runs/fashion_mnist/wrn-16-2
    python -m at_jax.main --config configs/fashion_mnist.py:student \
        --workdir runs/fashion_mnist/wrn-16-1
    python -m at_jax.main --config configs/fashion_mnist.py:at \
        --workdir runs/fashion_mnist/wrn-16-1-at
    (methods: teacher, student, at, factt, kd, at_kd, at_kd_decay, at_fsum, at_fsum2, at_fsum4,
     at_fmax1; the distillation baselines fitnet, sp, cc, vid, rkd, pkt, nst, dkd, ab, fsp,
     ft, crd, crd_kd with RepDistiller's weights — see at_jax/recipes.py and README.md)

Students read their teacher from runs/fashion_mnist/wrn-16-2 (override with
--config.teacher.workdir); other pairs: --config.model=wrn-16-2 with a wrn-40-2 teacher, etc.
Expected: measured numbers for the short schedule are in README.md (make demo); the full
200-epoch recipe is the CIFAR one.

Same recipe as ``cifar10.py``: KD in the reference's 2017 form (``loss.kd.legacy=True``), BN
scales from U(0, 1).
"""

from at_jax import recipes

TEACHER_WORKDIR = "runs/fashion_mnist/wrn-16-2"


def get_config(method: str = "student"):
    config = recipes.base_config()
    config.data.name = "fashion_mnist"
    return recipes.table1_recipe(config, method, TEACHER_WORKDIR, legacy_kd=True)
