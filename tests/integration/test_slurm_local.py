"""The local Slurm cluster (slurm/local/up.sh) does what the project needs from Slurm.

A heterogeneous job puts its two components on the two nodes (inference on one, trainer and
orchestrator on the other), an array runs its tasks at once, submitit submits and reads back a
result, and sacct reports each piece. Real jobs, about 15 s in all.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import slurm_env

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def sbatch(script: Path) -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", str(script)],
        capture_output=True, text=True, timeout=15, check=True, cwd=script.parent, env=slurm_env(),
    )
    return out.stdout.strip().split(";")[0].split("+")[0]


def wait_states(job_id: str, expected: set[str], timeout_s: float = 40.0) -> dict[str, str]:
    """Poll sacct until every id in ``expected`` has a final state; return {id: state}."""
    deadline = time.monotonic() + timeout_s
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State"],
            capture_output=True, text=True, timeout=15, env=slurm_env(),
        ).stdout
        states = dict(line.split("|", 1) for line in out.splitlines() if "|" in line)
        states = {k: v.split()[0] for k, v in states.items() if v}  # "CANCELLED by 0" -> CANCELLED
        if expected <= states.keys() and all(states[k] in FINAL for k in expected):
            return states
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], timeout=15, env=slurm_env())
    pytest.fail(f"job {job_id} not finished after {timeout_s:.0f}s: sacct says {states}, expected {sorted(expected)}")


def logs(folder: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(folder.glob("*.out")))


def test_het_job_components_land_on_both_nodes(slurm_cluster, tmp_path):
    script = tmp_path / "het.sh"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --job-name=het-smoke --output=het-%j.out --time=2\n"
        "#SBATCH --ntasks=1 --cpus-per-task=1 --mem=200M\n"
        "#SBATCH hetjob\n"
        "#SBATCH --ntasks=1 --cpus-per-task=2 --mem=200M --time=2\n"
        "srun --het-group=0 bash -c 'echo $SLURMD_NODENAME > comp0' &\n"
        "srun --het-group=1 bash -c 'echo $SLURMD_NODENAME > comp1' &\n"
        "wait\n"
    )
    job_id = sbatch(script)
    states = wait_states(job_id, {f"{job_id}+0", f"{job_id}+1"})
    assert states == {f"{job_id}+0": "COMPLETED", f"{job_id}+1": "COMPLETED"}, logs(tmp_path)
    nodes = [(tmp_path / f"comp{k}").read_text().strip() for k in (0, 1)]
    # Two distinct nodes, whichever two of the four: other jobs may hold node1 or node2.
    assert len(set(nodes)) == 2 and set(nodes) <= set(slurm_cluster.nodes), (nodes, logs(tmp_path))


def test_array_tasks_run_at_once(slurm_cluster, tmp_path):
    script = tmp_path / "array.sh"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --job-name=array-smoke --output=array-%A_%a.out --time=2\n"
        "#SBATCH --array=0-2 --ntasks=1 --cpus-per-task=1 --mem=100M\n"
        # A barrier, not a clock: each task waits (up to 60 s) until all three have started, and
        # says which it saw. Tasks run one after another would each see only the earlier ones.
        "touch start$SLURM_ARRAY_TASK_ID\n"
        "for i in $(seq 600); do [ -e start0 ] && [ -e start1 ] && [ -e start2 ] && break; sleep 0.1; done\n"
        "ls start* > saw$SLURM_ARRAY_TASK_ID\n"
    )
    job_id = sbatch(script)
    expected = {f"{job_id}_{k}" for k in range(3)}
    states = wait_states(job_id, expected, timeout_s=240)
    assert {k: states[k] for k in expected} == dict.fromkeys(expected, "COMPLETED"), logs(tmp_path)
    saw = {k: (tmp_path / f"saw{k}").read_text().split() for k in range(3)}
    assert saw == dict.fromkeys(range(3), ["start0", "start1", "start2"]), f"array tasks ran one after another: {saw}"


def test_submitit_submit_and_result(slurm_cluster, tmp_path):
    submitit = pytest.importorskip("submitit")
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit")
    assert executor.cluster == "slurm"
    executor.update_parameters(timeout_min=2, cpus_per_task=1, mem_gb=1, name="submitit-smoke")

    def probe(a: int, b: int):  # pickled by value: the job must find the venv and the project
        return a + b, os.getenv("SLURMD_NODENAME"), sys.executable, importlib.import_module("deepscaler").__file__

    with submitit.helpers.clean_env():
        job = executor.submit(probe, 2, 3)
    deadline = time.monotonic() + 40
    while not job.done() and time.monotonic() < deadline:
        time.sleep(0.5)
    if not job.done():
        job.cancel(check=False)
        pytest.fail(f"submitit job {job.job_id} not done after 40 s: {job.get_info(mode='force')}")
    total, node, python, package = job.result()
    assert total == 5
    assert node in slurm_cluster.nodes
    assert python == sys.executable
    assert Path(package).resolve().is_relative_to(REPO)
    # done() reads the result file; accounting may take a moment longer to record the end.
    deadline = time.monotonic() + 30
    while (state := job.get_info(mode="force").get("State")) != "COMPLETED" and time.monotonic() < deadline:
        time.sleep(1)
    assert state == "COMPLETED"
