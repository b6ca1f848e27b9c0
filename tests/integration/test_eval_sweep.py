"""The eval sweep on the real local Slurm cluster: a tiny run of 2 steps (local executor), then
ONE array job through submitit with a task per weights step plus the base model, the report,
and a second sweep that finds nothing to do; then the plain script of ``--emit-sbatch``,
submitted with ``sbatch`` itself.
About 3-4 minutes on a loaded 2-core machine."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepscaler.store import RunStore
from tests.slurm_cluster import TEST_ACCOUNT, SlurmCluster, slurm_env

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}
BENCHES = ("math500", "aime2024")


def env() -> dict[str, str]:
    return {**slurm_env(), "PYTHONPATH": str(REPO), "DEEPSCALER_PYTHON": sys.executable}


def cli(*argv: str, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=REPO, env=env(),
                          timeout=timeout)


def sacct(job_id: str) -> dict[str, tuple[str, str]]:
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,JobName,State"],
                         capture_output=True, text=True, timeout=15, env=slurm_env()).stdout
    rows = [line.split("|") for line in out.splitlines() if line.count("|") == 2]
    return {jid: (name, state.split()[0] if state else "") for jid, name, state in rows}


def wait_final(job_id: str, count: int, timeout_s: float = 240) -> dict[str, tuple[str, str]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = {k: v for k, v in sacct(job_id).items() if "[" not in k}
        if len(jobs) >= count and all(state in FINAL for _, state in jobs.values()):
            return jobs
        time.sleep(2)
    subprocess.run(["scancel", job_id], env=slurm_env(), timeout=15)
    pytest.fail(f"job {job_id} not finished after {timeout_s:.0f}s: {sacct(job_id)}")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> RunStore:
    out = tmp_path_factory.mktemp("eval sweep")  # a space in the path: every command must quote it
    done = cli("deepscaler.submit", "--stage", "1", "--preset", "tiny-random", "--executor", "local",
               "--output-dir", str(out), "--max-steps", "2")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    store = RunStore(out, "tiny", 1)
    assert store.stable_steps("weights") == [1, 2]  # keep_last 2 of the tiny preset
    return store


def test_sweep_is_one_array_with_a_task_per_step(slurm_cluster, tiny_run: RunStore) -> None:
    store = tiny_run
    t0 = time.monotonic()
    done = cli("deepscaler.eval", "sweep", "--output-dir", str(store.output_dir), "--stage", "1", "--include-base",
               "--max-parallel", "2", "--wait")
    elapsed = time.monotonic() - t0
    assert done.returncode == 0, done.stdout + done.stderr
    submitted = [line for line in done.stdout.splitlines() if line.startswith("submitted eval array ")]
    assert len(submitted) == 1, done.stdout
    array = submitted[0].split()[3]
    assert f"{array}_0=base, {array}_1=step_1, {array}_2=step_2" in submitted[0]

    jobs = sacct(array)
    assert jobs == {f"{array}_{i}": ("e1-tiny-deepscaler", "COMPLETED") for i in range(3)}, jobs
    script = (store.logs_dir / "slurm-eval" / f"{array}_submission.sh").read_text()
    assert "#SBATCH --array=0-2%2" in script and "#SBATCH --cpus-per-task=1" in script

    for what in ("base", 1, 2):
        for bench in BENCHES:
            assert store.eval_path(what, bench).is_file(), (what, bench)
    assert store.pending_evals() == []  # every task removed its step's marker
    assert (store.evals_dir / "eval.png").stat().st_size > 20_000
    report = (store.evals_dir / "report.md").read_text()
    assert "| step 1 |" in report and "| step 2 |" in report and "(base) |" in report
    print(f"sweep of 3 tasks, 2 at a time: {elapsed:.1f}s")

    # Everything is evaluated: a second sweep submits nothing.
    again = cli("deepscaler.eval", "sweep", "--output-dir", str(store.output_dir), "--include-base")
    assert again.returncode == 0 and "nothing to evaluate" in again.stdout, again.stdout + again.stderr
    assert "submitted" not in again.stdout


def test_emitted_script_runs_with_plain_sbatch(slurm_cluster: SlurmCluster, tiny_run: RunStore) -> None:
    """No submitit: the script ``--emit-sbatch`` writes, submitted as a user would, one result
    per step; its header carries the partition and account of the config."""
    store = tiny_run
    shutil.rmtree(store.evals_dir, ignore_errors=True)  # whatever the test above evaluated: again
    script = store.output_dir / "eval array.sh"
    site = [f"slurm.partition={slurm_cluster.partition}"]
    if TEST_ACCOUNT in slurm_cluster.accounts:
        site.append(f"slurm.account={TEST_ACCOUNT}")
    done = cli("deepscaler.eval", "sweep", "--output-dir", str(store.output_dir), "--max-parallel", "2",
               "--emit-sbatch", str(script), *site)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == f"sbatch {shlex.quote(str(script.resolve()))}", done.stdout
    assert store.pending_evals() == [1, 2]  # claimed at emit, as a sweep claims at submit
    queued = subprocess.run(["squeue", "-h", "-n", "e1-tiny-deepscaler", "-t", "PD,R", "-o", "%i"], capture_output=True,
                            text=True, timeout=15, env=slurm_env()).stdout
    assert not queued.strip(), queued  # the command itself submits nothing

    sub = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=30, env=env())
    assert sub.returncode == 0, sub.stderr
    array = sub.stdout.strip().split(";")[0]
    jobs = wait_final(array, 2)
    assert jobs == {f"{array}_{i}": ("e1-tiny-deepscaler", "COMPLETED") for i in range(2)}, jobs
    rows = subprocess.run(["sacct", "-n", "-P", "-X", "-j", array, "-o", "Partition,Account"], capture_output=True,
                          text=True, timeout=15, env=slurm_env()).stdout.split()
    assert {row.split("|")[0] for row in rows} == {slurm_cluster.partition}, rows
    if TEST_ACCOUNT in slurm_cluster.accounts:
        assert {row.split("|")[1] for row in rows} == {TEST_ACCOUNT}, rows
    for step in (1, 2):
        for bench in BENCHES:
            assert store.eval_path(step, bench).is_file(), (step, bench)
    assert sorted(store.read_evals()) == [1, 2]  # one result per step, nothing else
    assert store.pending_evals() == []  # each task removed its step's claim
