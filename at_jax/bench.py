"""Train-step benchmark: one JSON line with images/s of the whole jitted AT step.

    python -m at_jax.bench --student wrn-16-1 --teacher wrn-16-2 --method at --batch 128 --steps 50
    python -m at_jax.bench --student vit-tiny/4 --teacher vit-tiny/4 --method vit_copy --batch 128

The distillation baselines (``fitnet``, ``sp``, ``cc``, ``vid``, ``rkd``, ``pkt``, ``nst``,
``dkd``, ``ab``, ``fsp``, ``ft``, ``crd``, ``crd_kd``) time the student's step with the
method's term as its config has it (AB and FSP: the term that their first stage trains; FT:
its main stage; CRD: with its memory of ``--dataset_size`` rows on the device).

ViT methods (Li et al. 2024): ``vit_copy`` (the student's blocks 0..depth−4 use the teacher's
attention), ``vit_distill`` (the ``atd`` term, weight 3, end_layer −3) and ``vit_scratch`` (the
student alone), each with MAE's optimiser (AdamW, warm-up + cosine); the PyTorch step of the same
shapes is ``benchmarks/torch_vit_reference.py``.

Times steady-state steps after compilation (``compile_s`` and the first step, ``first_step_s``,
reported separately; ``peak_memory_bytes``: the device's peak, where it reports one) of the real
step:
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

from at_jax import devices, recipes, step as step_lib
from at_jax.compilation_cache import default_cache_dir, use_compilation_cache
from at_jax.data import CIFAR_MEAN, CIFAR_STD, DataSpec
from at_jax.distill import REFERENCE_WEIGHTS
from at_jax.errors import one_line_errors
from at_jax.models import get_model
from at_jax.sharding import sharded
from at_jax.terms import TermData

__all__ = ["run", "bench_config", "main"]

METHODS = {
    "ce": "student",
    "at": "at",
    "kd": "kd",
    "at_kd": "at_kd",
    "factt": "factt",
    "grad_at": None,
    "min_l2": None,
    "symmetry": None,
    "vit_scratch": "scratch",
    "vit_copy": "copy",
    "vit_distill": "distill",
    # the distillation baselines (issue 26): the student's CE plus the term, as their configs
    **{name: name for name in REFERENCE_WEIGHTS},
    "crd_kd": "crd_kd",
}

FLAGS = flags.FLAGS
flags.DEFINE_string("student", "wrn-16-1", "Student model name.")
flags.DEFINE_string("teacher", "wrn-16-2", "Teacher model name (unused for --method ce).")
flags.DEFINE_enum("method", "at", list(METHODS), "Objective to time.")
flags.DEFINE_integer("batch", 128, "Global batch size.")
flags.DEFINE_integer("steps", 50, "Timed steps (after one warm-up step).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_integer("seeds", 1, "Independent students trained in one program.")
flags.DEFINE_enum(
    "seed_strategy",
    "auto",
    ["auto", "vmap", "unroll"],
    "How the seeds share the program (auto: unroll on CPU, vmap elsewhere).",
)
flags.DEFINE_integer("image_size", 32, "Input height and width.")
flags.DEFINE_integer("dataset_size", 4096, "Synthetic in-memory training images.")
flags.DEFINE_string(
    "compilation_cache_dir",
    default_cache_dir(),
    "JAX's persistent compilation cache ('' = off; compile_s is then a load).",
)


def bench_config(
    method: str, student: str, batch: int, dtype: str, seeds: int, seed_strategy: str = "auto"
):
    config = recipes.base_config()
    named = METHODS[method]
    if method.startswith("vit_"):
        config.optimizer.update(
            name="adamw", schedule="warmup_cosine", warmup_epochs=0.5, cosine_epochs=1
        )
        config.attention_copy.target = "attention" if named == "copy" else ""
        config.loss.atd.weight = 3.0 if named == "distill" else 0.0
    elif named is not None:
        recipes.apply_method(config, named, "")
    else:
        config.loss[method].weight = 1.0
    config.model = student
    config.batch_size = batch
    config.dtype = dtype
    config.num_seeds = seeds
    config.seed_strategy = seed_strategy
    return config


def run(
    method,
    student,
    teacher_name,
    batch,
    steps,
    dtype="float32",
    seeds=1,
    image_size=32,
    dataset_size=4096,
    seed_strategy="auto",
    overrides=None,
) -> dict:
    """Time the step (see the module doc); ``overrides``: model fields of both networks (e.g. a
    smaller ViT: ``{"depth": 4}``)."""
    config = bench_config(method, student, batch, dtype, seeds, seed_strategy)
    config.model_overrides = dict(overrides or {})
    shape = (image_size, image_size, 3)
    t_model, t_vars = None, None
    if method not in ("ce", "min_l2", "symmetry", "vit_scratch"):
        t_model = get_model(teacher_name, num_classes=10, **dict(overrides or {}))
        # one compiled program: op by op, each of init's operations would compile on its own
        t_vars = jax.jit(t_model.init)(jax.random.key(1), jnp.zeros((1, *shape)))
    spec = DataSpec(10, shape, CIFAR_MEAN, CIFAR_STD)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, dataset_size).astype(np.int32)
    st = step_lib.Step.from_config(
        config,
        spec,
        dataset_size // batch,
        teacher_model=t_model,
        teacher_variables=t_vars,
        term_data=TermData(dataset_size, labels),  # CRD's memory: one row per image
    )
    t_vars = jax.device_put(t_vars, st.replicated)
    batches = _batches(st, rng, labels, shape, batch, seeds)
    state = st.init_state()
    t0 = time.perf_counter()
    compiled = st.train_step.lower(state, batches[0], t_vars).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, metrics = compiled(state, batches[0], t_vars)
    jax.block_until_ready(metrics)
    first_step_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        state, metrics = compiled(state, batches[i % len(batches)], t_vars)
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - t0
    return {
        "images_per_s": steps * batch * seeds / elapsed,
        "step_ms": 1000 * elapsed / steps,
        "compile_s": compile_s,
        "first_step_s": first_step_s,
        "peak_memory_bytes": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use"),
        "device": jax.devices()[0].device_kind,
        "num_devices": len(jax.devices()),
        "method": method,
        "student": student,
        "teacher": teacher_name if t_model else None,
        "batch": batch,
        "dtype": dtype,
        "seeds": seeds,
        "seed_strategy": st.seed_strategy() if seeds > 1 else "single",
        "steps": steps,
        "image_size": image_size,
    }


def _batches(st, rng, labels, shape, batch, seeds, count=8) -> list[dict]:
    """``count`` in-memory batches of random indices into a random uint8 pool with ``labels``."""
    pool = {
        "pool_image": jax.device_put(
            rng.integers(0, 256, (len(labels), *shape), dtype=np.uint8), st.replicated
        ),
        "pool_label": jax.device_put(labels, st.replicated),
    }
    index_sharding = sharded(st.mesh, None, "data")
    return [
        {
            "index": jax.device_put(
                rng.integers(0, len(labels), (seeds, batch)).astype(np.int32), index_sharding
            ),
            **pool,
        }
        for _ in range(count)
    ]


def main(argv):
    del argv
    devices.use_cpu_cores(FLAGS.batch)
    cache = use_compilation_cache(FLAGS.compilation_cache_dir)
    with one_line_errors():  # an unknown model name, a batch that the devices cannot split
        result = run(
            FLAGS.method,
            FLAGS.student,
            FLAGS.teacher,
            FLAGS.batch,
            FLAGS.steps,
            FLAGS.dtype,
            FLAGS.seeds,
            FLAGS.image_size,
            FLAGS.dataset_size,
            FLAGS.seed_strategy,
        )
    result["compilation_cache"] = cache  # compile_s is a cache load when this one had the step
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
