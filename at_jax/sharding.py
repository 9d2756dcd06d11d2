"""The ``data`` mesh and global arrays: :func:`data_mesh`, :func:`global_array`,
:func:`replicated`.

Batches are sharded over the ``data`` axis of a 1-D mesh of every device of every process;
parameters, the teacher's variables and in-memory datasets are replicated over it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "data_mesh",
    "global_array",
    "replicated",
    "sharded",
]


def data_mesh(devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A 1-D mesh with a ``data`` axis over ``devices`` (default: every device of every process)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same value on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def sharded(mesh: Mesh, *spec: Optional[str]) -> NamedSharding:
    """``NamedSharding(mesh, PartitionSpec(*spec))``; default: the first axis over ``data``."""
    return NamedSharding(mesh, PartitionSpec(*(spec or ("data",))))


def global_array(host_array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from data every process holds in full (works single- and multi-host)."""
    return jax.make_array_from_callback(host_array.shape, sharding, lambda idx: host_array[idx])
