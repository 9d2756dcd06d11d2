"""Random keys and several seeds in one program: :func:`make_key` and :func:`map_seeds`.

Every random stream of a run (initialisation, augmentation, dropout) derives from a typed key of
the "rbg" PRNG (:data:`PRNG_IMPL`): XLA compiles it far faster than the default threefry (the
train-state init of a WRN compiles in ~3-4 s instead of ~10-14 s on XLA:CPU). Streams are
deterministic for a given JAX version and backend.

Independent seeds of a run are trained together: every array of the train state has a leading
seed axis, and :func:`map_seeds` maps a one-seed function over it, with ``jax.vmap`` or one
unrolled call per seed in the same program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["PRNG_IMPL", "SEED_STRATEGIES", "Seeds", "make_key", "map_seeds", "resolve_strategy"]

PRNG_IMPL = "rbg"
SEED_STRATEGIES = ("auto", "vmap", "unroll")


@dataclasses.dataclass(frozen=True)
class Seeds:
    """The seeds of one program (``config.num_seeds`` of them from ``config.seed`` on, computed
    as ``config.seed_strategy`` says: see :func:`resolve_strategy`)."""

    count: int = 1
    first: int = 0
    strategy: str = "auto"

    @classmethod
    def from_config(cls, config: Any) -> Seeds:
        return cls(
            int(config.get("num_seeds", 1)),
            int(config.get("seed", 0)),
            str(config.get("seed_strategy", "auto")),
        )


def resolve_strategy(strategy: str, platform: str) -> str:
    """How the seeds of one program are computed on ``platform``: "auto" is "unroll" on CPU
    (``jax.vmap`` turns per-seed convolutions into grouped ones, which XLA:CPU runs slowly; one
    step per seed in the same program keeps every core busy) and "vmap" elsewhere. The "rbg"
    PRNG draws differently under ``vmap``, so each strategy is deterministic on its own;
    unrolled, seed ``s`` of a run is exactly the single-seed run with ``config.seed + s``."""
    if strategy == "auto":
        return "unroll" if platform == "cpu" else "vmap"
    return strategy


def make_key(seed_or_data: int | jax.Array) -> jax.Array:
    """A typed PRNG key of :data:`PRNG_IMPL` from an int seed or from raw key data."""
    if isinstance(seed_or_data, int):
        return jax.random.key(seed_or_data, impl=PRNG_IMPL)
    return jax.random.wrap_key_data(seed_or_data, impl=PRNG_IMPL)


def map_seeds(fn: Callable, num_seeds: int, strategy: str, in_axes: tuple) -> Callable:
    """``fn`` over a leading seed axis: ``jax.vmap(fn, in_axes)``, or with ``strategy``
    "unroll" (and more than one seed) one call per seed in the same program, stacked.
    ``in_axes`` has one entry per argument: 0 (seed axis), None (shared) or a dict of those."""
    if strategy == "vmap" or num_seeds == 1:
        return jax.vmap(fn, in_axes=in_axes)

    def take(arg: Any, axis: Any, s: int) -> Any:
        if isinstance(axis, dict):
            return {k: take(v, axis[k], s) for k, v in arg.items()}
        return arg if axis is None else jax.tree.map(lambda a: a[s], arg)

    def unrolled(*args: Any) -> Any:
        outputs = [
            fn(*(take(a, ax, s) for a, ax in zip(args, in_axes, strict=True)))
            for s in range(num_seeds)
        ]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)

    return unrolled
