"""Slurm's time strings (``--time``), parsed once."""

from __future__ import annotations


def valid_time(text: str) -> bool:
    """Slurm's formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    days, dash, rest = text.partition("-")
    if dash:
        if not days.isdigit() or not rest:
            return False
        parts = rest.split(":")
        return 1 <= len(parts) <= 3 and all(p.isdigit() for p in parts)
    parts = text.split(":")
    return 1 <= len(parts) <= 3 and all(p.isdigit() for p in parts)


def time_minutes(text: str) -> int:
    """A Slurm time string in whole minutes (rounded up), e.g. for submitit's timeout_min."""
    return -(-time_seconds(text) // 60)


def time_seconds(text: str) -> int:
    """A Slurm time string (already validated) in seconds."""
    days, dash, rest = text.partition("-")
    if not dash:
        days, rest = "0", text
    parts = [int(p) for p in rest.split(":")]
    if dash:  # D-H, D-H:M, D-H:M:S
        h, m, s = (parts + [0, 0])[:3]
    elif len(parts) == 1:  # M
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:  # M:S
        h, m, s = 0, parts[0], parts[1]
    else:
        h, m, s = parts
    return ((int(days) * 24 + h) * 60 + m) * 60 + s
