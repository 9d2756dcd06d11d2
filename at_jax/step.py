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
from collections.abc import Mapping
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from at_jax import finetune, objective, optim
from at_jax.data import augment as aug
from at_jax.data.spec import DataSpec
from at_jax.gradient import BN_MODES
from at_jax.metrics import error_counts
from at_jax.mixing import regularize
from at_jax.models.build import DTYPES, build_model, compute_dtype
from at_jax.networks import Networks, init_states
from at_jax.preprocess import normalize
from at_jax.seeds import Seeds, make_key, map_seeds, resolve_strategy
from at_jax.sharding import data_mesh, replicated, sharded

__all__ = [
    "Step",
    "TrainState",
    "prepare_batch",
    "example_index",
    "StageStart",
    "init_single",
    "train_single",
    "step_metrics",
    "build_model",
    "build_optimizer",
    "lr_schedule",
    "base_lr",
    "compute_dtype",
    "DTYPES",
    "BN_MODES",
]


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any  # {'student': ..., 'terms': {term name: its params}}
    batch_stats: Any  # the student's BN statistics ({} without BN)
    opt_state: Any
    rng: jax.Array  # raw uint32 key data (checkpointable)
    # the state of the terms that keep one, by term name (CRD's memory banks); not trained
    term_state: Any = flax.struct.field(default_factory=dict)


# Their home is at_jax.optim (taking config.optimizer); these keep the whole-config calls working.
def base_lr(config: Any) -> float:
    """:func:`at_jax.optim.base_lr` of ``config.optimizer`` and ``config.batch_size``."""
    return optim.base_lr(config.optimizer, config.batch_size)


def lr_schedule(config: Any, steps_per_epoch: int) -> optax.Schedule:
    """:func:`at_jax.optim.lr_schedule` of ``config.optimizer`` and ``config.batch_size``."""
    return optim.lr_schedule(config.optimizer, config.batch_size, steps_per_epoch)


def build_optimizer(config: Any, steps_per_epoch: int) -> optax.GradientTransformation:
    """:func:`at_jax.optim.build_optimizer` of ``config.optimizer`` and ``config.batch_size``."""
    return optim.build_optimizer(config.optimizer, config.batch_size, steps_per_epoch)


def prepare_batch(
    batch: dict, key: jax.Array, spec: DataSpec, augment: Mapping, dtype: Any, mesh: Mesh
) -> tuple[jax.Array, jax.Array]:
    """Normalised training images and labels of one seed's batch (see the module doc):
    in memory, gathered from the pool and augmented (``augment``: ``config.data.augment``)."""
    if "index" in batch:
        idx = batch["index"]
        images = aug.augment(
            batch["pool_image"][idx],
            key,
            spec.mean,
            spec.std,
            crop_pad=augment["crop_pad"],
            flip=augment["flip"],
            pad_mode=augment.get("crop_pad_mode", "reflect"),
            dtype=dtype,
        )
        labels = batch["pool_label"][idx]
    else:
        images = normalize(batch["image"], spec.mean, spec.std, dtype)
        labels = batch["label"]
    return jax.lax.with_sharding_constraint(images, sharded(mesh)), labels


def step_metrics(
    measurements: Mapping[str, jax.Array], logits: jax.Array, labels: jax.Array, batch: dict
) -> dict[str, jax.Array]:
    """One seed's metric sums over the batch: every term's value, the errors and the count, and
    (batches that carry it) the broken images replaced in it."""
    batch_size = jnp.asarray(labels.shape[0], jnp.float32)
    metrics = {f"train/{k}": v.astype(jnp.float32) * batch_size for k, v in measurements.items()}
    metrics.update({f"train/{k}": v for k, v in error_counts(logits, labels).items()})
    if "skipped_count" in batch:  # config.data.on_bad_image="skip", streamed
        metrics["train/skipped_images"] = jnp.sum(batch["skipped_count"]).astype(jnp.float32)
    return metrics


class Step:
    """What is fixed for a run (networks, objective, optimizer, seeds, mesh); builds its jitted
    steps. :meth:`from_config` takes each part from a run's config.

    Keyword arguments only: ``networks`` (:class:`~at_jax.networks.Networks`: the student, the
    teacher and the term modules), ``steps_per_epoch``, ``optimizer`` (``config.optimizer``)
    with the global ``batch_size``, ``seeds`` (:class:`~at_jax.seeds.Seeds`), ``augment``
    (``config.data.augment``), ``freeze`` (``config.freeze``), ``init_variables`` (the
    variables of ``config.init_from``, named ``init_from``), ``mesh``, ``start`` (a two-stage
    run's main stage: :class:`StageStart`, each seed from its first stage). The teacher runs in
    eval mode on the ``teacher_variables`` that every call of :attr:`train_step` receives.
    """

    def __init__(
        self,
        *,
        networks: Networks,
        steps_per_epoch: int,
        optimizer: Any,
        batch_size: int,
        seeds: Optional[Seeds] = None,
        augment: Optional[Mapping] = None,
        freeze: Any = None,
        init_variables: Any = None,
        init_from: str = "",
        model_name: str = "the model",
        mesh: Optional[Mesh] = None,
        start: Optional[StageStart] = None,
    ):
        seeds = seeds or Seeds()
        self.networks, self.seeds, self.num_seeds = networks, seeds, seeds.count
        self.model, self.teacher_model = networks.model, networks.teacher_model
        self.spec, self.dtype, self.steps_per_epoch = networks.spec, networks.dtype, steps_per_epoch
        self.term_modules, self.variable_shapes = networks.term_modules, networks.variable_shapes
        self.objective = objective.make_stateful_objective(networks.terms)
        self.augment = dict(augment or {"crop_pad": 0, "flip": False})
        self.schedule = optim.lr_schedule(optimizer, batch_size, steps_per_epoch)
        self.lr0 = optim.base_lr(optimizer, batch_size)
        self.mesh = mesh or data_mesh()
        self.frozen = finetune.frozen_paths(
            freeze, self.variable_shapes, model_name, self.spec.class_count()
        )
        self.start, frozen_terms = start, (start.frozen_terms if start else set())
        self.tx = optim.build_optimizer(
            optimizer, batch_size, steps_per_epoch, self.frozen, frozen_terms
        )
        self.init_variables = init_variables  # they start every seed (a new classifier aside)
        self.replaced = _replaced(self, init_variables, model_name, init_from)

    @classmethod
    def from_config(
        cls,
        config: Any,
        spec: DataSpec,
        steps_per_epoch: int,
        *,
        terms: Optional[Mapping] = None,
        teacher_model: Optional[nn.Module] = None,
        teacher_variables: Any = None,
        init_variables: Any = None,
        mesh: Optional[Mesh] = None,
        term_data: Optional[objective.TermData] = None,
        start: Optional[StageStart] = None,
    ) -> Step:
        """The step of a run's ``config``; ``terms``: its active terms if checked already
        (:func:`at_jax.recipes.validate_config`), else ``config.loss`` is checked here."""
        networks = Networks.from_config(
            config,
            spec,
            terms,
            teacher_model=teacher_model,
            teacher_variables=teacher_variables,
            term_data=term_data,
        )
        return cls(
            networks=networks,
            steps_per_epoch=steps_per_epoch,
            optimizer=config.optimizer,
            batch_size=int(config.batch_size),
            seeds=Seeds.from_config(config),
            augment=config.data.augment,
            freeze=config.get("freeze", {}),
            init_variables=init_variables,
            init_from=config.get("init_from", ""),
            model_name=config.model,
            mesh=mesh,
            start=start,
        )

    def attention_pairs(self) -> Optional[Any]:
        """:meth:`at_jax.networks.Networks.attention_pairs`."""
        return self.networks.attention_pairs()

    # ------------------------------------------------------------------ state

    def init_single(self, key: jax.Array, pretrained: Any = None, kept: Any = None) -> TrainState:
        """One seed's train state (no seed axis) from its raw key data."""
        return init_single(self, key, pretrained, kept)

    def seed_keys(self) -> jax.Array:
        """Raw key data, one row per seed."""
        first = self.seeds.first
        return jnp.stack([jax.random.key_data(make_key(first + s)) for s in range(self.num_seeds)])

    def init_state(self) -> TrainState:
        """Train state with a leading seed axis, replicated over the mesh (initialised per seed
        as the step computes them: see :meth:`seed_strategy`)."""
        if self.start is not None:  # each seed from the same seed of the first stage
            return self.start.init_state(self)
        init = map_seeds(self.init_single, self.num_seeds, self.seed_strategy(), (0, None))
        pretrained = self.init_variables
        if pretrained is not None:
            # host copies first: a global (multi-process) array is built from the same values
            pretrained = jax.device_put(jax.device_get(pretrained), self.replicated)
        return jax.jit(init, out_shardings=self.replicated)(self.seed_keys(), pretrained)

    @property
    def replicated(self) -> jax.sharding.NamedSharding:
        return replicated(self.mesh)

    def seed_strategy(self) -> str:
        """``seeds.strategy`` on this mesh's platform (:func:`at_jax.seeds.resolve_strategy`)."""
        return resolve_strategy(self.seeds.strategy, self.mesh.devices.flat[0].platform)

    # ------------------------------------------------------------------ the step

    def _train_step(self, state, batch, teacher_variables):
        axes = {k: (0 if k == "index" else None) for k in batch}
        one_seed = functools.partial(train_single, self)
        return map_seeds(one_seed, self.num_seeds, self.seed_strategy(), (0, axes, None))(
            state, batch, teacher_variables
        )

    @functools.cached_property
    def train_step(self) -> jax.stages.Wrapped:
        """``jit((state, batch, teacher_variables) -> (state, metrics))``, donating the state.

        ``metrics``: per-seed sums over the batch, ``train/<term>`` for every loss term and
        ``train/loss``, ``train/errors``, ``train/top5_errors``, ``train/count`` (and
        ``train/skipped_images`` with streamed batches)."""
        return jax.jit(self._train_step, donate_argnums=0)

    def empty_sums(self, counts_skipped: bool = False) -> dict[str, jax.Array]:
        """Zeroed per-seed metric sums (one per metric of :attr:`train_step`; with
        ``counts_skipped`` for batches that carry ``skipped_count``), replicated."""
        names = [*self.networks.terms, "loss", "errors", "top5_errors", "count"]
        names += ["skipped_images"] if counts_skipped else []
        zeros = {f"train/{n}": np.zeros((self.num_seeds,), np.float32) for n in names}
        return jax.device_put(zeros, self.replicated)


def _replaced(step: Step, init_variables: Any, model_name: str, init_from: str) -> set:
    """The paths of ``init_variables`` that a fresh classifier replaces (none without them)."""
    if init_variables is None:
        return set()
    return finetune.classifier_paths_to_replace(
        step.variable_shapes, init_variables, model_name, step.spec.class_count(), init_from
    )


def init_single(
    step: Step, key: jax.Array, pretrained: Any = None, kept_terms: Any = None
) -> TrainState:
    """Seed ``key``'s train state for ``step``: the student's variables (``pretrained`` ones
    with a fresh classifier where it was replaced), the term modules' parameters (those of
    ``kept_terms``, ``{term: {module: params}}``, taken over), the terms' state, the optimiser
    state and the seed's random stream."""
    model_key, terms_key, rng = jax.random.split(make_key(key), 3)
    variables, terms = step.networks.init(model_key, terms_key, pretrained, step.replaced)
    for name, modules in (kept_terms or {}).items():
        terms[name] = {**terms[name], **modules}
    params = {"student": variables["params"], "terms": terms}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=step.tx.init(params),
        rng=jax.random.key_data(rng),
        term_state=init_states(step.networks, jax.random.fold_in(terms_key, 1)),
    )


def train_single(step: Step, state: TrainState, batch: dict, teacher_variables: Any) -> tuple:
    """One seed's train step (no seed axis) of ``step``'s run: ``(new_state, metrics)``. Pure:
    jitted and mapped over the seeds by :attr:`Step.train_step`."""
    key = jax.random.fold_in(make_key(state.rng), state.step)
    images, labels = prepare_batch(batch, key, step.spec, step.augment, step.dtype, step.mesh)
    images, targets = regularize(
        jax.random.fold_in(key, 2), images, labels, step.spec.class_count(), step.augment
    )

    def loss_fn(params):
        out, new_stats = step.networks.outputs(
            params,
            state.batch_stats,
            teacher_variables,
            (images, labels),
            jax.random.fold_in(key, 1),
            weight_scale=step.schedule(state.step) / step.lr0,
            epoch=state.step // step.steps_per_epoch + 1,
            targets=targets,  # a mixed batch's soft targets (None otherwise)
            term_states=state.term_state,
            example_index=example_index(batch),
            terms_key=jax.random.fold_in(key, 3),
        )
        loss, measurements, term_state = step.objective(out)
        return loss, (measurements, new_stats, out.student_logits, term_state)

    (_, (measurements, new_stats, logits, term_state)), grads = jax.value_and_grad(
        loss_fn, has_aux=True
    )(state.params)
    updates, opt_state = step.tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=new_stats if new_stats is not None else {},
        opt_state=opt_state,
        term_state={**state.term_state, **jax.lax.stop_gradient(term_state)},
    )
    return new_state, step_metrics(measurements, logits, labels, batch)


def example_index(batch: dict) -> Optional[jax.Array]:
    """The training-set indices of one seed's batch: the gathered pool rows in memory, the
    records' ``example_index`` when streamed."""
    if "index" in batch:
        return batch["index"]
    return batch.get("example_index")


class StageStart:
    """Where a two-stage run's main stage starts (:mod:`at_jax.stages`): ``variables`` (the
    student's, a leading seed axis) and ``kept_terms`` (``{term: {module: params}}``, a seed
    axis; frozen here) of its first stage, read by :func:`at_jax.checkpoints.restore_seeds`."""

    def __init__(self, variables: Any, kept_terms: Mapping, n_seeds: int, where: str):
        self.variables, self.kept_terms, self.n_seeds, self.where = (
            variables,
            dict(kept_terms),
            n_seeds,
            where,
        )
        self.frozen_terms = {
            ("terms", name, module) for name, mods in self.kept_terms.items() for module in mods
        }
        self.facts: dict = {}  # what the run's results say of its first stage

    def init_state(self, step: Step) -> TrainState:
        """``step``'s train state (a seed axis, replicated), each seed from the same seed of the
        first stage."""
        if step.num_seeds != self.n_seeds:
            raise ValueError(
                f"the first stage in {self.where} has {self.n_seeds} seed(s), this run "
                f"{step.num_seeds}: delete it to train it again"
            )
        init = map_seeds(step.init_single, step.num_seeds, step.seed_strategy(), (0, 0, 0))
        trees = jax.device_put((self.variables, self.kept_terms), step.replicated)
        return jax.jit(init, out_shardings=step.replicated)(step.seed_keys(), *trees)
