"""Names of activations and submodules, as error messages show them: call
:func:`natural_sorted` and :func:`unknown_names_message`.

Lists of names sort naturally (``block2`` before ``block10``), and an unknown name is reported
with the closest known names first, then a short list, never every submodule of a model.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

__all__ = ["natural_key", "natural_sorted", "closest_names", "unknown_names_message"]

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key that orders the numbers inside names by value: ``BasicBlock_2`` before
    ``BasicBlock_10``, ``layer1/0`` before ``layer1/1`` before ``layer2``."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in _DIGITS.split(str(name))
        if part
    )


def natural_sorted(names: Iterable[str]) -> list[str]:
    """``names`` in natural order (:func:`natural_key`), without duplicates."""
    return sorted(set(names), key=natural_key)


def closest_names(name: str, available: Iterable[str], n: int = 5) -> list[str]:
    """Up to ``n`` of ``available`` closest to ``name``, the closest first."""
    available = list(available)
    close = difflib.get_close_matches(name, available, n=n, cutoff=0.5)
    # a name that another contains (`block2` in `encoder/block2`) counts as close too
    last = name.rsplit("/", 1)[-1]
    contains = [a for a in natural_sorted(available) if last and last in a and a not in close]
    return (close + contains)[:n]


def unknown_names_message(
    missing: Iterable[str], available: Iterable[str], limit: int = 12, hint: str = ""
) -> str:
    """``'closest: [...]; others: [...] and K more; N in all' + hint`` for names not found in
    ``available``: the closest names to each missing one first, then the shallowest names
    (those with the fewest "/"), at most ``limit`` of them."""
    available = natural_sorted(available)
    close: list[str] = []
    for name in missing:
        close += [c for c in closest_names(name, available) if c not in close]
    shallow = sorted(available, key=lambda a: (a.count("/") + a.count("."), natural_key(a)))
    shown = [a for a in shallow if a not in close][: max(limit - len(close), 0)]
    parts = [f"closest: {close}"] if close else []
    rest = len(available) - len(shown) - len(close)
    if shown:
        parts.append(
            ("others: " if close else "names: ")
            + str(natural_sorted(shown))
            + (f" and {rest} more" if rest > 0 else "")
        )
    parts.append(f"{len(available)} in all" if available else "it has no names")
    return "; ".join(parts) + hint
