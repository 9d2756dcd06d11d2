"""How the command-line programs end a user's mistake: one line, not a traceback. Wrap a
program's work in :func:`one_line_errors`.

A user error is an exception whose message says what was wrong and what to do (a missing
dataset or run, a misspelt model name, a bad value): ``ValueError``, ``KeyError``, ``OSError``
(``FileNotFoundError`` and the like), ``ImportError``, and the program's own kinds (a
diverged run, an unreadable checkpoint). It is printed as ``error: MESSAGE`` on stderr and the
program exits with status 1. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["one_line_errors", "fail", "USER_ERRORS"]

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, OSError, ImportError)


def fail(message: str, hint: str = "") -> None:
    """Print ``error: MESSAGE HINT`` on stderr and exit with status 1."""
    print(f"error: {message}{hint}", file=sys.stderr, flush=True)
    sys.exit(1)


def _message(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " ".join(lines) or type(e).__name__


@contextmanager
def one_line_errors(*also: type[BaseException], hint: str = "") -> Iterator[None]:
    """Inside it, a user error (:data:`USER_ERRORS`, or one of ``also``) ends the program with
    its message on one line (``hint`` appended: what to run first) and exit status 1."""
    try:
        yield
    except (*USER_ERRORS, *also) as e:
        fail(_message(e), hint)
