"""One run per stage directory: the stage's supervisor holds ``<stage>/LOCK`` while it runs.

Two supervisors on one stage directory interleave their logs and metrics, refuse each other's
steps and leave a mixed checkpoint behind, so the second one is refused before it writes
anything, with a line that names the holder.

Why a directory and a heartbeat, not ``flock``: ``mkdir`` is atomic on NFS and Lustre, where
``flock`` may be local to a node or absent. The holder (host, pid, Slurm job id, attempt id) is
in ``LOCK/holder.json``, rewritten every ``run.lock_heartbeat_s``. A lock may only be taken
over when nothing of the old run can still write:

- its holder is the same Slurm job (a requeued attempt of the job that took it);
- its holder's Slurm job is no longer running (cancelled, or lost with its node); while it
  runs (or is suspended) it keeps the lock, whatever its heartbeat says;
- outside Slurm, on this host: its supervisor's pid is gone (a stopped one, Ctrl-Z, is alive)
  and no process carrying its attempt id (:data:`~deepscaler.handover.ATTEMPT_ENV`, which the
  supervisor's children carry) is left; they are found in ``/proc``;
- outside Slurm, on another host: its heartbeat is older than ``run.lock_stale_s`` and so is
  every hand-over report (``handover/<role>.json``) of its attempt still running (the children
  of a paused supervisor keep reporting; clocks of the nodes are assumed in sync to well
  within that).

A stage whose ``LOCK/`` is gone (removed by hand) is still in use while processes of an
attempt run on it: on this host those carrying an attempt id with this stage's ``run.yaml``
on their command line or an attempt named in ``handover/``, elsewhere a fresh running report.

The supervisor's children check before each step they write (:func:`require_ownership`) that
the lock still names their attempt, and stop with one line if not: a run that lost its lock
(removed by hand, or taken over while it was cut off) never writes again.

A takeover renames the old lock aside first (one rename wins), so two contenders cannot both
take it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from deepscaler import handover
from deepscaler.handover import ATTEMPT_ENV
from deepscaler.store import RunStore, StoreError, read_json, remove_tree

LOCK = "LOCK"
HOLDER = "holder.json"
# Defaults of run.lock_heartbeat_s and run.lock_stale_s (deepscaler.config).
HEARTBEAT_S = 30.0
STALE_S = 120.0
# What each of a stage's processes is, by the module on its command line (for the refusal).
ROLES = (("deepscaler.trainer", "trainer"), ("deepscaler.orchestrator", "orchestrator"),
         ("deepscaler.inference", "server"), ("deepscaler.tracking", "W&B forwarder"))


class RunLocked(StoreError):
    """A stage another live run holds. The message is one line."""


class LockLost(RunLocked):
    """A supervisor's child whose attempt no longer holds the stage's lock. One line."""


@dataclass
class Holder:
    host: str
    pid: int  # 0: no holder file (LOCK/ gone), only live processes of the stage
    job_id: str | None
    since: float
    attempt: str | None = None  # the supervisor's attempt id, which its children carry (ATTEMPT_ENV)
    # Why it is alive, for the refusal; never written to holder.json.
    stopped: bool = field(default=False, compare=False)
    alive: tuple[str, ...] = field(default=(), compare=False)
    note: str = field(default="", compare=False)  # stands for pid and host where there is no holder file

    @classmethod
    def me(cls, attempt: str | None = None) -> "Holder":
        return cls(socket.gethostname(), os.getpid(), os.environ.get("SLURM_JOB_ID"), time.time(), attempt)

    def record(self) -> dict:
        return {"host": self.host, "pid": self.pid, "job_id": self.job_id, "since": self.since,
                "attempt": self.attempt}

    def describe(self) -> str:
        if self.pid:
            job = f", Slurm job {self.job_id}" if self.job_id else ""
            text = f"pid {self.pid} on {self.host}{job}, since {time.strftime('%H:%M:%S', time.localtime(self.since))}"
        else:
            text = self.note or f"its {LOCK}/ is gone (removed by hand?)"
        if self.stopped:
            text += f", stopped (Ctrl-Z or SIGSTOP: continue it with fg or kill -CONT {self.pid})"
        if self.alive:
            text += f"; its processes are alive: {', '.join(self.alive)}"
        return text


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
    """Whether a process on this host can still run: a stopped one (Ctrl-Z) can, a zombie not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _state(pid) != "Z"


def _state(pid: int) -> str:
    """The process's state letter in ``/proc`` (R, S, T: stopped, Z: zombie...); "" if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rfind(")") + 2:][:1]


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


# --------------------------------------------------------------------------- processes of a stage


def _attempt_and_argv(pid: str) -> tuple[str, list[str]] | None:
    """(the attempt id in its environment, argv) of a process on this host; None for one with
    no attempt (not a supervisor's child), another user's, or one that is gone."""
    key = ATTEMPT_ENV.encode() + b"="
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes()
        if key not in env:
            return None
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    attempt = next((item[len(key):] for item in env.split(b"\0") if item.startswith(key)), None)
    if attempt is None:
        return None
    return attempt.decode(errors="replace"), [a.decode(errors="replace") for a in argv if a]


def _names_config(pid: str, argv: list[str], run_yaml: Path) -> bool:
    """Whether the process's ``--config`` is this stage's run.yaml (relative to its own cwd)."""
    for flag, value in zip(argv, argv[1:]):
        if flag == "--config":
            try:
                return os.path.samefile(Path(f"/proc/{pid}/cwd") / value, run_yaml)
            except OSError:
                return False
    return False


def _role(argv: list[str]) -> str:
    for module, role in ROLES:
        if any(a == module or a.startswith(module + ".") for a in argv):
            return role
    return Path(argv[0]).name if argv else "process"


def stage_processes(store: RunStore, attempts: set[str], exclude: str | None = None) -> list[tuple[int, str, str]]:
    """(pid, role, attempt) of the live processes on this host of a run of this stage other
    than attempt ``exclude``: those carrying one of ``attempts`` in their environment, and those
    carrying any attempt with this stage's run.yaml as their ``--config`` (found in ``/proc``;
    none where there is no ``/proc``, or the processes are another user's)."""
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
    except OSError:
        return []
    found = []
    for pid in pids:
        seen = _attempt_and_argv(pid)
        if seen is None or seen[0] == exclude:
            continue
        attempt, argv = seen
        if attempt in attempts or _names_config(pid, argv, store.run_yaml):
            found.append((int(pid), _role(argv), attempt))
    return sorted(found)


def _remote_reports(store: RunStore, stale_s: float, me: Holder) -> list[handover.Progress]:
    """Hand-over reports of a running trainer or orchestrator on another host: alive while
    they keep reporting (or, from a Slurm job, while the job runs)."""
    fresh = max(stale_s, handover.STALE_S)
    out = []
    for role in handover.PRODUCER.values():
        p = handover.read(store, role)
        if p is None or p.state != "running" or p.host == me.host or p.attempt in (None, me.attempt):
            continue
        job = p.job_id
        if (job and job != me.job_id and _job_running(job)) or (not job and time.time() - p.updated < fresh):
            out.append(p)
    return out


def _report_attempts(store: RunStore) -> set[str]:
    return {p.attempt for role in handover.PRODUCER.values()
            if (p := handover.read(store, role)) is not None and p.attempt}


def _live_processes(store: RunStore, attempt: str | None, me: Holder, stale_s: float,
                    remote: bool) -> tuple[str, ...]:
    """What of another run of this stage can still write: its processes on this host (those of
    ``attempt``, of an attempt named in ``handover/``, or naming this stage's run.yaml), and with
    ``remote`` its trainer or orchestrator still reporting from another host."""
    attempts = _report_attempts(store) | ({attempt} if attempt else set())
    alive = [f"{role} pid {pid}" for pid, role, _ in stage_processes(store, attempts, me.attempt)]
    if remote:
        alive += [f"{p.role} pid {p.pid} on {p.host}" for p in _remote_reports(store, stale_s, me)]
    return tuple(alive)


# --------------------------------------------------------------------------- who may take the lock


def live_holder(store: RunStore, me: Holder | None = None, stale_s: float = STALE_S) -> Holder | None:
    """The run that keeps ``me`` out, or None when the lock is free or may be taken over."""
    me = me or Holder.me()
    path = lock_dir(store)
    found = holder(store)
    if found is None:
        try:  # a lock just made, its holder file not written yet (or garbled): live until stale
            if time.time() - path.stat().st_mtime <= stale_s:
                return Holder("an unknown host", 0, None, 0.0, note=f"its {LOCK}/ is being made, no holder file yet")
        except FileNotFoundError:
            pass
        alive = _live_processes(store, None, me, stale_s, remote=True)  # LOCK/ removed by hand mid-run
        return Holder(me.host, 0, None, time.time(), alive=alive) if alive else None
    other, age = found
    if other.job_id:  # Slurm knows: while its job runs (or is suspended) it holds the lock
        if other.job_id == me.job_id or not _job_running(other.job_id):
            return None  # the same job requeued, or its job ended (scancel, a node failure): Slurm stops the rest
        return other
    if other.host == me.host:
        if other.pid == me.pid:
            return None
        other.stopped = _alive(other.pid) and _state(other.pid) in ("T", "t")
        other.alive = _live_processes(store, other.attempt, me, stale_s, remote=False)
        return other if _alive(other.pid) or other.alive else None
    if age <= stale_s:
        return other
    other.alive = _live_processes(store, other.attempt, me, stale_s, remote=True)  # a paused supervisor's children
    return other if other.alive else None


def refuse_outsider(store: RunStore, stale_s: float = STALE_S) -> None:
    """A trainer or orchestrator started by hand on a stage that a run is running would
    interleave its steps with the run's: refused, naming the run. The supervisor's own
    children carry its attempt id in their environment, and the lock must name it."""
    attempt = os.environ.get(ATTEMPT_ENV)
    if attempt is not None:
        found = holder(store)
        if found is not None and found[0].attempt != attempt:
            raise refusal(store, found[0])
        require_ownership(store)
        return
    other = live_holder(store, stale_s=stale_s)
    if other is not None:
        raise refusal(store, other)


def require_ownership(store: RunStore) -> None:
    """In a supervisor's child, before it writes a step: raises :class:`LockLost` (one line)
    unless ``LOCK/holder.json`` still names the child's attempt. A run whose lock was removed
    by hand, or taken over while it was cut off, stops before it writes again. Outside a
    supervisor (no attempt id: started by hand, tests) there is no lock to own."""
    attempt = os.environ.get(ATTEMPT_ENV)
    if attempt is None:
        return
    found = holder(store)
    if found is None and lock_dir(store).is_dir():  # between a takeover's mkdir and its holder file
        time.sleep(0.5)
        found = holder(store)
    if found is not None and found[0].attempt == attempt:
        return
    why = (f"it is now held by {found[0].describe()}" if found is not None
           else f"{lock_dir(store)} is gone (removed by hand?)")
    raise LockLost(f"{store.root}: this run (attempt {attempt}) no longer holds the stage's lock: {why}; stopped "
                   "before writing again (resume with --resume-step latest once no other run uses the stage)")


def refusal(store: RunStore, other: Holder) -> RunLocked:
    return RunLocked(f"{store.root} is in use by another run of this stage ({other.describe()}); wait for it, "
                     f"cancel it, or choose another run.name or run.output_dir")


class RunLock:
    """Hold the stage's lock while the ``with`` block runs, with a heartbeat thread."""

    def __init__(self, store: RunStore, attempt: str | None = None, *, heartbeat_s: float = HEARTBEAT_S,
                 stale_s: float = STALE_S):
        self.store, self.heartbeat_s, self.stale_s = store, heartbeat_s, stale_s
        self.me = Holder.me(attempt)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._made: int | None = None  # the inode of the LOCK/ this run made

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        path = lock_dir(self.store)
        for _ in range(3):
            other = live_holder(self.store, self.me, self.stale_s)
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
            self._made = path.stat().st_ino
            self._beat()
            self._thread = threading.Thread(target=self._heartbeat, name="run-lock", daemon=True)
            self._thread.start()
            return
        other = live_holder(self.store, self.me, self.stale_s)
        raise refusal(self.store, other or self.me)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._mine():
            (lock_dir(self.store) / HOLDER).unlink(missing_ok=True)
            try:
                lock_dir(self.store).rmdir()
            except OSError:
                pass

    def _mine(self) -> bool:
        """Whether LOCK/ is still the one this run made, naming it (not removed by hand, not
        taken over)."""
        found = holder(self.store)
        try:
            same_dir = lock_dir(self.store).stat().st_ino == self._made
        except FileNotFoundError:
            return False
        return same_dir and found is not None and found[0] == self.me

    def _beat(self) -> None:
        """Rewrite the holder file inside the LOCK/ this run made; never make LOCK/ again (a
        lock removed by hand or taken over is not this run's any more)."""
        d = lock_dir(self.store)
        tmp = d / f".{HOLDER}.{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps(self.me.record()) + "\n", encoding="utf-8")  # FileNotFoundError: LOCK/ is gone
        os.replace(tmp, d / HOLDER)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self._mine():
                    return  # lost: the children stop at their next write (require_ownership)
                self._beat()
            except OSError:
                pass  # a failing filesystem shows up in the stage's own writes

    def _remove_stale(self) -> None:
        """Remove the locks moved aside, with whatever is in them; a planted ``LOCK.stale-*``
        link goes itself, never what it points to (store.remove_tree, docs/security.md)."""
        for old in self.store.root.glob(f"{LOCK}.stale-*"):
            remove_tree(old)
