"""submitit, extended for the scripts we render, and the states of the jobs it submits.

submitit has no heterogeneous-job support (facebookincubator/submitit#1741). So
:class:`ScriptExecutor` keeps submitit's machinery (the pickled callable, job tracking, log
files, ``job.result()``, requeue on timeout and preemption) and swaps in a script rendered by
``options.script``. sacct reports a hetjob's components as ``ID+0`` and ``ID+1`` while submitit
looks up ``ID``: :class:`HetInfoWatcher` folds the component states into one
(:func:`combine_states`).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable

import submitit
from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

from deepscaler.slurm.options import Request, script, time_minutes
from deepscaler.store import private_dir

# sacct states, most telling first: a failed component fails the job, a running one keeps it alive.
FAILED = ("NODE_FAIL", "OUT_OF_MEMORY", "FAILED", "TIMEOUT", "CANCELLED", "BOOT_FAIL", "DEADLINE", "PREEMPTED")
ACTIVE = ("RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED", "PENDING")
# How long a just-submitted job may be missing from sacct before its state reads UNKNOWN
# (slurmdbd records a job moments after sbatch; a busy one takes longer).
UNKNOWN_AFTER_S = 120.0


def combine_states(states: Iterable[str]) -> str:
    """One job state from the states of its components (sacct's ``ID+K`` lines).

    ``CANCELLED by 0`` counts as CANCELLED. A failure anywhere wins (the stage cannot go on
    without either side); then anything still active; COMPLETED only when every component is.
    """
    base = [s.split()[0] if s else "UNKNOWN" for s in states]
    for group in (FAILED, ACTIVE):
        for state in group:
            if state in base:
                return state
    if base and all(s == "COMPLETED" for s in base):
        return "COMPLETED"
    return base[0] if base else "UNKNOWN"


def ended(state: str) -> bool:
    """Done for good: completed, or failed in a way nobody requeues (a preempted job comes back)."""
    return state == "COMPLETED" or (state in FAILED and state != "PREEMPTED")


class HetInfoWatcher(SlurmInfoWatcher):
    """submitit's sacct reader, plus one entry ``ID`` per hetjob folded from ``ID+K``."""

    def read_info(self, string):
        info = super().read_info(string)
        components: dict[str, list[dict]] = {}
        for key, stats in info.items():
            m = re.fullmatch(r"(\d+)\+(\d+)", key)
            if m:
                components.setdefault(m.group(1), []).append(stats)
        for job_id, parts in components.items():
            info[job_id] = {**parts[0], "State": combine_states(p.get("State", "") for p in parts),
                            "NodeList": ",".join(p.get("NodeList", "") for p in parts)}
        return info


class HetJob(SlurmJob):
    watcher = HetInfoWatcher(delay_s=60)


class ScriptExecutor(submitit.SlurmExecutor):
    """submitit's Slurm executor with a script from ``options.script`` (one component per
    request: a hetjob for two or more). submitit's runner is the job's supervisor: one task,
    in the batch shell."""

    job_class = HetJob

    def __init__(self, folder: Path, slurm_cfg, requests: list[Request], *, name: str, comment: str,
                 dependency: str | None = None):
        super().__init__(folder=folder, max_num_timeout=slurm_cfg.max_requeues)
        self.slurm_cfg, self.requests, self.name, self.comment = slurm_cfg, requests, name, comment
        self.dependency = dependency
        self.parameters["time"] = time_minutes(slurm_cfg.time)  # submitit counts timeouts with it

    def render(self, command: str) -> str:
        return script(self.slurm_cfg, self.requests, name=self.name, folder=self.folder, command=command,
                      comment=self.comment, dependency=self.dependency)

    def _make_submission_file_text(self, command: str, uid: str) -> str:
        return self.render(command)

    def _internal_process_submissions(self, delayed_submissions):
        """submitit's submission, into a folder only the owner can enter: it holds the job's
        pickle, which submitit unpickles at every start and requeue (store.private_dir)."""
        private_dir(self.folder)
        return super()._internal_process_submissions(delayed_submissions)

    def _num_tasks(self) -> int:
        return 1


def plain_array_script(slurm_cfg, request: Request, *, name: str, folder: Path, comment: str, tasks: int,
                       parallel: int, prelude: list[str], command: str) -> str:
    """A plain ``sbatch`` array script, ``tasks`` tasks with ``parallel`` at a time, that a user
    can read, edit and submit: :func:`options.script`'s header (a stage job's, from the same
    ``slurm`` settings) plus ``--array``; after the site's set-up lines, ``prelude`` (shell lines
    that pick a task's work by ``SLURM_ARRAY_TASK_ID``), then ``exec command``. Nothing of
    submitit runs in it, so USR2 (``--signal``, submitit's requeue) is ignored: a task runs to
    its time limit and ends TIMEOUT rather than dying early without a word."""
    s = replace(slurm_cfg, extra_sbatch=[*slurm_cfg.extra_sbatch, f"--array=0-{tasks - 1}%{parallel}"],
                setup=[*slurm_cfg.setup, "", "trap '' USR2  # no submitit here to requeue on it", *prelude])
    return script(s, [request], name=name, folder=folder, command=command, comment=comment)


def runner_command(folder: Path) -> str:
    """What the batch shell runs: submitit's job runner on ``folder``."""
    import shlex

    return f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"


def job_states(jobs: list) -> dict[str, str]:
    """``{job_id: state}`` of submitit jobs from one fresh sacct call (their watcher's);
    UNKNOWN until sacct has a record of a job."""
    for job in jobs:
        job.watcher.register_job(job.job_id)
    if jobs:
        jobs[0].watcher.update()
    return {job.job_id: (job.watcher.get_state(job.job_id, mode="cache") or "UNKNOWN").split()[0] for job in jobs}


def wait_for_jobs(jobs: list, on_poll: Callable[[dict[str, str]], None] | None = None,
                  poll_s: float = 5.0, unknown_after_s: float = UNKNOWN_AFTER_S) -> dict[str, str]:
    """Poll until every job has :func:`ended`; returns ``{job_id: final state}``. ``on_poll``
    sees the states of each round (a display, state-change lines).

    A job that sacct has no record of yet was just submitted (slurmdbd records it moments
    later): PENDING, for ``unknown_after_s``. After that it is UNKNOWN, and a warning says once
    that Slurm's accounting may be down (docs/troubleshooting.md)."""
    start, warned = time.monotonic(), set()
    while True:
        states = job_states(jobs)
        late = time.monotonic() - start >= unknown_after_s
        for job_id, state in states.items():
            if state == "UNKNOWN" and not late:
                states[job_id] = "PENDING"
            elif state == "UNKNOWN" and job_id not in warned:
                warned.add(job_id)
                print(f"warning: sacct has had no record of job {job_id} for {unknown_after_s:.0f} s: is Slurm's "
                      f"accounting (slurmdbd) up? Check with: sacct -j {job_id} (docs/troubleshooting.md, Slurm jobs)",
                      file=sys.stderr, flush=True)
        if on_poll is not None:
            on_poll(states)
        if all(ended(s) for s in states.values()):
            return states
        time.sleep(poll_s)


def job_state(job_id: str, timeout_s: float = 2.0) -> str | None:
    """The state sacct gives job ``job_id`` now (its components' folded: :func:`combine_states`),
    or None when sacct has no record or no answer within ``timeout_s``."""
    try:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True,
                             timeout=timeout_s).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line for line in out.splitlines() if line.strip()]
    return combine_states(lines) if lines else None


def first_node_address(nodelist: str) -> str:
    """The address of the first node of a Slurm node list (``gpu[01-04]`` -> gpu01's NodeAddr).

    NodeAddr, not the node name: names need not resolve (the local cluster's node2 is
    127.0.0.1), and NodeAddr is what Slurm itself uses to reach the node."""
    names = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    first = names.stdout.split()[0]
    node = subprocess.run(["scontrol", "show", "node", "-o", first], capture_output=True, text=True)
    m = re.search(r"\bNodeAddr=(\S+)", node.stdout)
    return m.group(1) if m else first
