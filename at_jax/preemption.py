"""Stopping a run cleanly on SIGTERM (preemption) and SIGINT (Ctrl-C): :class:`StopSignals`,
and how a run says it stopped: :class:`Stopped` (a signal; the CLI exits with 128 + its number,
:func:`exit_when_stopped`) and :class:`TrainingDiverged` (a NaN/Inf loss).

Preemptible TPU VMs and spot GPUs announce preemption with SIGTERM a little before the machine
goes. Within :class:`StopSignals`, the first SIGTERM or SIGINT only asks the training loop to
stop: it finishes the step in flight, saves a checkpoint and ends with exit code 128 + the signal
number; a second signal exits at once, without saving.

Several processes (multi-host): every process must stop at the same step, or the collective
checkpoint save would wait forever. JAX's preemption service (started by
``jax.distributed.initialize``) catches SIGTERM on any process and agrees on a step at which all
of them stop (``multihost_utils.reached_preemption_sync_point``); SIGINT is turned into a SIGTERM
for it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any, Optional

import jax
from jax.experimental import multihost_utils

__all__ = [
    "StopSignals",
    "signal_name",
    "Stopped",
    "TrainingDiverged",
    "exit_when_stopped",
    "stopped_before_training",
]


def signal_name(signum: int) -> str:
    """``"SIGTERM"`` for 15, etc."""
    return signal.Signals(signum).name


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Stopped(Exception):
    """The run stopped on SIGTERM or SIGINT after saving a checkpoint; rerunning the same
    command resumes it. ``exit_code`` is 128 + the signal number, what a process killed by it
    would return."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def stopped_before_training(signum: int) -> Stopped:
    """:class:`Stopped` for a signal that came before the first step (nothing to save)."""
    return Stopped(
        signum,
        f"stopped by {signal_name(signum)} before training started; nothing new to save; "
        "run the same command to continue",
    )


@contextlib.contextmanager
def exit_when_stopped(note: str = "") -> Iterator[None]:
    """For command-line programs: a :class:`Stopped` run ends the process with its one line
    (and ``note``) on stderr and its exit code, 128 + the signal, without a traceback."""
    try:
        yield
    except Stopped as e:
        print(f"{e}{note}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)


class StopSignals:
    """Context manager: SIGINT and SIGTERM ask the run to stop at the next step boundary.

    ``requested(step)`` (called by the loop before every step, with the global step) returns
    the signal number once the run should stop, else None. Handlers are installed only in the
    main thread and restored on exit.
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}
        self._multi = False

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        self._multi = jax.process_count() > 1
        # with several processes, SIGTERM belongs to JAX's preemption service
        signals = [signal.SIGINT] if self._multi else [signal.SIGINT, signal.SIGTERM]
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        name = signal_name(signum)
        if self.signum is not None:
            os.write(2, f"\n{name} again: exiting now, without saving\n".encode())
            os._exit(128 + signum)
        self.signum = signum
        os.write(
            2,
            f"\n{name} received: finishing the step in flight and saving a checkpoint "
            f"({name} again exits at once)\n".encode(),
        )
        if self._multi:  # every process must stop at the same step: JAX's preemption service
            os.kill(os.getpid(), signal.SIGTERM)

    def requested(self, step: int) -> Optional[int]:
        """The signal to stop on, at global step ``step``, or None to go on."""
        if self._multi:
            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    return self.signum or signal.SIGTERM
                return None
            except RuntimeError:  # no preemption service: this process's own signal
                pass
        return self.signum
