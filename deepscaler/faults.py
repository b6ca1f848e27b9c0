"""Deliberate crashes at named points, for the fault-injection tests.

    DEEPSCALER_FAULT=checkpoint.mid_write@4   # SIGKILL this process while writing checkpoint 4

SIGKILL, not an exception: it is what the OOM killer and a lost node do, and nothing in
the process gets a chance to clean up. Unset (always, outside tests), this does nothing.
"""

from __future__ import annotations

import os
import signal

ENV = "DEEPSCALER_FAULT"


def maybe_crash(point: str, step: int) -> None:
    """Die here if ``DEEPSCALER_FAULT`` names this point and step."""
    if os.environ.get(ENV) == f"{point}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def fault_active(point: str, step: int) -> bool:
    """True if ``DEEPSCALER_FAULT`` names this point and step: for faults that misbehave
    instead of dying (a server that reports a partial reload as a success)."""
    return os.environ.get(ENV) == f"{point}@{step}"
