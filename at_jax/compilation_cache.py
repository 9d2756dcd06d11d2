"""XLA programs compiled once: JAX's persistent compilation cache, on by default.

On a CPU most of a short run is compilation, and every process (each run of the CLI, each cell of
a table, each test) compiles its programs again. :func:`use_compilation_cache` points JAX's
persistent cache at a directory, with its thresholds lowered so that CPU programs (quick to
compile one by one, but many) are cached too; a second identical run then loads its programs
instead of compiling them. The cache is keyed by the program, the JAX/XLA version, the devices
and the compile options, so a hit gives the same executable a fresh compilation would.

``config.compilation_cache_dir`` chooses the directory: :func:`default_cache_dir`
(``$XDG_CACHE_HOME/at_jax/xla``, or ``~/.cache/at_jax/xla``) by default, ``""`` to switch the
cache off. It does not change what a run computes, so it is not part of a run's identity. The CLI,
``experiments.demo``, ``experiments.paper_tables`` and both benchmarks call
:func:`use_compilation_cache` before they compile anything.
"""

from __future__ import annotations

import os

import jax

__all__ = ["default_cache_dir", "use_compilation_cache"]


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/at_jax/xla``, or ``~/.cache/at_jax/xla`` when XDG_CACHE_HOME is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "at_jax", "xla")


def use_compilation_cache(directory: str | None) -> str | None:
    """Cache every compiled XLA program in ``directory`` (created if needed) and read it back.

    ``""`` or ``None`` leaves the cache as it is (off unless something else switched it on).
    Call it before the first compilation: JAX opens the cache once per process. Returns the
    absolute directory, or None when off. A directory that cannot be created is reported with
    what to do.
    """
    if not directory:
        return None
    path = os.path.abspath(os.path.expanduser(directory))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"config.compilation_cache_dir={directory!r} cannot be created "
            f"({e.strerror}); set it to a writable directory, or to '' to compile "
            "without a cache"
        ) from None
    jax.config.update("jax_compilation_cache_dir", path)
    # Every program, however quick to compile or small: on a CPU they are many and short.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path
