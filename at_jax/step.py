"""The train step: ``train_step(state, batch, teacher_variables) -> (state, metrics)``.

One jitted program per run does augmentation (in-memory data) or normalisation (streamed data),
the teacher's forward pass in eval mode, the student's forward pass with sown activations, every
loss term, and the SGD update. The teacher's variables are an argument of the program, not
constants captured by it.

Batches come in two forms, both global arrays sharded over the ``data`` axis of the mesh:

* streamed (:mod:`at_jax.data.pipeline`): ``{"image": uint8 (B, H, W, C), "label": (B,)}``,
  already cropped and flipped on the host; every seed sees the same batch;
* in memory (:mod:`at_jax.data.memory`): ``{"index": int32 (S, B), "pool_image": uint8
  (N, H, W, C), "pool_label": (N,)}`` — the step gathers seed ``s``'s examples ``index[s]`` from
  the dataset held on the devices and augments them (reflect-pad crop, flip) in the program.

Independent seeds are trained together: every array of the train state has a leading seed axis
and the step maps over it (:func:`at_jax.seeds.map_seeds`, ``config.num_seeds``). ``metrics``
are per-seed sums over the batch (every loss term by name, top-1/top-5 errors and the example
count) for the loop to accumulate on the device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from at_jax import finetune, losses, objective
from at_jax.data import augment as aug
from at_jax.data.catalog import STREAMED
from at_jax.metrics import error_counts
from at_jax.models import forward, get_model
from at_jax.seeds import SEED_STRATEGIES, make_key, map_seeds
from at_jax.sharding import data_mesh, replicated, sharded

__all__ = [
    "Step",
    "TrainState",
    "build_model",
    "build_optimizer",
    "lr_schedule",
    "base_lr",
    "compute_dtype",
    "DTYPES",
    "BN_MODES",
]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Batch norm in the input-gradient pass of the gradient terms (the paper's open question):
# "batch_stats" — the training forward itself (batch statistics; running statistics updated
# once); "frozen" — a separate forward with the running statistics (eval-mode BN).
BN_MODES = ("batch_stats", "frozen")


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any  # {'student': ..., 'terms': {term name: its params}}
    batch_stats: Any  # the student's BN statistics ({} without BN)
    opt_state: Any
    rng: jax.Array  # raw uint32 key data (checkpointable)


def compute_dtype(config) -> Any:
    if config.dtype not in DTYPES:
        raise ValueError(f"config.dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
    return DTYPES[config.dtype]


def build_model(config, num_classes: int) -> nn.Module:
    overrides = dict(config.get("model_overrides", {}))
    if config.get("freeze", {}).get("batch_norm", False):
        overrides["frozen_batch_norm"] = True
    return get_model(
        config.model, num_classes=num_classes, dtype=compute_dtype(config), **overrides
    )


def base_lr(config) -> float:
    """``optimizer.lr``, scaled by ``batch_size / optimizer.lr_batch_size`` when that is set."""
    opt = config.optimizer
    reference = opt.get("lr_batch_size", 0)
    if reference < 0:
        raise ValueError(f"config.optimizer.lr_batch_size must be >= 0, got {reference}")
    return opt.lr * config.batch_size / reference if reference else opt.lr


def lr_schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """The reference's step schedule: ``lr × decay_factor`` at each epoch in ``lr_decay_epochs``."""
    opt = config.optimizer
    boundaries = {int(e) * steps_per_epoch: opt.lr_decay_factor for e in opt.lr_decay_epochs}
    return optax.piecewise_constant_schedule(base_lr(config), boundaries)


def build_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD as PyTorch's: weight decay added to the gradient, then (non-Nesterov) momentum."""
    opt = config.optimizer
    if opt.name != "sgd":
        raise ValueError(f"config.optimizer.name must be 'sgd', got {opt.name!r}")
    return optax.chain(
        optax.add_decayed_weights(opt.weight_decay) if opt.weight_decay else optax.identity(),
        optax.sgd(
            lr_schedule(config, steps_per_epoch),
            momentum=opt.momentum or None,
            nesterov=opt.nesterov,
        ),
    )


class Step:
    """What is fixed for a run (models, objective, optimizer, mesh); builds its jitted steps.

    ``teacher_model`` runs in eval mode on ``teacher_variables``, which every call of
    :attr:`train_step` receives as an argument (here they are only used for shapes).
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        num_classes: int,
        image_shape: tuple,
        mean,
        std,
        steps_per_epoch: int,
        teacher_model: Optional[nn.Module] = None,
        teacher_variables: Any = None,
        mesh: Optional[Mesh] = None,
        init_variables: Any = None,
    ):
        self.config = config
        self.num_seeds = int(config.num_seeds)
        if self.num_seeds < 1:
            raise ValueError(f"config.num_seeds must be >= 1, got {config.num_seeds}")
        self.model = build_model(config, num_classes)
        self.dtype = compute_dtype(config)
        self.streamed = config.data.name in STREAMED
        self.loss_spec = dict(config.loss)
        self.objective = objective.make_objective(self.loss_spec)
        if objective.needs_teacher(self.loss_spec) and teacher_model is None:
            raise ValueError(
                "the loss uses a teacher term (at/kd/factt/...) but no teacher is set: "
                "set config.teacher.workdir to a trained teacher's workdir"
            )
        self.teacher_model = teacher_model
        self.mean, self.std = tuple(mean), tuple(std)
        self.image_shape = tuple(image_shape)
        self.steps_per_epoch = steps_per_epoch
        self.schedule = lr_schedule(config, steps_per_epoch)
        self.mesh = mesh or data_mesh()
        self.bn_mode = config.get("gradient", {}).get("bn_mode", "batch_stats")
        if self.bn_mode not in BN_MODES:
            raise ValueError(
                f"config.gradient.bn_mode must be one of {BN_MODES}, got {self.bn_mode!r}"
            )
        dummy = jnp.zeros((2, *self.image_shape), self.dtype)
        # the student's variables as shapes ({"params", "batch_stats"})
        self.variable_shapes = shapes = jax.eval_shape(self.model.init, jax.random.key(0), dummy)
        self.frozen = finetune.frozen_paths(config, shapes)
        self.tx = finetune.optimizer(build_optimizer(config, steps_per_epoch), self.frozen)
        # config.init_from: the variables that start every seed (a replaced classifier aside)
        self.init_variables = init_variables
        self.replaced = (
            set()
            if init_variables is None
            else finetune.plan(
                shapes, init_variables, config.model, num_classes, config.get("init_from", "")
            )
        )
        self._student_shapes = jax.eval_shape(lambda v: forward(self.model, v, dummy)[1], shapes)
        self._teacher_shapes = (
            {}
            if teacher_model is None
            else jax.eval_shape(lambda v: forward(teacher_model, v, dummy)[1], teacher_variables)
        )
        self.term_modules = objective.term_modules(
            self.loss_spec, self._student_shapes, self._teacher_shapes
        )

    def attention_pairs(self) -> Optional[Any]:
        """The transfer points at which to measure the attention distance to the teacher: the
        AT term's pairs when it is on, else ``"groups"``; None without a teacher or when the
        two networks cannot be paired (their group counts differ)."""
        if self.teacher_model is None:
            return None
        active = objective.validate_terms(self.loss_spec)
        pairs = active.get("at", {}).get("pairs", "groups")
        try:
            losses.pair_activations(self._student_shapes, self._teacher_shapes, pairs)
        except ValueError:
            return None
        return pairs

    # ------------------------------------------------------------------ state

    def init_single(self, key: jax.Array, pretrained: Any = None) -> TrainState:
        model_key, terms_key, rng = jax.random.split(make_key(key), 3)
        dummy = jnp.zeros((2, *self.image_shape), self.dtype)
        variables: Any = self.model.init(model_key, dummy)
        if pretrained is not None:
            variables = finetune.merge(variables, pretrained, self.replaced)
        acts = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self._student_shapes)
        terms = {
            name: module.init(jax.random.fold_in(terms_key, i), acts).get("params", {})
            for i, (name, module) in enumerate(sorted(self.term_modules.items()))
        }
        params = {"student": variables["params"], "terms": terms}
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=self.tx.init(params),
            rng=jax.random.key_data(rng),
        )

    def seed_keys(self) -> jax.Array:
        """Raw key data, one row per seed."""
        return jnp.stack(
            [
                jax.random.key_data(make_key(int(self.config.seed) + s))
                for s in range(self.num_seeds)
            ]
        )

    def init_state(self) -> TrainState:
        """Train state with a leading seed axis, replicated over the mesh (initialised per seed
        as the step computes them: see :meth:`seed_strategy`)."""
        init = map_seeds(self.init_single, self.num_seeds, self.seed_strategy(), (0, None))
        pretrained = self.init_variables
        if pretrained is not None:
            # host copies first: a global (multi-process) array is built from the same values
            pretrained = jax.device_put(jax.device_get(pretrained), self.replicated)
        return jax.jit(init, out_shardings=self.replicated)(self.seed_keys(), pretrained)

    @property
    def replicated(self) -> jax.sharding.NamedSharding:
        return replicated(self.mesh)

    # ------------------------------------------------------------------ the step

    def student_fn(self, params, batch_stats, train: bool, dropout_key=None) -> Callable:
        """``x -> (logits, activations, new_batch_stats)`` of the student (``dropout_key``: the
        dropout masks in train mode, for models with dropout)."""
        variables = {"params": params["student"]}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        rngs = {"dropout": dropout_key} if train and dropout_key is not None else None
        return lambda x: forward(self.model, variables, x, train=train, rngs=rngs)

    def _bound_term_modules(self, params) -> dict[str, Callable]:
        return {
            name: functools.partial(module.apply, {"params": params["terms"][name]})
            for name, module in self.term_modules.items()
        }

    def _outputs(self, params, batch_stats, teacher_variables, images, labels, step, key):
        """Student (train mode) and teacher (eval mode) forward passes -> StepOutputs.

        The input-gradient pass of the gradient terms (``student_fn``) sees the same dropout
        masks as the training forward (``key``), and batch norm as ``config.gradient.bn_mode``."""
        s_logits, s_acts, new_stats = self.student_fn(params, batch_stats, True, key)(images)
        gradient_pass = self.student_fn(params, batch_stats, self.bn_mode == "batch_stats", key)
        t_logits, t_acts, teacher_fn = None, {}, None
        teacher = self.teacher_model
        if teacher is not None:

            def teacher_fn(x):
                return forward(teacher, teacher_variables, x)[0]

            t_logits, t_acts, _ = forward(teacher, teacher_variables, images)
        out = objective.StepOutputs(
            images=images,
            labels=labels,
            student_logits=s_logits,
            student_acts=s_acts,
            teacher_logits=t_logits,
            teacher_acts=t_acts,
            student_fn=lambda x: gradient_pass(x)[0],
            teacher_fn=teacher_fn,
            term_modules=self._bound_term_modules(params),
            weight_scale=self.schedule(step) / base_lr(self.config),
            epoch=step // self.steps_per_epoch + 1,
        )
        return out, new_stats

    def prepare_batch(self, batch: dict, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Normalised training images and labels of one seed's batch (see the module doc)."""
        if "index" in batch:
            idx = batch["index"]
            images = aug.augment(
                batch["pool_image"][idx],
                key,
                self.mean,
                self.std,
                crop_pad=self.config.data.augment.crop_pad,
                flip=self.config.data.augment.flip,
                dtype=self.dtype,
            )
            labels = batch["pool_label"][idx]
        else:
            images = aug.normalize(batch["image"], self.mean, self.std, self.dtype)
            labels = batch["label"]
        images = jax.lax.with_sharding_constraint(images, sharded(self.mesh))
        return images, labels

    def train_single(
        self, state: TrainState, batch: dict, teacher_variables
    ) -> tuple[TrainState, dict]:
        """One seed's step (no seed axis)."""
        key = jax.random.fold_in(make_key(state.rng), state.step)
        images, labels = self.prepare_batch(batch, key)

        def loss_fn(params):
            out, new_stats = self._outputs(
                params,
                state.batch_stats,
                teacher_variables,
                images,
                labels,
                state.step,
                jax.random.fold_in(key, 1),
            )
            loss, measurements = self.objective(out)
            return loss, (measurements, new_stats, out.student_logits)

        (_loss, (measurements, new_stats, logits)), grads = jax.value_and_grad(
            loss_fn, has_aux=True
        )(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=new_stats if new_stats is not None else {},
            opt_state=opt_state,
        )
        batch_size = jnp.asarray(labels.shape[0], jnp.float32)
        metrics = {
            f"train/{k}": v.astype(jnp.float32) * batch_size for k, v in measurements.items()
        }
        metrics.update({f"train/{k}": v for k, v in error_counts(logits, labels).items()})
        if self.streamed:  # broken images replaced in this batch (config.data.on_bad_image)
            skipped = batch.get("skipped_count", jnp.zeros((), jnp.int32))
            metrics["train/skipped_images"] = jnp.sum(skipped).astype(jnp.float32)
        return new_state, metrics

    def seed_strategy(self) -> str:
        """How the seeds of one program are computed: ``config.seed_strategy``, where "auto" is
        "unroll" on CPU (``jax.vmap`` turns per-seed convolutions into grouped ones, which
        XLA:CPU runs slowly; one step per seed in the same program keeps every core busy) and
        "vmap" elsewhere. The "rbg" PRNG draws differently under ``vmap``, so each strategy is
        deterministic on its own; unrolled, seed ``s`` of a run is exactly the single-seed run
        with ``config.seed + s``."""
        strategy = self.config.get("seed_strategy", "auto")
        if strategy not in SEED_STRATEGIES:
            raise ValueError(
                f"config.seed_strategy must be one of {SEED_STRATEGIES}, got {strategy!r}"
            )
        if strategy == "auto":
            return "unroll" if self.mesh.devices.flat[0].platform == "cpu" else "vmap"
        return strategy

    def _train_step(self, state, batch, teacher_variables):
        axes = {k: (0 if k == "index" else None) for k in batch}
        return map_seeds(self.train_single, self.num_seeds, self.seed_strategy(), (0, axes, None))(
            state, batch, teacher_variables
        )

    @functools.cached_property
    def train_step(self) -> jax.stages.Wrapped:
        """``jit((state, batch, teacher_variables) -> (state, metrics))``, donating the state.

        ``metrics``: per-seed sums over the batch, ``train/<term>`` for every loss term and
        ``train/loss``, ``train/errors``, ``train/top5_errors``, ``train/count``."""
        return jax.jit(self._train_step, donate_argnums=0)

    def metric_names(self) -> list[str]:
        names = [
            *list(objective.validate_terms(self.loss_spec)),
            "loss",
            "errors",
            "top5_errors",
            "count",
        ]
        if self.streamed:
            names.append("skipped_images")
        return [f"train/{n}" for n in names]

    def empty_sums(self) -> dict[str, jax.Array]:
        """Zeroed per-seed metric sums, replicated over the mesh."""
        zeros = {k: np.zeros((self.num_seeds,), np.float32) for k in self.metric_names()}
        return jax.device_put(zeros, self.replicated)
