"""Run one stage's processes on this machine: inference servers, trainer, orchestrator.

They are the same entry points a Slurm job runs (``python -m deepscaler.inference``,
``deepscaler.trainer``, ``deepscaler.orchestrator``), talking through HTTP and the run
directory; here they are local child processes. The launcher only supervises:

- each child logs to ``logs/<name>.log`` and runs in its own session, and gets SIGTERM if the
  launcher dies (``PR_SET_PDEATHSIG``), so nothing is orphaned;
- the death of any child, or Ctrl-C, stops all the others (SIGTERM, then SIGKILL), and the
  error names the child and shows its log tail;
- the stage is done when the trainer and the orchestrator have exited 0; the servers are
  then stopped.

Progress comes from ``metrics.jsonl``: a live table on a terminal, plain lines otherwise.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from deepscaler.config import Config, server_names, to_yaml, trainer_ranks
from deepscaler import handover
from deepscaler.handover import ATTEMPT_ENV
from deepscaler.inference.contract import TOKEN_ENV
from deepscaler.run_lock import RunLock
from deepscaler.stage import resolve_resume
from deepscaler.store import LOG_TAIL_LINES, RunStore, StepCorrupt, atomic_write_text, log_tail
from deepscaler.tracking import enabled

STOP_GRACE_S = 15.0
SERVER_DEATH_WAIT_S = 10.0  # after the orchestrator saw a server die: how long the server's own end may take to show
TRACKING_GRACE_S = 60.0  # the forwarder's last records and W&B's own flush


class LaunchError(RuntimeError):
    """A stage's process failed. The first line names it; its log tail follows."""


def stage_commands(cfg: Config, run_yaml: Path, resume: str | None) -> dict[str, list[str]]:
    """name -> argv of every process of the stage on this machine (servers first)."""
    py = sys.executable
    resume_args = ["--resume-step", resume] if resume is not None else []
    commands = {name: [py, "-m", "deepscaler.inference", "--config", str(run_yaml), "--name", name]
                for name in server_names(cfg)}
    ranks = trainer_ranks(cfg)
    launcher = [py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else [py]
    commands["trainer"] = [*launcher, "-m", "deepscaler.trainer", "--config", str(run_yaml), *resume_args]
    commands["orchestrator"] = [py, "-m", "deepscaler.orchestrator", "--config", str(run_yaml), *resume_args]
    return commands


def write_run_yaml(cfg: Config, store: RunStore) -> Path:
    """The resolved config every process of the stage reads, written by each submit and each
    attempt. It always says what runs; a version with other values is first kept in
    ``run-history/`` (:func:`keep_previous_run_yaml`), so the history says what ran before. An
    attempt that re-reads run.yaml (a Slurm requeue) writes the same values: nothing changes."""
    store.ensure_dirs()
    text = to_yaml(cfg)
    try:
        old = store.run_yaml.read_text(encoding="utf-8")
    except FileNotFoundError:
        old = None
    if old == text:
        return store.run_yaml  # untouched: its mtime stays the time this version was first written
    if old is not None and not _same_values(old, text):
        keep_previous_run_yaml(store, old)
    return atomic_write_text(store.run_yaml, text)


def _same_values(a: str, b: str) -> bool:
    try:
        return yaml.safe_load(a) == yaml.safe_load(b)
    except yaml.YAMLError:
        return False


def keep_previous_run_yaml(store: RunStore, text: str) -> Path:
    """``run-history/<time>.yaml``: the replaced run.yaml, named by when it was written (UTC)."""
    when = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(store.run_yaml.stat().st_mtime))
    store.run_history_dir.mkdir(exist_ok=True)
    path, n = store.run_history_dir / f"{when}.yaml", 1
    while path.exists():
        path, n = store.run_history_dir / f"{when}-{n}.yaml", n + 1
    return atomic_write_text(path, text)


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the launcher dies (Linux), and a session of
    one's own so the launcher can signal the child's whole process group."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return log_tail(self.log, lines)


def start(name: str, argv: list[str], store: RunStore, env: dict[str, str]) -> Child:
    log = store.logs_dir / f"{name}.log"
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n")
        f.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_die_with_parent)
    return Child(name, proc, log)


def stop(children: list[Child], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every live child's process group, then SIGKILL what is left after ``grace_s``."""
    live = [c for c in children if c.proc.poll() is None]
    for c in live:
        _signal_group(c.proc, signal.SIGTERM)
        _signal_group(c.proc, signal.SIGCONT)  # a stopped (frozen) child acts on SIGTERM only once continued
    deadline = time.monotonic() + grace_s
    for c in live:
        try:
            c.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for c in children:  # the group too: a child's own children may outlive it
        _signal_group(c.proc, signal.SIGKILL)
        c.proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_stage(cfg: Config, resume: str | None = None, *,
              commands: Callable[[Config, Path, str | None], dict[str, list[str]]] = stage_commands,
              extra_env: dict[str, str] | None = None, event: dict | None = None, display=None) -> RunStore:
    """Run one stage to its end; raises LaunchError if a process fails.

    ``commands`` gives the processes to start: on this machine by default, as ``srun`` job
    steps inside a Slurm job (``deepscaler.slurm.stage_job.job_commands``). ``event`` is recorded in
    metrics.jsonl as this attempt's start (job id, restart count).
    """
    from deepscaler.prefetch import prepare_model, require_cache

    store = RunStore(cfg.run.output_dir, cfg.run.name, cfg.run.stage)
    attempt = uuid.uuid4().hex[:12]  # the children carry it: waits and the lock know them by it
    # The lock first: a second run of this stage is refused here, before it does or writes anything.
    with RunLock(store, attempt, heartbeat_s=cfg.run.lock_heartbeat_s, stale_s=cfg.run.lock_stale_s):
        resolve_resume(store, resume)  # a bad --resume-step fails here, before anything starts
        require_cache(cfg)  # so does a Hub cache that lost a file since submit (CacheError)
        prepare_model(cfg)  # the tiny model is built (and warm-started) here, once; the processes only load it
        point = restart_point(store, resume)
        return _supervise(cfg, store, point, commands, {**(extra_env or {}), ATTEMPT_ENV: attempt}, event, display)


def restart_point(store: RunStore, resume: str | None) -> str | None:
    """Decide once, for every process, where this attempt starts: the checkpoint that
    ``--resume-step`` names, or with ``latest`` the newest one that verifies (files present, of
    the sizes and checksums recorded at save; a damaged or unmarked one is passed over). What
    was written after it belongs to an interrupted attempt and goes: checkpoints and weights
    after it, rollouts from it on (the orchestrator samples them again, as a deterministic run
    would). The trainer and the orchestrator then get the step itself, so they cannot disagree
    about where they stand. What the attempt then reads before writing it again is verified as
    the checkpoint is (:func:`discard_damaged`). None: a fresh start."""
    point = resolve_resume(store, resume, checksums=True)
    if point is not None:
        for kind, first in (("checkpoints", point + 1), ("weights", point + 1), ("rollouts", point)):
            dropped = store.delete_steps(kind, [s for s in store.stable_steps(kind) if s >= first])
            if dropped:
                print(f"restart from checkpoint {point}: discarded {kind} {dropped}", file=sys.stderr, flush=True)
    discard_damaged(store, point)
    return None if point is None else str(point)


def discard_damaged(store: RunStore, point: int | None) -> None:
    """Verify (sizes and checksums) the steps an attempt from checkpoint ``point`` reads before
    it writes them again, and discard a damaged one, with a warning, so that it is written again
    rather than failing every restart: the weights of ``point`` (what the servers start from;
    the trainer publishes them again from the checkpoint when they are missing: the same
    weights), and the rollouts step the orchestrator takes its data progress from (``point - 1``;
    the checkpoint holds the same). With no checkpoint (None) the trainer reads every kept
    rollouts step from its first one and the servers any weights step: all are verified, and a
    damaged rollouts step goes with the ones after it (the orchestrator samples from there again).
    Older weights steps are the servers' and the eval's to pass over (``weights_format``)."""
    where = f"restart from checkpoint {point}" if point is not None else "fresh start"
    weights = store.stable_steps("weights") if point is None else [s for s in [point] if store.is_stable("weights", s)]
    for step in weights:
        problem = _damage(store, "weights", step)
        if problem:
            store.delete_steps("weights", [step])
            print(f"warning: {where}: {problem}: discarded weights [{step}] (the trainer publishes them again)",
                  file=sys.stderr, flush=True)
    rollouts = [s for s in store.stable_steps("rollouts") if point is None or s >= point - 1]
    for step in rollouts:
        problem = _damage(store, "rollouts", step)
        if problem:
            dropped = store.delete_steps("rollouts", [s for s in rollouts if s >= step])
            print(f"warning: {where}: {problem}: discarded rollouts {dropped} (the orchestrator samples them again)",
                  file=sys.stderr, flush=True)
            break


def _damage(store: RunStore, kind: str, step: int) -> str | None:
    """What is wrong with a stable step (one line), or None when it verifies to the byte."""
    try:
        store.verify_step(kind, step, checksums=True)
    except StepCorrupt as e:
        return str(e)
    return None


def _supervise(cfg: Config, store: RunStore, resume: str | None, commands, extra_env, event, display) -> RunStore:
    """Start the stage's processes and watch them until the trainer and the orchestrator are done."""
    from deepscaler.progress import Display, MetricsTail

    run_yaml = write_run_yaml(cfg, store)
    torn = store.repair_metrics()  # no process of the stage runs yet: this one may truncate
    if torn:
        print(f"warning: {store.metrics_path} ended in a torn line ({torn} bytes, a crash mid-write); removed",
              file=sys.stderr, flush=True)
    # The servers' token: a Slurm job's comes from the stage's token file (extra_env: both jobs of
    # a two-jobs stage must hold the same one); a local attempt makes a fresh one.
    token = (extra_env or {}).get(TOKEN_ENV) or secrets.token_hex(16)
    env = {**os.environ, **(extra_env or {}), TOKEN_ENV: token, "PYTHONUNBUFFERED": "1"}
    if cfg.run.hub_offline:
        env["HF_HUB_OFFLINE"] = "1"
    metrics = MetricsTail.from_end(store)
    store.append_metrics({"source": "launcher", "event": "attempt", "resume": resume, **(event or {})})
    display = display or Display(cfg)
    children: list[Child] = []
    tracker = Tracker(cfg, store, run_yaml, env)
    try:
        for name, argv in commands(cfg, run_yaml, resume).items():
            children.append(start(name, argv, store, env))
        tracker.start()
        # What must end (with 0) for the stage to be done; the servers only serve them. A shared
        # stage's step holds both its servers and its trainer ranks: its servers end once the
        # trainer has finished (deepscaler.slurm.shared_task).
        workers = [c for c in children if c.name in ("trainer", "orchestrator", "shared")]
        with display:
            while True:
                display.update(metrics.poll())
                failed = [c for c in children if c.proc.poll() not in (None, 0)]
                # A server ends by itself (exit 0) once the trainer has finished; before, any end is early.
                early = [c for c in children if c not in workers and c.proc.poll() is not None]
                if early and not failed and handover.finished(store, "trainer", env[ATTEMPT_ENV]):
                    early = []
                if failed or early:
                    raise LaunchError(failure(cfg, store, children, (failed or early)[0]))
                if all(c.proc.poll() == 0 for c in workers):
                    break
                tracker.check()
                time.sleep(0.5)
            display.update(metrics.poll())
            wait_until_ended(children, STOP_GRACE_S)  # the servers stop by themselves; stop() is for stragglers
    finally:
        stop(children)
        tracker.stop()  # last: it forwards what the others wrote up to their end
    return store


def wait_until_ended(children: list[Child], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(c.proc.poll() is None for c in children) and time.monotonic() < deadline:
        time.sleep(0.2)


def failure(cfg: Config, store: RunStore, children: list[Child], first: Child) -> str:
    """The LaunchError of a stage whose process ``first`` ended: one line, then a log tail.
    Stops every process of the stage on the way.

    A dead server is named as such, however its death was first seen: its own exit (a local
    server process), srun's report in the servers step's log (one step runs every server, and
    ``--kill-on-bad-exit`` ends it when one dies), or the orchestrator's refused request (it
    exits with SERVER_DIED_EXIT; the server's end then shows within moments)."""
    from deepscaler.inference.client import SERVER_DIED_EXIT, server_died_line

    wait_s = SERVER_DEATH_WAIT_S if first.name == "orchestrator" and first.proc.returncode == SERVER_DIED_EXIT else 0
    dead = dead_server(cfg, children, wait_s)
    stop(children)  # before the newest checkpoint is read for the resume hint: nothing writes one after
    if dead is None:
        what = f"{first.name} exited with code {first.proc.returncode}"
        end = step_task_end(first) if first.name == "shared" else None
        if end is not None:  # the step's task that ended first: a trainer rank (a server is a dead server)
            from deepscaler.slurm.shared_task import task_name

            what = f"{task_name(cfg, end[1])} on {end[0]} {end[2]} (job step shared)"
        return f"{what} (stage {cfg.run.stage} of run '{cfg.run.name}')\n{first.tail()}"
    name, node, how, child = dead
    beat, orchestrator = handover.read(store, name), handover.read(store, "orchestrator")
    line = server_died_line(name, node or (beat.host if beat else None), store.read_server_addresses().get(name), how,
                            cfg.run.stage, cfg.run.name, orchestrator.step if orchestrator else None,
                            store.latest_stable("checkpoints"))
    return f"{line}\n{child.tail()}"


def dead_server(cfg: Config, children: list[Child], wait_s: float = 0.0) -> tuple[str, str | None, str, Child] | None:
    """(name, node or None, how it ended, its child) of the server that died first, waiting up
    to ``wait_s`` for one to show; None if none did."""
    from deepscaler.inference.client import how_it_ended
    from deepscaler.slurm.shared_task import task_name

    deadline = time.monotonic() + wait_s
    while True:
        for c in children:
            # A job step of servers, where srun names the task: server<task>, or in a shared
            # step whichever process the task runs (a trainer rank is not a server death).
            if c.name in ("servers", "shared"):
                task = step_task_end(c)
                name = None if task is None else task_name(cfg, task[1]) if c.name == "shared" else f"server{task[1]}"
                if name is not None and name.startswith("server"):
                    return name, task[0], task[2], c
            elif c.name.startswith("server") and c.proc.poll() is not None:
                return c.name, None, how_it_ended(c.proc.returncode), c
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


def step_task_end(child: Child) -> tuple[str, int, str] | None:
    """(node, task, how it ended) of the first task srun reported ending badly in this
    attempt's part of a job step's log, or None."""
    from deepscaler.inference.client import first_dead_task

    with open(child.log, "rb") as f:  # its end: srun reports a task at once, the log may be long
        f.seek(max(0, f.seek(0, os.SEEK_END) - (1 << 20)))
        text = f.read().decode("utf-8", "replace")
    return first_dead_task(text[text.rfind("\n=== ") + 1:])


class Tracker:
    """The W&B forwarder (``deepscaler.tracking``) when ``wandb.project`` is set: one per stage,
    beside the other processes. Tracking is optional, so its failure never fails the stage: it
    is restarted (it continues the same W&B run) up to :data:`RESTARTS` times, then left off."""

    RESTARTS = 3

    def __init__(self, cfg: Config, store: RunStore, run_yaml: Path, env: dict[str, str]):
        self.on = enabled(cfg)
        self.store, self.env = store, env
        self.argv = [sys.executable, "-m", "deepscaler.tracking", "--config", str(run_yaml)]
        self.child: Child | None = None
        self.restarts = 0

    def start(self) -> None:
        if self.on:
            self.child = start("tracking", self.argv, self.store, self.env)

    def check(self) -> None:
        if self.child is None or self.child.proc.poll() is None:
            return
        code = self.child.proc.returncode
        if self.restarts < self.RESTARTS:
            self.restarts += 1
            print(f"warning: the W&B forwarder exited with code {code}; restarting it "
                  f"({self.restarts}/{self.RESTARTS}); see {self.child.log}", file=sys.stderr, flush=True)
            self.start()
        else:
            print(f"warning: the W&B forwarder exited with code {code} again; W&B logging is off for the rest "
                  f"of this attempt (metrics.jsonl has everything); see {self.child.log}", file=sys.stderr, flush=True)
            self.child = None

    def stop(self) -> None:
        if self.child is not None:
            stop([self.child], grace_s=TRACKING_GRACE_S)
