"""Train-step benchmark: one JSON line with images/s of the whole jitted AT step.

    python -m at_jax.bench --student wrn-16-1 --teacher wrn-16-2 --method at --batch 128 --steps 50

Times steady-state steps after compilation (``compile_s`` reported separately) of the real step:
on-device augmentation of in-memory uint8 data, teacher forward (eval mode), student
forward/backward, every loss term, SGD update. ``--seeds K`` trains K students in one program
(images_per_s counts all of them). The teacher is randomly initialised: speed does not depend on
its weights.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from at_jax import devices, trainer as trainer_lib
from at_jax.models import get_model
from at_jax.data import CIFAR_MEAN, CIFAR_STD
from configs import default, methods

METHODS = {
    "ce": "student", "at": "at", "kd": "kd", "at_kd": "at_kd", "factt": "factt",
    "grad_at": None, "min_l2": None, "symmetry": None,
}

FLAGS = flags.FLAGS
flags.DEFINE_string("student", "wrn-16-1", "Student model name.")
flags.DEFINE_string("teacher", "wrn-16-2", "Teacher model name (unused for --method ce).")
flags.DEFINE_enum("method", "at", list(METHODS), "Objective to time.")
flags.DEFINE_integer("batch", 128, "Global batch size.")
flags.DEFINE_integer("steps", 50, "Timed steps (after one warm-up step).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_integer("seeds", 1, "Independent students trained in one program (vmap).")
flags.DEFINE_integer("image_size", 32, "Input height and width.")
flags.DEFINE_integer("dataset_size", 4096, "Synthetic in-memory training images.")


def bench_config(method: str, student: str, batch: int, dtype: str, seeds: int):
    config = default.get_config()
    if METHODS[method] is not None:
        methods.apply_method(config, METHODS[method], "")
    else:
        config.loss[method].weight = 1.0
    config.model = student
    config.batch_size = batch
    config.dtype = dtype
    config.num_seeds = seeds
    return config


def run(method, student, teacher_name, batch, steps, dtype="float32", seeds=1, image_size=32,
        dataset_size=4096) -> dict:
    config = bench_config(method, student, batch, dtype, seeds)
    shape = (image_size, image_size, 3)
    teacher = None
    if method != "ce" and method not in ("min_l2", "symmetry"):
        t_model = get_model(teacher_name, num_classes=10)
        t_vars = t_model.init(jax.random.key(1), jnp.zeros((1,) + shape))
        teacher = trainer_lib.Teacher(variables=t_vars, model=t_model)
    tr = trainer_lib.Trainer(config, 10, shape, CIFAR_MEAN, CIFAR_STD, dataset_size // batch,
                             teacher)
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.integers(0, 256, (dataset_size,) + shape, dtype=np.uint8),
                            tr.replicated)
    labels = jax.device_put(rng.integers(0, 10, dataset_size).astype(np.int32), tr.replicated)
    idx = [jax.device_put(rng.integers(0, dataset_size, (seeds, batch)).astype(np.int32),
                          tr.batch_sharded) for _ in range(8)]
    state, sums = tr.init_state(), tr.empty_sums()
    t0 = time.perf_counter()
    compiled = tr.train_step.lower(state, sums, images, labels, idx[0]).compile()
    compile_s = time.perf_counter() - t0
    state, sums = compiled(state, sums, images, labels, idx[0])
    jax.block_until_ready(sums)
    t0 = time.perf_counter()
    for i in range(steps):
        state, sums = compiled(state, sums, images, labels, idx[i % len(idx)])
    jax.block_until_ready(sums)
    elapsed = time.perf_counter() - t0
    return {"images_per_s": steps * batch * seeds / elapsed, "step_ms": 1000 * elapsed / steps,
            "compile_s": compile_s, "device": jax.devices()[0].device_kind,
            "num_devices": len(jax.devices()), "method": method, "student": student,
            "teacher": teacher_name if teacher else None, "batch": batch, "dtype": dtype,
            "seeds": seeds, "steps": steps, "image_size": image_size}


def main(argv):
    del argv
    devices.use_cpu_cores(FLAGS.batch)
    print(json.dumps(run(FLAGS.method, FLAGS.student, FLAGS.teacher, FLAGS.batch, FLAGS.steps,
                         FLAGS.dtype, FLAGS.seeds, FLAGS.image_size, FLAGS.dataset_size)))


if __name__ == "__main__":
    app.run(main)
