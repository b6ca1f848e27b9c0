"""Deliberate crashes at named points, for the fault-injection tests.

    DEEPSCALER_FAULT=checkpoint.mid_write@4   # SIGKILL this process while writing checkpoint 4 (several: a,b)
    DEEPSCALER_FAULT=reward.worker_hang@G      # a reward worker hangs on an item whose gold is G
    DEEPSCALER_FAULT=server.logprob_noise@0.3  # servers add N(0, 0.3) to every returned log-prob
    DEEPSCALER_FAULT=server.slow_generate@20   # every /generate takes 20 s longer (a long generation)
    DEEPSCALER_FAULT=orchestrator.random_rewards@on  # rewards are fair coin flips (seeded by the step)

SIGKILL, not an exception: it is what the OOM killer and a lost node do, and nothing in
the process gets a chance to clean up. Unset (always, outside tests), this does nothing.
"""

from __future__ import annotations

import os
import signal

ENV = "DEEPSCALER_FAULT"


def configured() -> str | None:
    """The fault this process's environment names (``point@key``), to hand to workers that
    do not read the environment when the fault is armed (a pool's forkserver started earlier)."""
    return os.environ.get(ENV)


def fires(fault: str | None, point: str, *keys: object) -> bool:
    """Whether ``fault`` (one ``point@key``, or several separated by commas) names ``point``
    at any of ``keys`` (a step, an item's gold...)."""
    names = set(fault.split(",")) if fault else set()
    return any(f"{point}@{key}" in names for key in keys)


def armed(point: str) -> str | None:
    """The key ``DEEPSCALER_FAULT`` gives ``point`` (``point@key``: a number for faults that
    distort rather than crash), or None."""
    for fault in (configured() or "").split(","):
        if fault.startswith(point + "@"):
            return fault[len(point) + 1:]
    return None


def maybe_crash(point: str, step: int) -> None:
    """Die here if ``DEEPSCALER_FAULT`` names this point and step."""
    if fires(configured(), point, step):
        os.kill(os.getpid(), signal.SIGKILL)


def fault_active(point: str, step: int) -> bool:
    """True if ``DEEPSCALER_FAULT`` names this point and step: for faults that misbehave
    instead of dying (a server that reports a partial reload as a success)."""
    return fires(configured(), point, step)
