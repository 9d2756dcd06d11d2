"""What runs first in every data worker process: call :func:`worker_init` (Grain's
``worker_init_fn``) so that workers never outlive their run.

* The worker exits within a second of its parent's death, SIGKILL and the OOM killer included
  (a watch thread polls the parent's pid; Linux's parent-death signal would fire when the
  *thread* that started the worker ends, which for Grain is not the main thread).
* SIGINT and SIGTERM are the main process's business: Ctrl-C in a terminal reaches the whole
  process group, and a preemption notice may too. The main process finishes its step, saves a
  checkpoint and closes the workers; a worker that died on the signal first would only print a
  traceback and break the batch in flight.

Once the workers are gone, multiprocessing's resource tracker (which they hold open too) exits
as well. Imports no JAX.
"""

from __future__ import annotations

import os
import signal
import threading
import time

__all__ = ["worker_init", "pool_worker_init", "watch_parent"]

POLL_S = 0.5


def watch_parent(parent_pid: int, poll_s: float = POLL_S) -> threading.Thread:
    """Start a daemon thread that ends this process (``os._exit``) once ``parent_pid`` is no
    longer its parent."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(0)

    thread = threading.Thread(target=watch, name="at_jax-parent-watch", daemon=True)
    thread.start()
    return thread


def worker_init(parent_pid: int, worker_index: int = 0, worker_count: int = 1) -> None:
    """Grain ``worker_init_fn`` (``functools.partial(worker_init, os.getpid())``): ignore SIGINT
    and SIGTERM, and exit with the parent."""
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    watch_parent(parent_pid)


def pool_worker_init(parent_pid: int) -> None:
    """``multiprocessing.Pool`` initializer: ignore SIGINT (Ctrl-C is the main process's) and
    exit with the parent. SIGTERM stays deadly: ``Pool.terminate`` ends workers with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch_parent(parent_pid)
