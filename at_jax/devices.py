"""Host CPU setup: one XLA CPU device per core, so that a data-parallel step uses every core.

XLA:CPU runs each convolution (and its gradients) on a single thread: a WRN step on a 2-core
machine keeps one core idle. Giving XLA one CPU device per core and sharding the batch over them
(what :mod:`at_jax.train` does over ``jax.devices()``) runs the per-device convolutions in
parallel: measured 1.4-1.6x faster steps on the 2-core development machine
(``benchmarks/RESULTS.md``). On GPU/TPU hosts the CPU device count is irrelevant.

Call :func:`use_cpu_cores` right after ``import jax``, before any JAX computation.
"""

from __future__ import annotations

import os
from typing import Optional

import jax

__all__ = ["use_cpu_cores", "cpu_device_count"]

_FLAG = "xla_force_host_platform_device_count"


def cpu_device_count(cores: int, batch_size: Optional[int] = None) -> int:
    """The number of CPU devices to use: ``cores``, lowered to the largest count that divides
    ``batch_size`` (the batch is split evenly over the devices)."""
    n = max(1, int(cores))
    if batch_size:
        while batch_size % n:
            n -= 1
    return n


def use_cpu_cores(batch_size: Optional[int] = None, cores: Optional[int] = None) -> Optional[int]:
    """Ask JAX for one CPU device per available core (see the module docstring).

    Leaves the setting alone, and returns None, when the user already chose a CPU device count
    (``XLA_FLAGS=--xla_force_host_platform_device_count=N`` or ``jax_num_cpu_devices``) or when
    JAX's backends are already initialised. Returns the count it set otherwise.
    """
    chosen = getattr(jax.config, "jax_num_cpu_devices")  # noqa: B009 (not in its type stubs)
    if _FLAG in os.environ.get("XLA_FLAGS", "") or chosen != -1:
        return None
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = cpu_device_count(cores or 1, batch_size)
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # backends already initialised: too late to change, keep what there is
        return None
    return n
