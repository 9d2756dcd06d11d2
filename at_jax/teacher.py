"""A trained (or converted) run as a teacher, in any code: :func:`load_teacher` gives a
:class:`Teacher`, ``logits, acts = teacher(images_uint8)``. Also what the training loop uses to
put a run's teacher beside its student (:func:`load_run_variables`), and the run's
``data.json`` (:func:`write_data_info`, :func:`read_data_info`: its
:class:`~at_jax.data.spec.DataSpec`).

Importing this module builds no train step: it pulls in the models, Orbax and Grain's
checkpoint handler, not the objective, the losses or optax.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from at_jax import finetune
from at_jax.checkpoints import restore_variables
from at_jax.data.catalog import dataset_num_classes, dataset_spec
from at_jax.data.spec import DataSpec, SpecFields
from at_jax.files import write_json_atomic
from at_jax.models import forward
from at_jax.models.build import build_model
from at_jax.preprocess import normalize
from at_jax.rundir import CONFIG_FILE, DATA_FILE

__all__ = [
    "load_teacher",
    "Teacher",
    "load_run_variables",
    "write_data_info",
    "read_data_info",
]


def write_data_info(workdir: str, spec: DataSpec | int, *facts: Any) -> None:
    """Record what the run's images are (``data.json``): :func:`load_teacher` reads it.
    ``spec``: the run's :class:`~at_jax.data.spec.DataSpec` (or, as before it existed, the four
    facts ``num_classes, image_shape, mean, std``)."""
    if not isinstance(spec, DataSpec):
        spec = DataSpec(spec, *facts)
    write_json_atomic(os.path.join(workdir, DATA_FILE), spec.to_json())


def read_data_info(workdir: str, config: ml_collections.ConfigDict) -> DataSpec:
    """The run's ``data.json``, or (runs made before it existed) what its config implies."""
    path = os.path.join(workdir, DATA_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            return DataSpec.from_json(json.load(f))
    return dataset_spec(config)


def load_run_variables(
    workdir: str,
    num_classes: Optional[int],
    image_shape: tuple,
    seed_index: int = 0,
    step: Optional[int] = None,
) -> tuple[Any, dict, ml_collections.ConfigDict]:
    """Restore a trained run's model for evaluation: ``(model, variables, config)``.

    Architecture from its ``config.json``, variables from its newest checkpoint (or ``step``),
    seed ``seed_index`` of a multi-seed run. The model computes in float32. ``num_classes``:
    the classes it must classify (raises if it classifies others), or None for its own (an
    attention teacher, whose logits are not used)."""
    variables, config, where = restore_variables(workdir, seed_index, step)
    if num_classes is None:
        num_classes = read_data_info(workdir, config).num_classes or _saved_num_classes(
            config, variables, image_shape
        )
    model = _evaluation_model(workdir, variables, config, where, num_classes, image_shape)
    return model, variables, config


def _evaluation_model(
    workdir: str,
    variables: dict,
    config: ml_collections.ConfigDict,
    where: str,
    num_classes: int,
    image_shape: tuple,
) -> nn.Module:
    """The run's model (float32) for ``num_classes`` and ``image_shape``, checked against its
    restored ``variables``."""
    trained_classes = dataset_num_classes(config)
    if trained_classes not in (None, num_classes):
        raise ValueError(
            f"teacher in {workdir!r} was trained on {config.data.name} "
            f"({trained_classes} classes); this run has {num_classes} classes"
        )
    model = build_model(config, num_classes)
    expected = jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((1, *tuple(image_shape)), jnp.float32)
    )
    try:  # the same check as a fine-tuning start, where only the classifier may differ
        replaced = finetune.classifier_paths_to_replace(
            expected, variables, config.model, num_classes, workdir
        )
    except ValueError:
        raise ValueError(
            f"the checkpoint in {where} does not match the architecture in "
            f"{os.path.join(workdir, CONFIG_FILE)} (model {config.model!r}, {num_classes} "
            f"classes, input {tuple(image_shape)}): was config.json edited, or the checkpoint "
            "copied from another run?"
        ) from None
    if replaced:
        trained = traverse_util.flatten_dict(variables)[min(replaced)].shape[-1]
        raise ValueError(
            f"the run in {workdir!r} classifies {trained} classes; this run has "
            f"{num_classes}. A teacher must know this run's classes: fine-tune it "
            "on this data first (config.init_from, e.g. configs/transfer.py:"
            "teacher,DATASET)"
        )
    # The teacher computes in float32 even if the student uses bfloat16.
    return model.clone(dtype=jnp.float32)


def _saved_num_classes(
    config: ml_collections.ConfigDict, variables: dict, image_shape: tuple
) -> int:
    """The class count of a run's classifier, read off its variables (image-folder runs)."""
    expected = jax.eval_shape(
        build_model(config, 1).init,
        jax.random.key(0),
        jnp.zeros((1, *tuple(image_shape)), jnp.float32),
    )
    new = traverse_util.flatten_dict(expected)
    old = traverse_util.flatten_dict(variables)
    classes = {old[p].shape[-1] for p in new if p in old and new[p].shape != old[p].shape}
    if len(classes) != 1:
        raise ValueError(f"cannot tell the class count of the run's classifier ({sorted(classes)})")
    return int(classes.pop())


class Teacher(SpecFields):
    """A trained (or converted) run, ready to run in eval mode: ``logits, acts = teacher(images)``.

    Attributes: ``model`` (the Flax module, float32), ``variables`` (``{"params",
    "batch_stats"}``), ``spec`` (its data's :class:`~at_jax.data.spec.DataSpec`) and from it
    ``num_classes``, ``image_shape`` (H, W, C), ``mean`` and ``std`` (per channel, for images
    scaled to [0, 1]), ``config`` (the run's config) and ``workdir``. Built by
    :func:`load_teacher`.
    """

    def __init__(
        self,
        model: nn.Module,
        variables: dict,
        spec: DataSpec,
        config: ml_collections.ConfigDict,
        workdir: str,
    ):
        self.model, self.variables, self.spec = model, variables, spec
        self.config, self.workdir = config, workdir
        self._apply: Callable = jax.jit(lambda v, x: forward(model, v, x)[:2])

    def preprocess(self, images_uint8: Any) -> jax.Array:
        """uint8 images (B, H, W, C) — or (B, H, W) for a one-channel teacher — to the float32
        input the teacher was trained on (scaled to [0, 1], normalised with its mean/std)."""
        x = jnp.asarray(images_uint8)
        if x.ndim == 3 and self.image_shape[-1] == 1:
            x = x[..., None]
        if x.ndim != 4 or x.shape[-1] != self.image_shape[-1]:
            raise ValueError(
                f"the teacher in {self.workdir!r} takes images of shape (B, H, W, "
                f"{self.image_shape[-1]}) (trained on {self.image_shape}); got "
                f"{tuple(x.shape)}"
            )
        if x.dtype != jnp.uint8:
            raise ValueError(f"preprocess takes uint8 images (0-255), got {x.dtype}")
        return normalize(x, self.mean, self.std)

    def apply(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``(logits, acts)`` of already preprocessed float input (eval mode, jitted); ``acts``
        are the model's transfer points (WRN ``group0..2``, NIN ``block0..2``, ResNet
        ``layer1..4``, and WRN's per-block ``groupG.blockI``)."""
        return self._apply(self.variables, x)

    def __call__(self, images: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``(logits, acts)`` of uint8 images, preprocessed as in training (float input is taken
        as already preprocessed). Eval mode, jitted; no gradient flows to the teacher's
        variables (they are not an argument)."""
        x = (
            images
            if jnp.issubdtype(jnp.asarray(images).dtype, jnp.floating)
            else self.preprocess(images)
        )
        return self.apply(x)

    def __repr__(self) -> str:
        return (
            f"Teacher({self.config.model!r} from {self.workdir!r}, {self.num_classes} "
            f"classes, images {self.image_shape})"
        )


def load_teacher(workdir: str, seed_index: int = 0) -> Teacher:
    """A CLI-trained or converted run as a teacher, in one line::

        teacher = load_teacher("runs/cifar10/wrn-16-2")
        logits, acts = teacher(images_uint8)      # eval mode, jitted; acts["group0"], ...

    Reads the run's ``config.json`` (architecture), ``data.json`` (class count, image shape,
    mean and std of its images; for older runs, what the dataset's name implies) and its newest
    checkpoint (seed ``seed_index`` of a multi-seed run; only parameters and
    BN statistics). Raises with what to do when the run is missing or does not match its config.
    """
    variables, config, where = restore_variables(workdir, seed_index)
    spec = read_data_info(workdir, config)
    if spec.num_classes is None:
        spec = spec.with_classes(_saved_num_classes(config, variables, spec.image_shape))
    model = _evaluation_model(
        workdir, variables, config, where, spec.class_count(), spec.image_shape
    )
    return Teacher(model, variables, spec, config, workdir)
