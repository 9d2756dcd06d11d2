"""Activations of any Flax model, without editing it: call :func:`capture`.

``output, acts = capture(model, x, names=[...], variables=variables)`` runs a Linen or NNX model
and returns, besides its output, the outputs of the named submodules (``acts[name]``) — the
JAX counterpart of torchdistill's forward hooks by module path. ``acts`` feed
:func:`at_jax.losses.at_losses` and the other transfer losses directly::

    _, s_acts = capture(student, x, names=["stage2", "stage3"], variables=s_vars, train=True,
                        mutable=["batch_stats"])
    _, t_acts = capture(teacher, x, names=["layer3", "layer4"], variables=t_vars)
    total, per_pair = at_losses(s_acts, t_acts, [("stage2", "layer3"), ("stage3", "layer4")])

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
  in eval mode.

A submodule called more than once in a forward pass (shared weights, a loop) gives the output
of its first call. An unknown name raises ``ValueError`` listing the model's paths.

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

__all__ = ["capture", "model_fn"]

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
            acts[name] = value[0] if isinstance(value, tuple) else value
    if missing:
        raise ValueError(
            f"{kind} model has no submodule or sown value {missing}; available: {available()}"
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

    user_mutable = call_kwargs.pop("mutable", False)
    if user_mutable is True:
        raise ValueError(
            "capture: mutable=True is ambiguous; name the collections (mutable=['batch_stats'])"
        )
    collections = [user_mutable] if isinstance(user_mutable, str) else list(user_mutable or [])
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
        paths = traverse_util.flatten_dict(dict(every))
        return sorted({_joined(p[:-1] if p[-1] == _CALL else p) for p in paths} - {""})

    acts = _lookup(found, names, available, "the Linen")
    return ((output, state) if collections else output), acts


def _nnx(
    model: nnx.Module, x: Any, names: list[str], call_kwargs: dict
) -> tuple[Any, dict[str, Any]]:
    def run(module: nnx.Module) -> tuple[Any, Any]:
        return nnx.capture(module, nnx.Intermediate, method_outputs=nnx.Intermediate)(
            x, **call_kwargs
        )

    try:
        output, captured = run(model)
    except flax.errors.TraceContextError:
        # a module from outside the current trace (a teacher closed over in nnx.jit or
        # nnx.grad) cannot be written to here: capture on a copy of it in this trace
        output, captured = run(nnx.merge(*nnx.split(model)))
    found = {
        tuple(str(p) for p in path): variable.get_value()
        for path, variable in nnx.to_flat_state(captured)
    }

    def available() -> list[str]:
        modules = {_joined(path) for path, _ in nnx.iter_modules(model)}
        sown = {_joined(p) for p in found if p[-1] != _CALL}
        return sorted((modules | sown) - {""})

    return output, _lookup(found, names, available, "the NNX")


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
