"""A node dies under a running stage: on the local Slurm cluster, SIGKILL the slurmd of the node
that runs the trainer and the orchestrator (het component 1), together with every process of
that component on it (its slurmstepds and their children), as a power loss would. Slurm marks
the node DOWN after ``SlurmdTimeout`` (30 s in slurm/local/slurm.conf), the job ends NODE_FAIL
and, being ``--requeue``, is queued again; once the node is back the next attempt resumes from
the newest stable checkpoint. The steps lost are at most ``checkpoint.interval``.

Needs root (it kills and restarts a slurmd), as ``slurm/local/up.sh`` does."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from deepscaler.store import RunStore
from tests.integration.test_slurm_stage import (cancel_leftover_jobs, job_ended, only_stable_steps, sacct, submit,
                                                submitted_jobs, wait_until)
from tests.slurm_cluster import in_ci, slurm_env

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.trial]  # over 2 minutes: benchmarks/slow_trials.py
__all__ = ["cancel_leftover_jobs"]  # autouse: no job of a failed test stays queued
INTERVAL = 2
STEPS = 8


def run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, env=slurm_env(), timeout=30).stdout


def node_state(node: str) -> str:
    return run("sinfo", "-h", "-n", node, "-o", "%T").strip()


def history(job: str) -> str:
    """Every instance of the job so far (``sacct -D``), one ``id|state`` line per component."""
    return run("sacct", "-D", "-X", "-n", "-P", "-j", job, "-o", "JobID,State")


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (read before killing it: orphans are re-parented to init)."""
    by_parent: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            by_parent.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = by_parent.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def stepds_of(component_job: str) -> list[int]:
    """The slurmstepd processes of one het component (their titles are ``slurmstepd: [<id>.<step>]``)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith(f"slurmstepd: [{component_job}."):
                pids.append(int(entry))
    return pids


def kill_node(node: str, component_job: str) -> int:
    """SIGKILL the node's slurmd and everything the component runs there; returns how many processes."""
    victims = [int(Path(f"/run/slurmd-{node}.pid").read_text())]
    for stepd in stepds_of(component_job):
        victims += [stepd, *children(stepd)]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(victims)


@pytest.fixture
def restore_nodes():
    """Whatever happens, leave both slurmds running and their nodes in service."""
    yield
    for node in ("node1", "node2"):
        pid_file = Path(f"/run/slurmd-{node}.pid")
        alive = pid_file.is_file() and Path(f"/proc/{pid_file.read_text().strip()}").exists()
        if not alive:
            subprocess.run(["/usr/sbin/slurmd", "-N", node], check=False)
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True,
                       env=slurm_env(), check=False)
    wait_until(lambda: all(node_state(n) in ("idle", "mixed", "allocated") for n in ("node1", "node2")), 120,
               "both nodes back in service")


@pytest.mark.timeout(1500)
def test_a_dead_node_requeues_the_job_and_resume_loses_at_most_one_interval(slurm_cluster, restore_nodes,
                                                                            tmp_path: Path) -> None:
    if os.geteuid() != 0:
        (pytest.fail if in_ci() else pytest.skip)("kills and restarts a slurmd: run as root, like slurm/local/up.sh")
    out = submit(tmp_path, "--stage", "1", "--executor", "slurm", "--max-steps", str(STEPS),
                 f"checkpoint.interval={INTERVAL}")
    assert out.returncode == 0, out.stderr
    store = RunStore(tmp_path, "tiny", 1)
    (job,) = submitted_jobs(store)
    # Between two checkpoints (4 and 6), so that the resume has a step to compute again.
    wait_until(lambda: store.is_stable("checkpoints", 4) and store.is_stable("weights", 5), 600, "weights step 5")

    rows = [line.split() for line in run("squeue", "-h", "-j", job, "-o", "%i %A %N").splitlines()]
    (component, node), = [(jid, n) for het, jid, n in rows if het == f"{job}+1"]
    assert kill_node(node, component) >= 3  # slurmd, a slurmstepd and the trainer at least
    done_before = store.latest_stable("weights")  # the killed trainer publishes nothing more

    # sinfo may go on showing the node as "mixed*" (its job cannot finish completing there).
    wait_until(lambda: "NODE_FAIL" in history(job), 180, f"Slurm to declare {node} failed", poll=2)
    subprocess.run(["/usr/sbin/slurmd", "-N", node], check=True)  # the node comes back (ReturnToService=2)
    wait_until(lambda: job_ended(job) and sacct(job).get(f"{job}+1") == "COMPLETED", 900,
               f"the requeued job {job} to finish", poll=3)

    attempts = [r for r in store.read_metrics().records if r.get("event") == "attempt"]
    assert [a["restart_count"] for a in attempts][:2] == [0, 1], attempts  # requeued by Slurm, not resubmitted
    starts = [r for r in store.read_metrics().records if r.get("source") == "trainer" and r.get("event") == "start"]
    resumed_from = starts[-1]["step"]
    print(f"node failure: {done_before} steps done, resumed from checkpoint {resumed_from}, "
          f"{done_before - resumed_from} lost (interval {INTERVAL})")
    assert done_before - resumed_from <= INTERVAL, (done_before, resumed_from)
    assert store.is_stable("weights", STEPS)
    only_stable_steps(store)
