"""Fine-tuning: a student that starts from another run's weights
(:func:`classifier_paths_to_replace`, :func:`merge`), with parts of it frozen
(:func:`frozen_paths`; the optimiser skips them: :func:`at_jax.optim.mask_frozen`).

* ``config.init_from``: a run directory — a trained at_jax run, or one made from torchvision
  weights by ``python -m at_jax.convert`` — whose parameters and BN statistics start the student.
  The architectures must agree, except the classifier (the leaves that differ only in their
  class axis), which is replaced by a freshly initialised one when the class count differs
  (ImageNet → CUB).
* ``config.freeze.modules``: top-level modules whose parameters are not trained; a group's name
  also covers its blocks (``layer1`` freezes ``layer1_0``, ``layer1_1``, ...).
* ``config.freeze.classifier``: the classifier (the student's last top-level module, whose
  leaves end in the class axis) is not trained; ``config.freeze.student``: no parameter of the
  student is (a two-stage run's first stage uses both: :mod:`at_jax.stages`).
* ``config.freeze.batch_norm``: batch norm normalises with its running statistics in training
  too (the model's ``frozen_batch_norm``), the statistics stay as they were, and its
  scale/offset are not trained.

Frozen parameters get no update at all (no gradient step, no weight decay, no momentum):
:func:`at_jax.optim.mask_frozen` routes them to ``optax.set_to_zero``.
"""

from __future__ import annotations

import re
from typing import Any

from flax import traverse_util

from at_jax.naming import natural_key, natural_sorted


def _in_modules(name: str, modules) -> bool:
    return any(name == m or re.fullmatch(rf"{re.escape(m)}_\d+", name) for m in modules)


def module_names(value) -> tuple[str, ...]:
    """``config.freeze.modules`` as names: a tuple, or comma-separated names in a string or in
    the tuple's entries (``--config.freeze.modules=conv1,bn1,layer1`` gives one such entry)."""
    entries = (value,) if isinstance(value, str) else tuple(value)
    return tuple(
        name.strip() for entry in entries for name in str(entry).split(",") if name.strip()
    )


def check_modules(modules, params: dict, model_name: str) -> None:
    """Every name in ``config.freeze.modules`` must name a top-level module of the model."""
    unknown = [m for m in modules if not any(_in_modules(name, [m]) for name in params)]
    if unknown:
        groups = natural_sorted({re.sub(r"_\d+$", "", name) for name in params} - set(params))
        raise ValueError(
            f"config.freeze.modules names {unknown}, which {model_name!r} does not "
            f"have; its top-level modules are {natural_sorted(params)}"
            + (f" and its groups {groups} (a group's name covers its blocks)" if groups else "")
        )


def frozen_paths(
    freeze: Any, variables: dict, model_name: str = "the model", num_classes: int = 0
) -> set[tuple[str, ...]]:
    """Paths (within the student's ``params``) of the parameters that ``freeze``
    (``config.freeze``: ``modules``, ``batch_norm``; a whole run config works too) leaves
    untrained."""
    if hasattr(freeze, "get") and "model" in freeze:  # a whole config, as before
        freeze, model_name = freeze.get("freeze", {}), freeze["model"]
    freeze = freeze or {}
    modules = module_names(freeze.get("modules", ()))
    params = variables["params"]
    check_modules(modules, params, model_name)
    if freeze.get("student", False):
        modules = tuple(params)
    elif freeze.get("classifier", False):
        modules = (*modules, classifier_module(params, num_classes, model_name))
    bn_modules = (
        {path[:-1] for path in traverse_util.flatten_dict(dict(variables.get("batch_stats", {})))}
        if freeze.get("batch_norm", False)
        else set()
    )
    return {
        path
        for path in traverse_util.flatten_dict(dict(params))
        if _in_modules(path[0], modules) or path[:-1] in bn_modules
    }


def classifier_module(params: dict, num_classes: int, model_name: str = "the model") -> str:
    """The name of the student's classifier: its top-level module whose every leaf ends in the
    class axis (``fc``, ``head``, ``classifier`` first where several do)."""
    ends = {
        name: {leaf.shape[-1] for leaf in traverse_util.flatten_dict(dict(tree)).values()}
        for name, tree in params.items()
        if hasattr(tree, "keys")
    }
    found = [name for name, e in ends.items() if e == {num_classes}]
    named = [n for n in ("fc", "head", "classifier") if n in found]
    if len(found) == 1 or named:
        return (named or found)[0]
    raise ValueError(
        f"config.freeze.classifier: cannot tell the classifier of {model_name!r} ("
        + (
            f"modules {natural_sorted(found)} all end in {num_classes} classes"
            if found
            else f"no top-level module ends in {num_classes} classes"
        )
        + "); name it in config.freeze.modules instead"
    )


# --------------------------------------------------------------------------- init_from


def classifier_paths_to_replace(
    fresh: dict, pretrained: dict, model_name: str, num_classes: int, source: str
) -> set[tuple[str, ...]]:
    """Check that ``pretrained`` variables fit the model whose initial variables are ``fresh``
    (both may be shapes only); return the paths that keep their fresh values (a classifier for
    another class count: leaves that differ in their last axis only, ``num_classes`` there).
    Raises with what differs."""
    new = traverse_util.flatten_dict(dict(fresh))
    old = traverse_util.flatten_dict(dict(pretrained))
    missing = natural_sorted("/".join(p) for p in set(new) - set(old))
    extra = natural_sorted("/".join(p) for p in set(old) - set(new))
    if missing or extra:
        raise ValueError(
            f"config.init_from={source!r} holds another architecture than {model_name!r}: "
            + (f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected {extra[:4]}{' ...' if len(extra) > 4 else ''}" if extra else "")
            + ". Set config.model to the model of that run (see its config.json)."
        )
    replaced = {p for p in new if new[p].shape != old[p].shape}
    # the classifier's leaves differ in their last axis only: this run's classes vs the source's
    wrong = natural_sorted(
        f"{'/'.join(p)} {tuple(old[p].shape)} -> {tuple(new[p].shape)}"
        for p in replaced
        if new[p].shape[:-1] != old[p].shape[:-1] or new[p].shape[-1] != num_classes
    )
    if wrong:
        raise ValueError(
            f"config.init_from={source!r}: shapes differ outside the classifier at "
            f"{wrong[:3]}: that run's model has other widths or input channels than "
            f"{model_name!r} with this config.model_overrides."
        )
    return replaced


plan = classifier_paths_to_replace  # its name before 2026-12: kept for code that calls it


def merge(fresh: dict, pretrained: dict, replaced: set) -> dict:
    """``pretrained`` with the ``replaced`` paths taken from ``fresh`` (works under jit)."""
    new = traverse_util.flatten_dict(dict(fresh))
    old = traverse_util.flatten_dict(dict(pretrained))
    return traverse_util.unflatten_dict(
        {p: new[p] if p in replaced else old[p].astype(new[p].dtype) for p in new}
    )


def describe(replaced: set, fresh: dict, pretrained: dict) -> str:
    new = traverse_util.flatten_dict(dict(fresh))
    old = traverse_util.flatten_dict(dict(pretrained))
    return ", ".join(
        f"{'/'.join(p)} {tuple(old[p].shape)} -> {tuple(new[p].shape)}"
        for p in sorted(replaced, key=lambda p: natural_key("/".join(p)))
    )


def trainable_count(frozen: set, params: dict) -> tuple[int, int]:
    """(trained, frozen) parameter counts of the student."""
    flat = traverse_util.flatten_dict(dict(params))
    n_frozen = sum(int(v.size) for p, v in flat.items() if p in frozen)
    return sum(int(v.size) for v in flat.values()) - n_frozen, n_frozen


__all__ = [
    "check_modules",
    "classifier_module",
    "frozen_paths",
    "classifier_paths_to_replace",
    "merge",
    "describe",
    "trainable_count",
    "module_names",
]
