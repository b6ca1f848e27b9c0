"""The hand-over of steps between processes: a wait on another process never hangs silently.

Each producer of steps (the trainer of ``weights``, the orchestrator of ``rollouts``) keeps
``<stage>/handover/<role>.json`` current: the step it works on, its state, host, pid, the
supervisor's attempt, and a heartbeat every :data:`HEARTBEAT_S`. A process that waits for one
of its steps reads it (:func:`watch`), so the wait

- logs every :data:`LOG_EVERY_S` what it waits for and where the producer stands, and
- fails with one line naming both steps when the producer ended without the step, moved past
  it (it will never write it: the two sides disagree on where they are), or stopped
  reporting for :data:`STALE_S` (killed, hung hard, or its node lost).

The local supervisor notices a dead child at once; these checks are for what it cannot see:
a lost node whose ``srun`` step lingers, processes started by hand, and two sides that are
both alive but waiting for each other.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

from deepscaler.store import RunStore, StepTimeout, atomic_write_json, read_json

HEARTBEAT_S = 10.0
STALE_S = 60.0  # with the 1 s poll: a dead producer fails the wait in about 70 s
LOG_EVERY_S = 30.0
# A producer that failed is left to the supervisor for this long: it stops the stage naming
# the producer's own error, which a waiter failing first would hide.
FAILED_GRACE_S = 30.0
ATTEMPT_ENV = "DEEPSCALER_ATTEMPT"  # set by the supervisor (deepscaler.launch) for its children

STARTED = time.time()  # processes started by hand have no attempt: older reports are not theirs

# Which process writes which kind of step.
PRODUCER = {"weights": "trainer", "rollouts": "orchestrator"}

log = logging.getLogger("deepscaler.handover")


class ProducerGone(StepTimeout):
    """The step waited for will not come. The message is one line."""


@dataclass
class Progress:
    role: str
    step: int  # the step of its kind it works on now (the next one it will write)
    state: str  # running | finished | failed
    host: str
    pid: int
    attempt: str | None
    updated: float  # time.time() of the last report
    job_id: str | None = None  # its Slurm job: while that runs, the stage's lock is not taken over (run_lock)

    def where(self) -> str:
        return f"{self.role} (pid {self.pid} on {self.host}) {self.state} at step {self.step}"


def read(store: RunStore, role: str) -> Progress | None:
    """The role's report, or None if there is none (not started, or unreadable mid-replace)."""
    try:
        return Progress(**read_json(store.handover_dir / f"{role}.json"))
    except (OSError, ValueError, TypeError):
        return None


def finished(store: RunStore, role: str, attempt: str | None) -> bool:
    """Whether ``role`` has reported finishing, in the supervisor's ``attempt`` (None: a process
    started by hand, which no report answers)."""
    report = read(store, role)
    return attempt is not None and report is not None and report.state == "finished" and report.attempt == attempt


class Reporter:
    """``with Reporter(store, "trainer", step) as report: ... report.at(step)``: the role's
    hand-over file, rewritten on each step and every :data:`HEARTBEAT_S` by a daemon thread;
    on exit it says ``finished`` or ``failed``."""

    def __init__(self, store: RunStore, role: str, step: int, heartbeat_s: float = HEARTBEAT_S, active: bool = True):
        self.store, self.heartbeat_s, self.active = store, heartbeat_s, active  # inactive: ranks > 0
        self.progress = Progress(role, step, "running", socket.gethostname(), os.getpid(),
                                 os.environ.get(ATTEMPT_ENV), time.time(), os.environ.get("SLURM_JOB_ID"))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"handover-{role}", daemon=True)

    def __enter__(self) -> "Reporter":
        if not self.active:
            return self
        self.store.handover_dir.mkdir(parents=True, exist_ok=True)
        self._write()
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.active:
            return
        self._stop.set()
        self._thread.join()
        self.progress.state = "finished" if exc_type is None else "failed"
        self._write()

    def at(self, step: int) -> None:
        self.progress.step = step
        if self.active:
            self._write()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._write()
            except OSError as e:  # a filesystem hiccup: the next beat tries again
                log.warning("could not update %s hand-over file: %s", self.progress.role, e)

    def _write(self) -> None:
        with self._lock:
            self.progress.updated = time.time()
            atomic_write_json(self.store.handover_dir / f"{self.progress.role}.json", asdict(self.progress))


def watch(store: RunStore, kind: str, step: int, *, or_newer: bool = False, stale_s: float = STALE_S,
          log_every_s: float = LOG_EVERY_S, say: Callable[[str], None] = log.info) -> Callable[[float], None]:
    """The ``check`` for ``RunStore.wait_for_step(kind, step)``: says every ``log_every_s``
    what the wait is for and where the producer stands; raises :class:`ProducerGone` when the
    producer of this attempt ended, moved past the step, or has not reported for ``stale_s``."""
    role, attempt = PRODUCER[kind], os.environ.get(ATTEMPT_ENV)
    target = f"{kind}/step_{step}{' or newer' if or_newer else ''}"
    next_log = log_every_s

    def check(waited: float) -> None:
        nonlocal next_log
        p = read(store, role)
        if p is not None and (p.attempt != attempt or (attempt is None and p.updated < STARTED)):
            p = None  # an earlier attempt's (or run's) report: this one's producer has not reported yet
        if p is not None and not store.has_step(kind, step, or_newer):  # re-checked after reading p
            age = time.time() - p.updated
            why = None
            if p.state == "finished" or (p.state == "failed" and age > FAILED_GRACE_S):
                why = f"{p.where()} without writing it"
            elif p.state == "running" and p.step > step:
                why = f"{p.where()}: it is past step {step} and will not write it"
            elif p.state == "running" and age > stale_s:
                why = f"{p.where()} has not reported for {age:.0f}s (killed, hung, or its node lost)"
            if why:
                raise ProducerGone(f"waited {waited:.0f}s for {target}: {why}")
        if waited >= next_log:
            next_log += log_every_s
            where = (f"{p.role} at step {p.step}, reported {time.time() - p.updated:.0f}s ago" if p
                     else f"{role} has not reported yet")
            say(f"waiting {waited:.0f}s for {target}; {where}")

    return check
