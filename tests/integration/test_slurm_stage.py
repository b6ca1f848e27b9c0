"""Stages as real heterogeneous jobs on the local Slurm cluster (slurm/local/up.sh): one job
per stage, chained stages, requeue at a time limit, scancel and resume, sbatch's own errors."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from deepscaler.config import yaml_dir
from deepscaler.inference.contract import read_token, token_path
from deepscaler.slurm.stage_job import stage_error
from deepscaler.store import STABLE, RunStore
from tests.helpers.chaos import REFERENCE_STEPS
from tests.slurm_cluster import HINT, TEST_ACCOUNT, slurm_env

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def cancel_leftover_jobs(tmp_path: Path):
    """A failed or timed-out test must not leave its jobs queued on the cluster."""
    yield
    for metrics in tmp_path.rglob("metrics.jsonl"):
        store = RunStore(metrics.parents[2], metrics.parents[1].name, int(metrics.parent.name.removeprefix("stage")))
        if submitted_jobs(store):
            subprocess.run(["scancel", *submitted_jobs(store)], env=slurm_env(), check=False)


def submit_argv(out: Path | None, *args: str, presets: tuple[str, ...] = ("tiny-random",)) -> list[str]:
    """``out`` None: no ``--output-dir``, a preset (a site file) gives it."""
    return [sys.executable, "-m", "deepscaler.submit", *(arg for p in presets for arg in ("--preset", p)),
            *(["--output-dir", str(out)] if out else []), *args]


def submit(out: Path | None, *args: str, timeout: int = 600, umask: int | None = None,
           presets: tuple[str, ...] = ("tiny-random",)) -> subprocess.CompletedProcess:
    """``umask``: the one the submitting shell has (Slurm hands it on to the job)."""
    return subprocess.run(submit_argv(out, *args, presets=presets), capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env=slurm_env(),
                          preexec_fn=None if umask is None else (lambda: os.umask(umask)))


def modes_beyond(root: Path, allowed: int) -> list[str]:
    """Every file and folder under ``root`` (links aside) whose mode has a bit outside ``allowed``
    for group and others: none may appear (docs/security.md), and submitit's folder is 0700."""
    bad = []
    for path in [root, *root.rglob("*")]:
        mode = path.lstat().st_mode
        if not stat.S_ISLNK(mode) and mode & 0o077 & ~allowed:
            bad.append(f"{oct(mode & 0o777)} {path}")
    slurm = root / "stage1" / "logs" / "slurm"
    if slurm.lstat().st_mode & 0o777 != 0o700:
        bad.append(f"{oct(slurm.lstat().st_mode & 0o777)} {slurm} (submitit's folder must be 0700)")
    return bad


def sacct(job_id: str) -> dict[str, str]:
    out = subprocess.run(["sacct", "-P", "-n", "-j", job_id, "-o", "JobID,State"], capture_output=True, text=True,
                         env=slurm_env())
    return dict(line.split("|", 1) for line in out.stdout.splitlines() if "|" in line)


def submitted_jobs(store: RunStore) -> list[str]:
    return [str(r["slurm_job_id"]) for r in store.read_metrics().records if r.get("event") == "submitted"]


def wait_until(cond, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def job_ended(job_id: str) -> bool:
    state = sacct(job_id).get(f"{job_id}+0", "")
    return state.split(" ")[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


def weights(store: RunStore, step: int) -> dict:
    return load_file(store.step_dir("weights", step) / "model.safetensors")


def only_stable_steps(store: RunStore) -> None:
    for kind in ("rollouts", "weights", "checkpoints"):
        for d in store.kind_dir(kind).glob("step_*"):
            if ".tmp-" not in d.name:  # a killed writer's temp dir: ignored by readers, removed on resume
                assert (d / STABLE).is_file(), f"{d} has no {STABLE} marker"


def step_cpus(job_id: str) -> dict[str, int]:
    """CPUs Slurm gave each job step of a stage, by the module the step ran."""
    out = subprocess.run(["sacct", "-P", "-n", "-j", job_id, "-o", "AllocCPUS,SubmitLine%500"], capture_output=True,
                         text=True, env=slurm_env()).stdout
    return {line.split(" -m ")[1].split()[0]: int(line.split("|")[0])
            for line in out.splitlines() if "|srun " in line}


def config_sources(*items: str) -> dict[str, tuple[object, str]]:
    """``python -m deepscaler.config ITEMS --sources``: key -> (value, the file or override that set it)."""
    out = subprocess.run([sys.executable, "-m", "deepscaler.config", *items, "--sources"], capture_output=True,
                         text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = (line.split(": ", 1) for line in out.stdout.splitlines())
    return {key: (json.loads(value), source) for key, rest in rows for value, source in [rest.rsplit("  # ", 1)]}


def test_a_stage_is_one_hetjob_with_two_components(slurm_cluster, tmp_path: Path) -> None:
    """Submitted as a user would on a cluster: a site file (partition, account, output folder)
    with a preset stacked after it (issue 26): the job lands with all three, and ``config
    --sources`` says which file set each value."""
    assert TEST_ACCOUNT in slurm_cluster.accounts, f"no account {TEST_ACCOUNT} for this user: {HINT}"
    site = tmp_path / "site.yaml"
    site.write_text(f"slurm:\n  partition: debug\n  account: {TEST_ACCOUNT}\nrun:\n  output_dir: {tmp_path}\n")
    where = config_sources("stage1", str(site), "tiny-random")
    assert where["slurm.partition"] == ("debug", str(site)) and where["slurm.account"] == (TEST_ACCOUNT, str(site))
    assert where["run.output_dir"] == (str(tmp_path), str(site))
    assert where["model.name"] == ("tiny", str(yaml_dir() / "tiny-random.yaml"))
    # The reward pool sizes itself (workers 0) from the CPUs its step may use. A user whose umask
    # is 0077 keeps it: run.umask ("0027") never loosens it, on the login node nor in the job.
    done = submit(None, "--stage", "1", "--executor", "slurm", "--max-steps", "2", "--wait",
                  "orchestrator.reward.workers=0", umask=0o077, presets=(str(site), "tiny-random"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    store = RunStore(tmp_path, "tiny", 1)
    (job,) = submitted_jobs(store)
    states = sacct(job)
    assert states[f"{job}+0"] == "COMPLETED" and states[f"{job}+1"] == "COMPLETED", states
    # Slurm's own record of both components: the site's partition and account (an account
    # Slurm did not know would read root here); run.yaml holds the site's folder.
    charged = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job, "-o", "Partition,Account"], capture_output=True,
                             text=True, env=slurm_env()).stdout.split()
    assert charged == [f"debug|{TEST_ACCOUNT}"] * 2, charged
    assert yaml.safe_load(store.run_yaml.read_text())["run"]["output_dir"] == str(tmp_path)
    # Each job step holds the CPUs its component asked for (tiny: 1 per task), and each process
    # sizes itself by them, not by the node (this local cluster binds no CPUs: task/none).
    assert step_cpus(job) == {"deepscaler.inference": 1, "deepscaler.trainer": 1, "deepscaler.orchestrator": 1}
    logs = {name: (store.logs_dir / f"{name}.log").read_text() for name in ("servers", "trainer", "orchestrator")}
    assert "; 1 usable CPU(s), GPUs none)" in logs["servers"] and ", 1 usable CPU(s), GPUs none" in logs["trainer"]
    assert "reward pool of 1 worker(s); 1 usable CPU(s)" in logs["orchestrator"]
    # A healthy stage looks healthy: the server stopped by itself once the trainer had finished
    # (its step ran to COMPLETED, not CANCELLED), and took its address with it.
    assert "stopping (the trainer has finished)" in logs["servers"], logs["servers"][-2000:]
    assert "CANCELLED" not in logs["servers"] and "Killed" not in logs["servers"], logs["servers"][-2000:]
    assert store.read_server_addresses() == {}
    assert store.is_stable("weights", 2)
    assert "step 1  reward" in done.stdout  # --wait streamed the progress lines
    squeue_name = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job, "-o", "JobName"], capture_output=True,
                                 text=True, env=slurm_env()).stdout.split()
    assert "s1-tiny-deepscaler" in squeue_name  # squeue's 8-character NAME column: s1-tiny-
    status = subprocess.run([sys.executable, "-m", "deepscaler.status", "--output-dir", str(tmp_path)],
                            capture_output=True, text=True, cwd=REPO, env={**slurm_env(), "COLUMNS": "200"})
    assert status.returncode == 0, status.stderr
    assert job in status.stdout and "COMPLETED" in status.stdout and "2/2" in status.stdout
    assert list((store.logs_dir / "slurm").glob("*_submitted.pkl"))  # submitit's folder was checked, and used
    bad = modes_beyond(tmp_path / "tiny", allowed=0)
    assert not bad, bad[:20]


def step_gpus(log: str) -> set[str]:
    """The GPU indices a process logged at start (``GPUs 0,1``)."""
    import re

    found = re.findall(r"GPUs ([0-9,]+)", log)
    assert found, log[-2000:]
    return set(found[-1].split(","))


def test_a_colocated_stage_is_one_job_on_one_node_with_disjoint_gpus(slurm_cluster, tmp_path: Path) -> None:
    """One GPU for the server and one for the trainer, as stage 1's 4 + 4 on an 8-GPU node: one
    ordinary job, not a hetjob (whose components Slurm never puts on one node)."""
    done = submit(tmp_path, "--stage", "1", "--executor", "slurm", "--max-steps", "2", "--wait", "slurm.colocate=true",
                  "slurm.inference.gpus_per_node=1", "slurm.trainer.gpus_per_node=1", umask=0o022)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    store = RunStore(tmp_path, "tiny", 1)
    (job,) = submitted_jobs(store)
    states = sacct(job)
    assert states[job] == "COMPLETED" and f"{job}+0" not in states, states
    nodes = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job, "-o", "NodeList"], capture_output=True, text=True,
                           env=slurm_env()).stdout.split()
    assert len(nodes) == 1 and nodes[0] in slurm_cluster.nodes, nodes  # one node, whichever
    servers, trainer = (step_gpus((store.logs_dir / f"{name}.log").read_text()) for name in ("servers", "trainer"))
    assert len(servers) == len(trainer) == 1 and not servers & trainer, (servers, trainer)
    assert store.is_stable("weights", 2)
    # A umask of 0022 with the default run.umask "0027": the group reads, nobody else, nobody writes.
    bad = modes_beyond(tmp_path / "tiny", allowed=0o050)
    assert not bad, bad[:20]
    assert (store.root / "run.yaml").stat().st_mode & 0o777 == 0o640


def trainer_rank_nodes(store: RunStore) -> dict[int, str]:
    """rank -> the node it logged it runs on (``trainer rank R of W: local rank L on node N``)."""
    import re

    found = re.findall(r"trainer rank (\d+) of \d+: local rank \d+ on node (\S+),",
                       (store.logs_dir / "trainer.log").read_text())
    return {int(rank): node for rank, node in found}


def hostnames(nodelist: str) -> list[str]:
    """``node[1-2]`` -> ``["node1", "node2"]``, by Slurm itself."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True,
                         env=slurm_env())
    return out.stdout.split()


def job_nodes(job_id: str) -> list[str]:
    """The nodes sacct records for a job (every component of a hetjob)."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "NodeList"], capture_output=True, text=True,
                         env=slurm_env()).stdout.split()
    return sorted({node for nodelist in out for node in hostnames(nodelist)})


def test_chained_stages_wait_for_each_other_and_stage_2_starts_from_stage_1(slurm_cluster, tmp_path: Path) -> None:
    """Stage 1 trains with 1 rank, stage 2 with 2 ranks on 2 nodes (``stage2.`` overrides only
    stage 2): the hand-over loads stage 1's weights only (``checkpoint.load_optimizer: false`` in
    yaml/stage2.yaml), which any world size can read."""
    out = submit(tmp_path, "--stages", "1,2", "--executor", "slurm", "--max-steps", "2", "stage2.slurm.trainer.nodes=2")
    assert out.returncode == 0, out.stderr
    first, second = RunStore(tmp_path, "tiny", 1), RunStore(tmp_path, "tiny", 2)
    (job1,), (job2,) = submitted_jobs(first), submitted_jobs(second)
    reason = subprocess.run(["squeue", "-h", "-j", job2, "-o", "%r"], capture_output=True, text=True,
                            env=slurm_env()).stdout
    assert "Dependency" in reason, reason
    wait_until(lambda: job_ended(job2), 480, f"job {job2}", poll=3)
    assert sacct(job1)[f"{job1}+1"] == "COMPLETED" and sacct(job2)[f"{job2}+1"] == "COMPLETED"
    start = next(r for r in second.read_metrics().records if r.get("source") == "trainer" and r.get("event") == "start")
    assert start["init_from"] == str(first.step_path("checkpoints", 2))
    assert start["step"] == 2  # steps continue across stages (checkpoint.reset_step: false)
    assert second.is_stable("weights", 4)
    # The world size changed at the hand-over: 1 rank wrote stage 1's checkpoint, 2 ranks on
    # two nodes (placement from sacct) read it and wrote stage 2's.
    assert len(trainer_rank_nodes(first)) == 1 and start["world_size"] == 2
    ranks = trainer_rank_nodes(second)
    assert sorted(ranks) == [0, 1] and ranks[0] != ranks[1] and set(ranks.values()) <= set(job_nodes(job2)), ranks
    assert sorted(p.name for p in second.step_dir("checkpoints", 4).glob("rank_*.json")) == ["rank_0.json",
                                                                                             "rank_1.json"]


def task_of(store: RunStore, module: str) -> int | None:
    """The pid of the stage's ``python -m <module>`` task (not the ``srun`` that started it)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if cmd[1:3] == [b"-m", module.encode()] and str(store.run_yaml).encode() in cmd:
                return int(pid)
    return None


@pytest.mark.timeout(600)
def test_time_limit_requeues_and_the_result_equals_an_uninterrupted_run(slurm_cluster, reference_stage: RunStore,
                                                                       tmp_path: Path) -> None:
    """A 2-minute limit with the signal 30 s before it. slurmctld checks limits every 30 s and
    signals at the first check that finds the time left within the delay + 30 s, so an attempt
    runs 60-90 s. The stage is the session's reference (4 deterministic steps, a checkpoint
    every 2), which would finish in about 50 s: once checkpoint 2 is stable the test freezes
    (SIGSTOP) its trainer and orchestrator, a stage too long for its limit whatever the
    machine's speed. The job is signalled, requeues itself (same job id, restart count 1), and
    the next attempt resumes from checkpoint 2 to the reference's weights, bit for bit; the
    submit's --wait follows it across the requeue. Both workers freeze: one alone would fail
    its peer's wait after handover.STALE_S (60 s). Slurm kills the frozen ones at the requeue
    (SIGKILL after KillWait). About 2 minutes."""
    store = RunStore(tmp_path, "tiny", 1)
    argv = submit_argv(tmp_path, "--stage", "1", "--max-steps", str(REFERENCE_STEPS), "run.deterministic=true",
                       "checkpoint.interval=2", "--executor", "slurm", "--wait", "slurm.time=2",
                       "slurm.signal_delay_s=30")
    frozen: list[int] = []
    with open(tmp_path / "submit.out", "w") as out, open(tmp_path / "submit.err", "w") as err:
        waiting = subprocess.Popen(argv, cwd=REPO, env=slurm_env(), stdout=out, stderr=err)
    try:
        wait_until(lambda: store.is_stable("checkpoints", 2) or waiting.poll() is not None, 400, "checkpoint step 2",
                   poll=0.2)
        frozen = [task_of(store, module) for module in ("deepscaler.trainer", "deepscaler.orchestrator")]
        assert None not in frozen and not store.is_stable("weights", REFERENCE_STEPS), (frozen, waiting.poll())
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        waiting.wait(timeout=400)
    finally:
        waiting.kill()
        for pid in frozen:  # only if Slurm did not: a frozen process keeps its stage's lock
            with contextlib.suppress(OSError):
                if str(store.run_yaml).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
    assert waiting.returncode == 0, (tmp_path / "submit.out").read_text()[-2000:] + (tmp_path / "submit.err").read_text()
    (job,) = submitted_jobs(store)
    records = store.read_metrics().records
    attempts = [r for r in records if r.get("event") == "attempt"]
    assert {str(a["slurm_job_id"]) for a in attempts} == {job}, attempts  # requeued, never resubmitted
    assert [a["restart_count"] for a in attempts] == list(range(len(attempts))) and len(attempts) >= 2, attempts
    starts = [r for r in records if r.get("source") == "trainer" and r.get("event") == "start"]
    assert 2 in [s["resumed_from"] for s in starts], starts  # the frozen attempt's checkpoint, not a fresh start
    history = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", job, "-o", "JobID,State,Elapsed"],
                             capture_output=True, text=True, env=slurm_env()).stdout
    print(f"time limit: attempts {history.split()}")
    assert f"{job}+0|REQUEUED|" in history, history  # it requeued itself at the signal, before its limit
    # submitit's "Requeued job" line is not always there: the requeue's own SIGTERM may end its
    # scontrol before it logs (the job's log then holds a CalledProcessError; the requeue stands).
    assert "Caught signal SIGUSR2" in (store.logs_dir / "slurm" / f"{job}_0_log.out").read_text()
    final, expected = weights(store, REFERENCE_STEPS), weights(reference_stage, REFERENCE_STEPS)
    assert final.keys() == expected.keys()
    for k in expected:
        assert (final[k] == expected[k]).all(), f"{k} differs after the requeue"
    only_stable_steps(store)


def test_scancel_leaves_stable_steps_and_resume_continues(slurm_cluster, tmp_path: Path) -> None:
    """The cancelled job's log ends with one line, no traceback, whose command resumes the
    stage; that resume's --wait ends as a local run does."""
    out = submit(tmp_path, "--stage", "1", "--executor", "slurm", "--max-steps", "6", "checkpoint.interval=2")
    assert out.returncode == 0, out.stderr
    store = RunStore(tmp_path, "tiny", 1)
    (job,) = submitted_jobs(store)
    wait_until(lambda: store.is_stable("checkpoints", 2), 300, "checkpoint step 2")
    subprocess.run(["scancel", job], check=True, env=slurm_env())
    wait_until(lambda: job_ended(job), 120, f"job {job} to end")
    err = store.logs_dir / "slurm" / f"{job}_0_log.err"
    # sacct says CANCELLED at once; the supervisor is still stopping its processes then.
    wait_until(lambda: stage_error(err), 30, "the job's last words")
    only_stable_steps(store)
    assert store.latest_stable("weights") < 6
    log = err.read_text()
    # Ours is the last line but for Slurm's own (slurmstepd's "*** JOB ... CANCELLED ***" may come
    # after it: the supervisor says it at the SIGTERM, before Slurm's SIGKILL can cut it off).
    last = [x for x in log.splitlines() if not x.startswith("slurmstepd")][-1]
    assert "Traceback" not in log, log
    assert last.startswith("stopped: stage 1 of run 'tiny' cancelled (scancel) during step "), log
    assert f"(from checkpoint step {store.latest_stable('checkpoints')}): python -m deepscaler.submit " in last, last

    bad = submit(tmp_path, "--stage", "1", "--executor", "slurm", "--max-steps", "6", "--resume-step", "5")
    assert bad.returncode == 2 and "--resume-step 5: no stable checkpoint" in bad.stderr and "(stable: " in bad.stderr

    command = shlex.split(last.split(": ", 2)[2])  # the line's command, as a user pastes it
    assert command[:3] == ["python", "-m", "deepscaler.submit"], last
    resumed = subprocess.run([sys.executable, *command[1:], "--wait"], capture_output=True, text=True, cwd=REPO,
                             timeout=600, env=slurm_env())
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert store.is_stable("weights", 6)
    only_stable_steps(store)
    assert "UNKNOWN" not in resumed.stdout, resumed.stdout  # a job sacct does not know yet is PENDING
    assert "stage 1 of run 'tiny' finished: 6 steps" in resumed.stdout and "\nnext:\n" in resumed.stdout, resumed.stdout


def test_without_hetjobs_two_ordinary_jobs_run_the_stage(slurm_cluster, tmp_path: Path) -> None:
    """The trainer on two nodes (one rank each): its ranks meet at the main job's first node."""
    done = submit(tmp_path, "--stage", "1", "--executor", "slurm", "--no-hetjob", "--max-steps", "2", "--wait",
                  "slurm.trainer.nodes=2")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    store = RunStore(tmp_path, "tiny", 1)
    servers, main = submitted_jobs(store)
    assert sacct(main)[main] == "COMPLETED" and f"{main}+0" not in sacct(main)
    ranks = trainer_rank_nodes(store)
    assert sorted(ranks) == [0, 1] and sorted(ranks.values()) == job_nodes(main) and ranks[0] != ranks[1], ranks
    assert sorted(p.name for p in store.step_dir("checkpoints", 2).glob("rank_*.json")) == ["rank_0.json",
                                                                                           "rank_1.json"]
    assert sacct(servers)[servers].startswith("CANCELLED")  # stopped by the main job once the stage is done
    assert store.is_stable("weights", 2)
    # The servers' job got the stage's token from the owner-only file written at submit (as did
    # the main job, whose orchestrator sampled from them); no script, pickle or log holds it.
    token = read_token(store.root)
    assert token_path(store.root).stat().st_mode & 0o777 == 0o600
    assert "(auth on)" in (store.logs_dir / "slurm" / f"{servers}_0_log.err").read_text()
    holders = [p for p in tmp_path.rglob("*") if p.is_file() and p != token_path(store.root)
               and token.encode() in p.read_bytes()]
    assert not holders, holders


def test_unknown_partition_shows_sbatchs_own_error(slurm_cluster, tmp_path: Path) -> None:
    out = submit(tmp_path, "--stage", "1", "--executor", "slurm", "slurm.partition=nosuchpart")
    assert out.returncode == 1
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: sbatch refused stage 1 of run 'tiny'") and "invalid partition" in line.lower()
