"""Activations of any Flax model, without editing it: call :func:`paths` to see what can be
captured, then :func:`capture`.

``output, acts = capture(model, x, names=[...], variables=variables)`` runs a Linen or NNX model
and returns, besides its output, the outputs of the named submodules (``acts[name]``) — the
JAX counterpart of torchdistill's forward hooks by module path. ``acts`` feed
:func:`at_jax.losses.at_losses` and the other transfer losses directly::

    _, s_acts = capture(student, x, names=["stage2", "stage3"], variables=s_vars, train=True,
                        mutable=["batch_stats"])
    _, t_acts = capture(teacher, x, names=["layer3", "layer4"], variables=t_vars)
    total, per_pair = at_losses(s_acts, t_acts, [("stage2", "layer3"), ("stage3", "layer4")])

What can be captured, with each output's shape (abstract evaluation: nothing is computed)::

    for name, shape in paths(model, x, variables=variables).items():
        print(name, shape)          # stage1 (8, 16, 16, 4), encoder/block2 (8, 8, 8, 6), ...

Names:

* Linen (``model`` a ``flax.linen.Module``, ``variables`` its variables): submodule paths as in
  the variables tree, "/"-joined (``"stage1"``, ``"encoder/block2"``); the value is that
  submodule's ``__call__`` output (Linen's ``capture_intermediates`` with a filter on the path).
  Values sown into the "intermediates" collection are addressable by their sown name too
  ("/"-joined under the sowing submodule's path): at_jax's own models sow their transfer points
  (WRN ``group0``..``group2`` and ``groupG.blockI``, NIN ``block0``..``block2``, ResNet
  ``layer1``..``layer4``).
* NNX (``model`` a ``flax.nnx.Module``, no ``variables``): attribute paths, "/"-joined, list
  indices as numbers (``"blocks/2"``); the value is that submodule's ``__call__`` output, or
  a value sown with ``self.sow(nnx.Intermediate, name, value)``. Captured with
  ``nnx.capture``: it works inside ``nnx.jit`` and ``nnx.grad``, and leaves the model as it
  was (no captured values or instrumentation remain on it). A model from outside the current
  trace (a teacher that a function under ``nnx.jit`` closes over) runs on a copy of itself:
  its state changes (BN statistics in train mode) are not written back, as befits a teacher
  in eval mode. A model given to :func:`capture` directly (a student under ``nnx.grad``)
  updates its own state in place, once.

A submodule called more than once in a forward pass (shared weights, a loop) gives the output
of its first call. An unknown name raises ``ValueError`` with the closest names first and a
short list (all of them: :func:`paths`). Names sort naturally (``block2`` before ``block10``).

``call_kwargs`` go to the call: ``train``, ``rngs`` and ``mutable`` for Linen's ``apply``;
anything the NNX module's ``__call__`` takes. Mutable state: with Linen, ``output`` is exactly
what ``model.apply`` returns, so with ``mutable=["batch_stats"]`` it is ``(logits,
new_state)`` — keep ``new_state["batch_stats"]`` as you would without :func:`capture`. Without
``mutable`` Linen's BN must run in eval mode, as with ``apply``. An NNX model updates its own
state in place (BN statistics in train mode), as when it is called directly.

:func:`capture` is a pure function of ``variables`` and ``x`` (Linen): use it under ``jax.jit``,
``jax.grad`` and ``jax.vmap``; ``names`` are static.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
from flax import nnx, traverse_util

from at_jax.naming import natural_key, unknown_names_message

__all__ = ["capture", "paths", "model_fn"]

_CALL = "__call__"


def _joined(path: Iterable[Any]) -> str:
    return "/".join(str(p) for p in path)


def _check_names(names: Any) -> list[str]:
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            f"names must be a non-empty sequence of submodule paths such as "
            f"['stage1', 'encoder/block2'], got {names!r}"
        )
    return names


def _first(value: Any) -> Any:
    """The first call's value (Linen and NNX keep one entry per call, in a tuple)."""
    return value[0] if isinstance(value, tuple) else value


def _names(found: Mapping[tuple, Any]) -> dict[str, Any]:
    """``name -> first value`` for every captured path: a submodule's output under its path,
    a sown value under the sowing submodule's path and its name."""
    named: dict[str, Any] = {}
    for key in sorted(found, key=lambda k: natural_key(_joined(k))):
        name = _joined(key[:-1] if key[-1] == _CALL else key)
        if name and name not in named:
            named[name] = _first(found[key])
    return named


def _lookup(
    found: Mapping[tuple, Any], names: list[str], available: Callable[[], list[str]], kind: str
) -> dict[str, Any]:
    """``name -> first value`` from ``found`` (keyed by path tuples of strings)."""
    acts, missing = {}, []
    for name in names:
        path = tuple(name.split("/"))
        value = found.get((*path, _CALL), found.get(path))
        if value is None:
            missing.append(name)
        else:
            acts[name] = _first(value)
    if missing:
        hint = "; every name with its output shape: at_jax.capture.paths(model, x" + (
            ", variables=variables)" if kind == "the Linen" else ")"
        )
        raise ValueError(
            f"{kind} model has no submodule or sown value {missing}; "
            + unknown_names_message(missing, available(), hint=hint)
        )
    return acts


def _linen(
    model: nn.Module, x: Any, names: list[str], variables: Any, call_kwargs: dict
) -> tuple[Any, dict[str, Any]]:
    if variables is None:
        raise ValueError(
            "capture(model, x, names=..., variables=...) needs the Linen model's "
            "variables (what model.init returned)"
        )
    wanted = set(names)

    def keep(module: nn.Module, method_name: str) -> bool:
        return (
            method_name == _CALL
            and module.scope is not None
            and (_joined(module.scope.path) in wanted)
        )

    collections = _collections(call_kwargs)
    output, state = model.apply(
        variables,
        x,
        capture_intermediates=keep,
        mutable=[*collections, "intermediates"],
        **call_kwargs,
    )
    state = dict(state)
    captured = traverse_util.flatten_dict(dict(state.pop("intermediates", {})))
    found = {tuple(str(p) for p in k): v for k, v in captured.items()}

    def available() -> list[str]:
        return list(_linen_paths(model, x, variables, {**call_kwargs, "mutable": collections}))

    acts = _lookup(found, names, available, "the Linen")
    return ((output, state) if collections else output), acts


def _collections(call_kwargs: dict) -> list[str]:
    """The mutable collections that the caller asked for (popped from ``call_kwargs``)."""
    user_mutable = call_kwargs.pop("mutable", False)
    if user_mutable is True:
        raise ValueError(
            "capture: mutable=True is ambiguous; name the collections (mutable=['batch_stats'])"
        )
    return [user_mutable] if isinstance(user_mutable, str) else list(user_mutable or [])


def _linen_paths(model: nn.Module, x: Any, variables: Any, call_kwargs: dict) -> dict[str, Any]:
    """Every capturable name of a Linen model -> its abstract value (``jax.eval_shape``)."""
    collections = _collections(call_kwargs)
    every = jax.eval_shape(
        lambda v, z: model.apply(
            v,
            z,
            capture_intermediates=True,
            mutable=[*collections, "intermediates"],
            **call_kwargs,
        )[1]["intermediates"],
        variables,
        x,
    )
    flat = traverse_util.flatten_dict(dict(every))
    return _names({tuple(str(p) for p in k): v for k, v in flat.items()})


def _nnx_run(module: nnx.Module, x: Any, call_kwargs: dict) -> tuple[Any, dict[tuple, Any]]:
    """``(output, found)``: the module's output and every submodule output and sown value,
    keyed by path tuples of strings."""
    output, captured = nnx.capture(module, nnx.Intermediate, method_outputs=nnx.Intermediate)(
        x, **call_kwargs
    )
    found = {
        tuple(str(p) for p in path): variable.get_value()
        for path, variable in nnx.to_flat_state(captured)
    }
    return output, found


def _nnx_copy(model: nnx.Module) -> nnx.Module:
    return nnx.merge(*nnx.split(model), copy=True)


def _nnx(
    model: nnx.Module, x: Any, names: list[str], call_kwargs: dict
) -> tuple[Any, dict[str, Any]]:
    try:
        output, found = _nnx_run(model, x, call_kwargs)
    except flax.errors.TraceContextError:
        # a module from outside the current trace (a teacher closed over in nnx.jit or
        # nnx.grad, in train or eval mode) cannot be written to here: capture on a copy of it
        # in this trace (its state changes are dropped)
        output, found = _nnx_run(_nnx_copy(model), x, call_kwargs)
    return output, _lookup(found, names, lambda: list(_names(found)), "the NNX")


def _nnx_paths(model: nnx.Module, x: Any, call_kwargs: dict) -> dict[str, Any]:
    graphdef, state = nnx.split(model)

    def every(state: Any, z: Any) -> dict[str, Any]:
        return _names(_nnx_run(nnx.merge(graphdef, state, copy=True), z, call_kwargs)[1])

    return jax.eval_shape(every, state, x)


def paths(model: Any, x: Any, *, variables: Any = None, **call_kwargs: Any) -> dict[str, Any]:
    """Every name that :func:`capture` accepts for this model and input, with the shape of its
    value: ``{name: shape}`` in natural order (a submodule that returns several arrays: their
    shapes in the same structure). Nothing is computed (``jax.eval_shape``) and the model is
    left as it was (NNX: run on a copy).

    Args:
      model, x, variables: as :func:`capture`.
      call_kwargs: as :func:`capture`'s (``train=True`` shows the names of a train-mode
        call).

    Example::

        >>> paths(model, x, variables=variables)
        {'stage1': (8, 16, 16, 4), 'stage1/conv': (8, 16, 16, 4), 'head': (8, 10), ...}
    """
    if isinstance(model, nnx.Module):
        if variables is not None:
            raise ValueError("paths: an NNX module holds its own variables; pass none")
        abstract = _nnx_paths(model, x, dict(call_kwargs))
    elif isinstance(model, nn.Module):
        if variables is None:
            raise ValueError(
                "paths(model, x, variables=...) needs the Linen model's variables "
                "(what model.init returned)"
            )
        abstract = _linen_paths(model, x, variables, dict(call_kwargs))
    else:
        raise TypeError(
            f"paths takes a flax.linen.Module or a flax.nnx.Module, got {type(model).__name__}"
        )
    return {
        name: jax.tree.map(lambda a: tuple(a.shape), value)
        for name, value in sorted(abstract.items(), key=lambda item: natural_key(item[0]))
    }


def capture(
    model: Any, x: Any, *, names: Iterable[str], variables: Any = None, **call_kwargs: Any
) -> tuple[Any, dict[str, Any]]:
    """Run ``model`` on ``x`` and return ``(output, acts)``, ``acts`` mapping each of ``names``
    to that submodule's output (see the module docstring for names, mutable state, repeated
    calls).

    Args:
      model: a ``flax.linen.Module`` (with ``variables``) or a ``flax.nnx.Module``.
      x: the model's input.
      names: submodule paths ("/"-joined) or sown names.
      variables: the Linen model's variables; None for NNX.
      **call_kwargs: passed to ``apply`` (Linen: ``train``, ``rngs``, ``mutable``) or to the
        NNX module's ``__call__``.

    Returns:
      ``(output, acts)``: the model's output (Linen with ``mutable``: ``(output, new_state)``,
      as ``apply``) and ``{name: array}``.
    """
    names = _check_names(names)
    if isinstance(model, nnx.Module):
        if variables is not None:
            raise ValueError("capture: an NNX module holds its own variables; pass none")
        return _nnx(model, x, names, dict(call_kwargs))
    if isinstance(model, nn.Module):
        return _linen(model, x, names, variables, dict(call_kwargs))
    raise TypeError(
        f"capture takes a flax.linen.Module or a flax.nnx.Module, got {type(model).__name__}"
    )


def model_fn(
    model: Any, names: Iterable[str], variables: Any = None, **call_kwargs: Any
) -> Callable[[Any], tuple[Any, dict[str, Any]]]:
    """``x -> (output, acts)``: :func:`capture` with the model, names and keyword arguments
    fixed — the callable that :func:`at_jax.analysis.attention_distance` and
    :func:`at_jax.figures.attention_figure` take."""
    names = _check_names(names)
    return lambda x: capture(model, x, names=names, variables=variables, **call_kwargs)
