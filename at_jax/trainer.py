"""Train state and the jitted train/eval steps (the loop is in :mod:`at_jax.train`).

Data flows one way: config -> in-memory dataset (on device) -> per-epoch index arrays ->
jitted step (augmentation, teacher forward in eval mode, student forward with sown activations,
loss terms, SGD update, on-device metric sums) -> per-epoch metrics, checkpoints and results.

Independent seeds are trained together: every array of the train state has a leading seed axis
and the step is ``jax.vmap``-ed over it (``config.num_seeds``). The batch axis is sharded over the
``data`` axis of a device mesh; the same program runs on 1 CPU, N GPUs or several hosts.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from at_jax import gradient, losses
from at_jax.data import augment as aug
from at_jax.models import forward, get_model

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# The run's random keys (init, augmentation) use the "rbg" PRNG: XLA compiles it far faster than
# the default threefry (the train-state init of a WRN compiles in ~3-4 s instead of ~10-14 s on
# XLA:CPU). Streams are deterministic for a given JAX version and backend.
PRNG_IMPL = "rbg"


def make_key(seed_or_data) -> jax.Array:
    """A typed PRNG key of :data:`PRNG_IMPL` from an int seed or from raw key data."""
    if isinstance(seed_or_data, int):
        return jax.random.key(seed_or_data, impl=PRNG_IMPL)
    return jax.random.wrap_key_data(seed_or_data, impl=PRNG_IMPL)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any          # {'student': ..., 'adapters': ...}
    batch_stats: Any     # the student's BN statistics ({} without BN)
    opt_state: Any
    rng: jax.Array       # raw uint32 key data (checkpointable)


@flax.struct.dataclass
class Teacher:
    """A fixed (model, variables) pair; runs in eval mode."""
    variables: Any
    model: nn.Module = flax.struct.field(pytree_node=False)


def compute_dtype(config) -> Any:
    if config.dtype not in DTYPES:
        raise ValueError(f"config.dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
    return DTYPES[config.dtype]


def build_model(config, num_classes: int) -> nn.Module:
    overrides = dict(config.get("model_overrides", {}))
    return get_model(config.model, num_classes=num_classes, dtype=compute_dtype(config),
                     **overrides)


def lr_schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """The reference's step schedule: ``lr × decay_factor`` at each epoch in ``lr_decay_epochs``."""
    opt = config.optimizer
    boundaries = {int(e) * steps_per_epoch: opt.lr_decay_factor for e in opt.lr_decay_epochs}
    return optax.piecewise_constant_schedule(opt.lr, boundaries)


def build_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD as PyTorch's: weight decay added to the gradient, then (non-Nesterov) momentum."""
    opt = config.optimizer
    if opt.name != "sgd":
        raise ValueError(f"config.optimizer.name must be 'sgd', got {opt.name!r}")
    return optax.chain(
        optax.add_decayed_weights(opt.weight_decay) if opt.weight_decay else optax.identity(),
        optax.sgd(lr_schedule(config, steps_per_epoch), momentum=opt.momentum or None,
                  nesterov=opt.nesterov))


def _adapter_channels(config, student_acts, teacher_acts) -> dict[str, int]:
    """Student activation -> teacher channels, for F-ActT pairs whose channel counts differ."""
    terms = dict(config.loss)
    if "factt" not in losses.validate_terms(terms):
        return {}
    pairs = losses.pair_activations(student_acts, teacher_acts,
                                    terms["factt"].get("pairs", "groups"))
    return {s: teacher_acts[t].shape[-1] for s, t in pairs
            if student_acts[s].shape[-1] != teacher_acts[t].shape[-1]}


class Trainer:
    """Holds what is fixed for a run (models, objective, optimizer, mesh) and builds its steps."""

    def __init__(self, config: ml_collections.ConfigDict, num_classes: int, image_shape: tuple,
                 mean, std, steps_per_epoch: int, teacher: Optional[Teacher] = None,
                 mesh: Optional[Mesh] = None):
        self.config = config
        self.num_seeds = int(config.num_seeds)
        if self.num_seeds < 1:
            raise ValueError(f"config.num_seeds must be >= 1, got {config.num_seeds}")
        self.model = build_model(config, num_classes)
        self.dtype = compute_dtype(config)
        self.objective = losses.make_objective(dict(config.loss))
        if losses.needs_teacher(dict(config.loss)) and teacher is None:
            raise ValueError("the loss uses a teacher term (at/kd/factt/...) but no teacher is set: "
                             "set config.teacher.workdir to a trained teacher's workdir")
        self.teacher = teacher
        self.mean, self.std = tuple(mean), tuple(std)
        self.image_shape = tuple(image_shape)
        self.steps_per_epoch = steps_per_epoch
        self.schedule = lr_schedule(config, steps_per_epoch)
        self.tx = build_optimizer(config, steps_per_epoch)
        self.mesh = mesh or Mesh(np.asarray(jax.devices()), ("data",))
        self.gradient_options = dict(config.get("gradient", {}))
        dummy = jnp.zeros((2,) + self.image_shape, self.dtype)
        s_shapes = jax.eval_shape(lambda: forward(self.model, self.model.init(
            jax.random.key(0), dummy), dummy)[1])
        t_shapes = {} if teacher is None else jax.eval_shape(
            lambda: forward(teacher.model, teacher.variables, dummy)[1])
        self.adapters = losses.FActTAdapters(_adapter_channels(config, s_shapes, t_shapes))
        self._student_shapes = s_shapes

    # ------------------------------------------------------------------ state

    def init_single(self, key: jax.Array) -> TrainState:
        model_key, adapter_key, rng = jax.random.split(make_key(key), 3)
        dummy = jnp.zeros((2,) + self.image_shape, self.dtype)
        variables = self.model.init(model_key, dummy)
        acts = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self._student_shapes)
        params = {"student": variables["params"],
                  "adapters": self.adapters.init(adapter_key, acts).get("params", {})}
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables.get("batch_stats", {}),
                          opt_state=self.tx.init(params), rng=jax.random.key_data(rng))

    def seed_keys(self) -> jax.Array:
        """Raw key data, one row per seed."""
        return jnp.stack([jax.random.key_data(make_key(int(self.config.seed) + s))
                          for s in range(self.num_seeds)])

    def init_state(self) -> TrainState:
        """Train state with a leading seed axis, replicated over the mesh."""
        init = jax.jit(jax.vmap(self.init_single), out_shardings=self.replicated)
        return init(self.seed_keys())

    def abstract_state(self) -> TrainState:
        return jax.eval_shape(jax.vmap(self.init_single), self.seed_keys())

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch_sharded(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(None, "data"))

    # ------------------------------------------------------------------ steps

    def _student_fn(self, params, batch_stats, train: bool):
        variables = {"params": params["student"]}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        return lambda x: forward(self.model, variables, x, train=train)

    def _outputs(self, params, batch_stats, images, labels, step):
        """Student (train mode) and teacher (eval mode) forward passes -> StepOutputs."""
        s_logits, s_acts, new_stats = self._student_fn(params, batch_stats, True)(images)
        t_logits, t_acts, teacher_fn = None, {}, None
        if self.teacher is not None:
            teacher_fn = lambda x: forward(self.teacher.model, self.teacher.variables, x)  # noqa
            t_logits, t_acts, _ = teacher_fn(images)
        adapted = (self.adapters.apply({"params": params["adapters"]}, s_acts)
                   if self.adapters.channels else None)
        out = losses.StepOutputs(
            images=images, labels=labels, student_logits=s_logits, student_acts=s_acts,
            teacher_logits=t_logits, teacher_acts=t_acts, adapted_acts=adapted,
            weight_scale=self.schedule(step) / self.config.optimizer.lr,
            lazy=gradient.input_gradient_quantities(
                lambda p, bs, train: self._student_fn(p, bs, train), params, batch_stats,
                teacher_fn, images, labels, **self.gradient_options))
        return out, new_stats

    def _train_single(self, state: TrainState, sums, train_images, train_labels, idx):
        key = jax.random.fold_in(make_key(state.rng), state.step)
        images = aug.augment(train_images[idx], key, self.mean, self.std,
                             crop_pad=self.config.data.augment.crop_pad,
                             flip=self.config.data.augment.flip, dtype=self.dtype)
        images = jax.lax.with_sharding_constraint(images, NamedSharding(self.mesh, P("data")))
        labels = train_labels[idx]

        def loss_fn(params):
            out, new_stats = self._outputs(params, state.batch_stats, images, labels, state.step)
            loss, measurements = self.objective(out)
            return loss, (measurements, new_stats, out.student_logits)

        (loss, (measurements, new_stats, logits)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params,
                                  batch_stats=new_stats if new_stats is not None else {},
                                  opt_state=opt_state)
        batch = jnp.asarray(labels.shape[0], jnp.float32)
        step_metrics = {f"train/{k}": v.astype(jnp.float32) * batch for k, v in measurements.items()}
        step_metrics["train/errors"] = jnp.sum(jnp.argmax(logits, -1) != labels).astype(jnp.float32)
        step_metrics["train/count"] = batch
        sums = jax.tree.map(jnp.add, sums, step_metrics)
        return new_state, sums

    def empty_sums(self) -> dict[str, jax.Array]:
        """Zeroed per-seed metric sums (one entry per loss term, plus errors and count)."""
        names = list(losses.validate_terms(dict(self.config.loss))) + ["loss"]
        keys = [f"train/{n}" for n in names] + ["train/errors", "train/count"]
        return {k: jnp.zeros((self.num_seeds,), jnp.float32) for k in keys}

    @functools.cached_property
    def train_step(self) -> Callable:
        """jit((state, sums, train_images, train_labels, idx[S, B]) -> (state, sums)), donating
        the state and the sums."""
        step = jax.vmap(self._train_single, in_axes=(0, 0, None, None, 0))
        return jax.jit(step, donate_argnums=(0, 1))

    @functools.cached_property
    def eval_step(self) -> Callable:
        """jit((params, batch_stats, images_u8, labels, mask) -> per-seed error counts)."""
        def single(params, batch_stats, images, labels, mask):
            x = aug.normalize(images, self.mean, self.std, self.dtype)
            logits = self._student_fn(params, batch_stats, False)(x)[0]
            return jnp.sum((jnp.argmax(logits, -1) != labels) * mask)
        return jax.jit(jax.vmap(single, in_axes=(0, 0, None, None, None)))


def global_array(host_array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from data every process holds in full (works single- and multi-host)."""
    return jax.make_array_from_callback(host_array.shape, sharding, lambda idx: host_array[idx])


def eval_batch_size(requested: int, n_examples: int, n_devices: int) -> int:
    """An evaluation batch no larger than needed, split evenly over ``n_devices``."""
    size = min(int(requested), n_examples)
    return max(n_devices, size - size % n_devices)


def evaluate_teacher(teacher: Teacher, images, labels, mean, std, batch_size: int = 1000,
                     mesh: Optional[Mesh] = None) -> float:
    """Test error (%) of a fixed model in eval mode (batches sharded over ``mesh``, if given)."""
    @jax.jit
    def errors(x, y, mask):
        logits = teacher.model.apply(teacher.variables, aug.normalize(x, mean, std), train=False)
        return jnp.sum((jnp.argmax(logits, -1) != y) * mask)

    if mesh is not None:
        batch_size = eval_batch_size(batch_size, len(labels), mesh.size)
    return 100.0 * batched_errors(errors, images, labels, batch_size, mesh) / len(labels)


def batched_errors(errors_fn, images, labels, batch_size, mesh: Optional[Mesh] = None):
    """Sum ``errors_fn(x, y, mask)`` over batches of ``batch_size``; the last one is padded (and
    masked) so that every call has the same shape. With a ``mesh``, batches are sharded over its
    ``data`` axis (``batch_size`` must then be a multiple of the mesh size)."""
    total = 0
    n = len(labels)
    sharding = NamedSharding(mesh, P("data")) if mesh is not None else None
    for start in range(0, n, batch_size):
        x, y = images[start:start + batch_size], labels[start:start + batch_size]
        mask = np.ones(len(y), np.float32)
        if len(y) < batch_size:
            pad = batch_size - len(y)
            x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
            y, mask = np.pad(y, (0, pad)), np.pad(mask, (0, pad))
        if sharding is not None:
            x, y, mask = (global_array(a, sharding) for a in (x, y, mask))
        total = total + errors_fn(x, y, mask)
    return np.asarray(total)
