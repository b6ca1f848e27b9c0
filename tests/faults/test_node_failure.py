"""A node dies under a running stage: on the local Slurm cluster, SIGKILL the slurmd of the node
that runs the trainer and the orchestrator (het component 1), together with every process of
that component on it (its slurmstepds and their children), as a power loss would. Slurm marks
the node DOWN after ``SlurmdTimeout`` (15 s in slurm/local/slurm.conf), the job ends NODE_FAIL
and, being ``--requeue``, is queued again (same job id); the next attempt, on other nodes or
once the node is back, resumes from the newest stable checkpoint. The steps lost are at most
``checkpoint.interval``.

Needs root (it kills and restarts a slurmd), as ``slurm/local/up.sh`` does."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from deepscaler.store import RunStore
from tests.helpers.chaos import REFERENCE_STEPS, final_weights
from tests.integration.test_slurm_stage import (cancel_leftover_jobs, only_stable_steps, sacct, submit, submitted_jobs,
                                                wait_until)
from tests.slurm_cluster import in_ci, slurm_env

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
__all__ = ["cancel_leftover_jobs"]  # autouse: no job of a failed test stays queued
INTERVAL = 2  # the reference stage's checkpoint.interval
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, env=slurm_env(), timeout=30).stdout


def node_state(node: str) -> str:
    return run("sinfo", "-h", "-n", node, "-o", "%T").strip()


def history(job: str) -> str:
    """Every instance of the job so far (``sacct -D``), one ``id|state`` line per component."""
    return run("sacct", "-D", "-X", "-n", "-P", "-j", job, "-o", "JobID,State")


def instances(job: str) -> list[str]:
    """The state of each instance of the job (its first component), oldest first."""
    return [line.split("|")[1].split()[0] for line in history(job).splitlines() if line.startswith(f"{job}+0|")]


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


def nodes() -> list[str]:
    """Every node of the cluster (node1..node4 on the local one)."""
    return run("sinfo", "-h", "-N", "-o", "%N").split()


def slurmd_alive(node: str) -> bool:
    pid_file = Path(f"/run/slurmd-{node}.pid")
    return pid_file.is_file() and Path(f"/proc/{pid_file.read_text().strip()}").exists()


def in_service(node: str) -> bool:
    """Answering (no ``*``) and usable: idle, mixed, allocated or completing."""
    return node_state(node) in ("idle", "mixed", "allocated", "completing")


@pytest.fixture
def restore_nodes():
    """Whatever happens, leave every node's slurmd running and the nodes in service (the test
    kills the slurmd of whichever node runs the trainer)."""
    yield
    for node in nodes():
        if not slurmd_alive(node):
            subprocess.run(["/usr/sbin/slurmd", "-N", node], check=False)
        if node_state(node).startswith("down"):
            subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True,
                           env=slurm_env(), check=False)
    wait_until(lambda: all(map(in_service, nodes())), 120, "every node back in service")


@pytest.mark.timeout(600)
def test_a_dead_node_requeues_the_job_and_resume_loses_at_most_one_interval(slurm_cluster, restore_nodes,
                                                                            reference_stage: RunStore,
                                                                            tmp_path: Path) -> None:
    """The session's reference stage (4 deterministic steps, a checkpoint every 2) loses its
    trainer's node after step 3, between checkpoints 2 and 4: the requeued job computes step 3
    again and ends with the reference's weights, bit for bit. About 2 minutes, a third of it the
    wait for NODE_FAIL."""
    if os.geteuid() != 0:
        (pytest.fail if in_ci() else pytest.skip)("kills and restarts a slurmd: run as root, like slurm/local/up.sh")
    out = submit(tmp_path, "--stage", "1", "--executor", "slurm", "--max-steps", str(REFERENCE_STEPS),
                 "run.deterministic=true", f"checkpoint.interval={INTERVAL}")
    assert out.returncode == 0, out.stderr
    store = RunStore(tmp_path, "tiny", 1)
    (job,) = submitted_jobs(store)
    wait_until(lambda: store.is_stable("checkpoints", INTERVAL) and store.is_stable("weights", INTERVAL + 1), 400,
               f"weights step {INTERVAL + 1}", poll=0.2)

    rows = [line.split() for line in run("squeue", "-h", "-j", job, "-o", "%i %A %N").splitlines()]
    (component, node), = [(jid, n) for het, jid, n in rows if het == f"{job}+1"]
    assert kill_node(node, component) >= 3  # slurmd, a slurmstepd and the trainer at least
    killed_at = time.monotonic()
    done_before = store.latest_stable("weights")  # the killed trainer publishes nothing more
    assert done_before < REFERENCE_STEPS, done_before

    # sinfo may go on showing the node as "mixed*" (its job cannot finish completing there).
    wait_until(lambda: "NODE_FAIL" in history(job), 180, f"Slurm to declare {node} failed", poll=1)
    detected_s = time.monotonic() - killed_at
    subprocess.run(["/usr/sbin/slurmd", "-N", node], check=True)  # the node comes back (ReturnToService=2)
    wait_until(lambda: len(instances(job)) >= 2 and instances(job)[-1] in FINAL, 400,
               f"the requeued job {job} to end", poll=1)
    assert instances(job)[-1] == "COMPLETED" and sacct(job).get(f"{job}+1") == "COMPLETED", history(job)

    attempts = [r for r in store.read_metrics().records if r.get("event") == "attempt"]
    assert [a["restart_count"] for a in attempts][:2] == [0, 1], attempts  # requeued by Slurm, not resubmitted
    assert {str(a["slurm_job_id"]) for a in attempts} == {job}, attempts
    starts = [r for r in store.read_metrics().records if r.get("source") == "trainer" and r.get("event") == "start"]
    resumed_from = starts[-1]["resumed_from"]
    print(f"node failure: {done_before} steps done, resumed from checkpoint {resumed_from}, "
          f"{done_before - resumed_from} lost (interval {INTERVAL}); NODE_FAIL {detected_s:.0f} s after the kill, "
          f"done {time.monotonic() - killed_at:.0f} s after it")
    assert resumed_from == INTERVAL and done_before - resumed_from <= INTERVAL, (done_before, resumed_from)
    final, expected = final_weights(store, REFERENCE_STEPS), final_weights(reference_stage, REFERENCE_STEPS)
    assert final.keys() == expected.keys() and all((final[k] == expected[k]).all() for k in expected)
    only_stable_steps(store)
