"""One run per stage directory: the stage's supervisor holds ``<stage>/LOCK`` while it runs.

Two supervisors on one stage directory interleave their logs and metrics, refuse each other's
steps and leave a mixed checkpoint behind, so the second one is refused before it writes
anything, with a line that names the holder.

Why a directory and a heartbeat, not ``flock``: ``mkdir`` is atomic on NFS and Lustre, where
``flock`` may be local to a node or absent. The holder (host, pid, Slurm job id) is in
``LOCK/holder.json``, rewritten every :data:`HEARTBEAT_S`; a lock is taken over when

- its holder is the same Slurm job (a requeued attempt of the job that took it),
- its holder's Slurm job is no longer running (cancelled, or lost with its node),
- its holder ran on this host and its pid is gone (a killed supervisor), or
- its heartbeat is older than :data:`STALE_S` (a lost node; clocks of the nodes are assumed
  in sync to well within that).

A takeover renames the old lock aside first (one rename wins), so two contenders cannot both
take it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from deepscaler.handover import ATTEMPT_ENV
from deepscaler.store import RunStore, StoreError, atomic_write_json, read_json

LOCK = "LOCK"
HOLDER = "holder.json"
HEARTBEAT_S = 30.0
STALE_S = 120.0


class RunLocked(StoreError):
    """A stage another live supervisor holds. The message is one line."""


@dataclass
class Holder:
    host: str
    pid: int
    job_id: str | None
    since: float
    attempt: str | None = None  # the supervisor's attempt id, which its children carry (ATTEMPT_ENV)

    @classmethod
    def me(cls, attempt: str | None = None) -> "Holder":
        return cls(socket.gethostname(), os.getpid(), os.environ.get("SLURM_JOB_ID"), time.time(), attempt)

    def describe(self) -> str:
        job = f", Slurm job {self.job_id}" if self.job_id else ""
        return f"pid {self.pid} on {self.host}{job}, since {time.strftime('%H:%M:%S', time.localtime(self.since))}"


def lock_dir(store: RunStore) -> Path:
    return store.root / LOCK


def holder(store: RunStore) -> tuple[Holder, float] | None:
    """(the holder, seconds since its last heartbeat), or None when the stage is not locked."""
    path = lock_dir(store) / HOLDER
    try:
        data = read_json(path)
        age = time.time() - path.stat().st_mtime
    except (FileNotFoundError, StoreError):
        return None
    try:
        return Holder(str(data["host"]), int(data["pid"]), data.get("job_id"), float(data["since"]),
                      data.get("attempt")), age
    except (KeyError, TypeError, ValueError):
        return None  # a garbled holder file is no holder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _job_running(job_id: str) -> bool:
    """Whether Slurm still runs the job (True when squeue cannot tell: no guess against it).
    A COMPLETING job does not count: it was cancelled or has ended, and Slurm is killing what
    is left of it, so a resubmit right after ``scancel`` is not refused."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return True
    if out.returncode != 0:
        return "Invalid job id" not in out.stderr
    return any(state in out.stdout for state in ("RUNNING", "SUSPENDED"))


def live_holder(store: RunStore, me: Holder | None = None) -> Holder | None:
    """The holder that keeps ``me`` out, or None when the lock is free or may be taken over."""
    path = lock_dir(store)
    try:
        made = path.stat().st_mtime
    except FileNotFoundError:
        return None
    found = holder(store)
    if found is None:  # just made, its holder file not written yet (or garbled): live until stale
        return None if time.time() - made > STALE_S else Holder("an unknown host", 0, None, made)
    other, age = found
    me = me or Holder.me()
    if age > STALE_S:
        return None
    if other.job_id and other.job_id == me.job_id:
        return None  # the same Slurm job, requeued
    if other.job_id and not _job_running(other.job_id):
        return None  # its job ended (scancel, a node failure) without releasing the lock
    if other.host == me.host and (other.pid == me.pid or not _alive(other.pid)):
        return None
    return other


def refuse_outsider(store: RunStore) -> None:
    """A trainer or orchestrator started by hand on a stage that a supervisor runs would
    interleave its steps with the run's: refused, naming the supervisor. The supervisor's own
    children carry its attempt id in their environment."""
    other = live_holder(store)
    if other is not None and (other.attempt is None or other.attempt != os.environ.get(ATTEMPT_ENV)):
        raise refusal(store, other)


def refusal(store: RunStore, other: Holder) -> RunLocked:
    return RunLocked(f"{store.root} is in use by another run of this stage ({other.describe()}); wait for it, "
                     f"cancel it, or choose another run.name or run.output_dir")


class RunLock:
    """Hold the stage's lock while the ``with`` block runs, with a heartbeat thread."""

    def __init__(self, store: RunStore, attempt: str | None = None):
        self.store = store
        self.me = Holder.me(attempt)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        path = lock_dir(self.store)
        for _ in range(3):
            other = live_holder(self.store, self.me)
            if other is not None:
                raise refusal(self.store, other)
            if path.exists():  # free to take over: move the old lock aside, one rename wins
                try:
                    os.rename(path, path.with_name(f"{LOCK}.stale-{uuid.uuid4().hex[:8]}"))
                except FileNotFoundError:
                    pass
                self._remove_stale()
            try:
                path.mkdir(parents=True)
            except FileExistsError:
                continue  # someone else was quicker: look again
            self._beat()
            self._thread = threading.Thread(target=self._heartbeat, name="run-lock", daemon=True)
            self._thread.start()
            return
        other = live_holder(self.store, self.me)
        raise refusal(self.store, other or self.me)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        found = holder(self.store)
        if found is not None and (found[0].host, found[0].pid) == (self.me.host, self.me.pid):
            (lock_dir(self.store) / HOLDER).unlink(missing_ok=True)
            try:
                lock_dir(self.store).rmdir()
            except OSError:
                pass

    def _beat(self) -> None:
        atomic_write_json(lock_dir(self.store) / HOLDER, asdict(self.me))

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._beat()
            except OSError:
                pass  # a failing filesystem shows up in the stage's own writes

    def _remove_stale(self) -> None:
        for old in self.store.root.glob(f"{LOCK}.stale-*"):
            for f in old.glob("*"):
                f.unlink(missing_ok=True)
            try:
                old.rmdir()
            except OSError:
                pass
