"""How errors read here: one line that names the file, key or record (docs/troubleshooting.md),
and the check behind most messages about JSON records."""

from __future__ import annotations

from typing import Any


def one_line(text: object) -> str:
    """``text`` with every run of white space, newlines included, folded into one space."""
    return " ".join(str(text).split())


def is_int(value: Any) -> bool:
    """An integer as JSON means it: ``True`` is not 1."""
    return isinstance(value, int) and not isinstance(value, bool)
