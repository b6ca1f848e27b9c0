"""Several servers, and one of them SIGKILLed mid-stage (issue 20). The orchestrator deals each
step's prompts out to every server and records how many each one took. A dead server fails the
stage at once with one line naming it (which server, where, how it died) and the resume
(docs/design.md, "A server dies"), whichever process sees the death first: the server's own
exit, srun's report of the servers step (one step runs every server; ``--kill-on-bad-exit``
ends it when one dies), or the orchestrator's refused request. Published steps stay stable."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deepscaler import handover
from deepscaler.config import stage_config
from deepscaler.inference.client import SERVER_DIED_EXIT, InferenceClient, ServerDied, first_dead_task
from deepscaler.launch import Child, failure
from deepscaler.store import RunStore
from tests.integration.test_loop import REPO, processes_using, submit_argv, wait_until
from tests.slurm_cluster import slurm_env

PROMPTS = 8  # orchestrator.prompts_per_step of the tiny-random preset


def died_line(node: str) -> re.Pattern:
    """The one line of a stage whose server1 was SIGKILLed (``error: `` as submit prints it)."""
    return re.compile(rf"error: server server1 on {node} \((?P<address>[\d.]+:\d+)\) died: killed by signal 9 "
                      r"\(SIGKILL\) during step (?P<step>\d+); stage 1 of run 'tiny' stopped\. Resume with "
                      r"--resume-step latest \(from checkpoint step (?P<checkpoint>\d+)\); "
                      r"see docs/troubleshooting\.md#a-server-died")


def server_pid(store: RunStore, name: str) -> int:
    """The live process of server ``name``: the pid its heartbeat names, checked against its
    command line (this stage's run.yaml, the inference module) and its announced port."""
    beat = handover.read(store, name)
    assert beat is not None, f"no heartbeat of {name}"
    cmd = Path(f"/proc/{beat.pid}/cmdline").read_bytes().split(b"\0")
    assert str(store.run_yaml).encode() in cmd and b"deepscaler.inference" in cmd, cmd
    port = int(store.read_server_addresses()[name].rsplit(":", 1)[1])
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    inodes = {row[9] for row in rows if row[1].endswith(f":{port:04X}") and row[3] == "0A"}  # LISTEN
    sockets = {os.readlink(f"/proc/{beat.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{beat.pid}/fd")}
    assert any(f"socket:[{inode}]" in sockets for inode in inodes), f"{name} (pid {beat.pid}) does not listen on {port}"
    return beat.pid


def per_server_counts(store: RunStore) -> list[dict[str, int]]:
    return [r["server_prompts"] for r in store.read_metrics().records
            if r.get("source") == "orchestrator" and "server_prompts" in r]


def verify_stable_steps(store: RunStore) -> None:
    """Every published step of the killed stage still matches its manifest (raises if not)."""
    for kind in ("rollouts", "weights", "checkpoints"):
        for step in store.stable_steps(kind):
            store.verify_step(kind, step, checksums=True)


def test_first_dead_task_reads_srun_s_report() -> None:
    """srun's own lines (as on the local cluster, Slurm 22.05): the first names the task that
    died first; the kill-on-bad-exit cancellation after it is not a death of its own."""
    log = ("=== 2026-12-07 15:00:00 srun ... --name server{rank}\nsrun: error: node1: task 0: Killed\n"
           "=== 2026-12-07 15:01:00 srun ... --name server{rank}\nINFO serving\n"
           "srun: error: node2: task 1: Killed\nsrun: launch/slurm: _step_signal: Terminating StepId=7.0\n"
           "slurmstepd-node1: error: *** STEP 7.0 ON node1 CANCELLED AT 2026-12-07T15:02:00 ***\n"
           "srun: error: node1: task 0: Terminated\n")
    assert first_dead_task(log[log.rfind("\n=== ") + 1:]) == ("node2", 1, "killed by signal 9 (SIGKILL)")
    assert first_dead_task("srun: error: node3: tasks 2-3: Exited with exit code 1\n") == \
        ("node3", 2, "exited with code 1")
    assert first_dead_task("srun: error: node1: task 0: Segmentation fault (core dumped)\n")[2] == \
        "killed by signal 11 (SIGSEGV) (core dumped)"
    assert first_dead_task("INFO srun: error: in a message, not srun's own line\nsrun: Job step aborted\n") is None


def child(store: RunStore, name: str, script: str) -> Child:
    """A real process under the name of one of the stage's, logging where that one would."""
    log = store.logs_dir / f"{name}.log"
    with open(log, "a") as f:
        f.write(f"=== 2026-12-07 15:00:00 {name}\n")
    with open(log, "a") as f:
        return Child(name, subprocess.Popen(["bash", "-c", script], stdout=f, stderr=subprocess.STDOUT,
                                            start_new_session=True), log)  # a group of its own, as the launcher's


@pytest.fixture
def stage(tmp_path: Path):
    cfg = stage_config(1, "tiny-random", [f"run.output_dir={tmp_path}"])
    store = RunStore(tmp_path, "tiny", 1)
    store.ensure_dirs()
    store.write_server_address("server1", "192.0.2.2", 41191)
    started = []
    yield cfg, store, started
    for c in started:
        if c.proc.poll() is None:
            c.proc.kill()
        c.proc.wait()


def test_the_supervisor_names_a_local_server_killed_by_a_signal(stage) -> None:
    cfg, store, started = stage
    started += [child(store, "server0", "sleep 60"), child(store, "server1", "sleep 60"),
                child(store, "orchestrator", "sleep 60")]
    started[1].proc.send_signal(signal.SIGKILL)
    started[1].proc.wait()
    line, *tail = failure(cfg, store, started, started[1]).splitlines()
    assert line == ("server server1 (192.0.2.2:41191) died: killed by signal 9 (SIGKILL); stage 1 of run 'tiny' "
                    "stopped. Resume with --resume-step latest (from the start: no checkpoint yet); "
                    "see docs/troubleshooting.md#a-server-died")
    assert "server1.log ---" in tail[0]
    assert all(c.proc.poll() is not None for c in started)  # stopped before the checkpoint was read


def test_when_the_orchestrator_sees_it_first_the_supervisor_waits_for_srun_to_name_the_server(stage) -> None:
    """Under Slurm: the orchestrator's request is refused (exit SERVER_DIED_EXIT) a moment
    before srun reports the task in the servers step's log; the line still names server1,
    its node and its signal, not the orchestrator, nor the step's 137."""
    cfg, store, started = stage
    srun = ("sleep 1; echo 'srun: error: node2: task 1: Killed'; echo 'slurmstepd-node1: error: *** STEP 7.0 "
            "CANCELLED ***'; echo 'srun: error: node1: task 0: Terminated'; exit 137")
    started += [child(store, "servers", srun), child(store, "trainer", "sleep 60"),
                child(store, "orchestrator", f"exit {SERVER_DIED_EXIT}")]
    started[2].proc.wait()
    line = failure(cfg, store, started, started[2]).splitlines()[0]
    assert line.startswith("server server1 on node2 (192.0.2.2:41191) died: killed by signal 9 (SIGKILL); "), line
    # Any other failure of the orchestrator is its own, at once: no wait for a server.
    started.append(child(store, "orchestrator", "exit 2"))
    started[-1].proc.wait()
    t0 = time.monotonic()
    line = failure(cfg, store, [c for c in started if c.name != "servers"], started[-1]).splitlines()[0]
    assert line == "orchestrator exited with code 2 (stage 1 of run 'tiny')" and time.monotonic() - t0 < 5


def test_a_refused_or_reset_connection_is_a_dead_server() -> None:
    """Real sockets: a port nobody listens on, and a listener that accepts, reads the request
    and closes without an answer (what a server killed mid-request leaves)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    refused = r"^server s \(127\.0\.0\.1:\d+\): GET /health failed: .*Connection refused \(no server process there"
    with pytest.raises(ServerDied, match=refused):
        InferenceClient("s", f"127.0.0.1:{closed_port}", token="").health()
    listener = socket.create_server(("127.0.0.1", 0))

    def hang_up() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    try:
        hung_up = r"POST /generate failed: Remote end closed connection without response \(no server"
        with pytest.raises(ServerDied, match=hung_up):
            InferenceClient("s", f"127.0.0.1:{listener.getsockname()[1]}", token="", liveness_timeout_s=5).generate(
                [[1, 2]], n=1, max_tokens=4, temperature=1.0, top_p=1.0)
    finally:
        listener.close()


@pytest.mark.slow
def test_two_local_servers_share_the_prompts_and_a_killed_one_stops_the_stage_in_one_line(tmp_path: Path) -> None:
    """Two servers (one per inference GPU: slurm.inference.gpus_per_node=2) on the local
    executor. Each step's prompts are dealt out to both, and the counts are recorded. server1
    SIGKILLed after the first checkpoint: the stage stops within the stop grace, with the one
    line; its resume (as the line says) finishes the stage."""
    store = RunStore(tmp_path, "tiny", 1)
    args = ("slurm.inference.gpus_per_node=2", "inference.liveness_timeout_s=5", "data.max_problems=64",
            "checkpoint.interval=1")
    launcher = subprocess.Popen(submit_argv(tmp_path, *args, steps=6), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=REPO)
    try:
        wait_until(lambda: store.is_stable("checkpoints", 1) and store.is_stable("rollouts", 1), 300,
                   "checkpoint step 1")
        pid = server_pid(store, "server1")
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    waited = time.monotonic() - killed_at
    counts = per_server_counts(store)
    assert len(counts) >= 2, counts
    for c in counts:  # both servers sampled every step, and together all of its prompts
        assert set(c) == {"server0", "server1"} and min(c.values()) > 0 and sum(c.values()) == PROMPTS, counts
    said = (store.logs_dir / "orchestrator.log").read_text()
    assert re.search(r"step 1: reward .*; prompts per server: server0 4, server1 4$", said, re.M), said[-2000:]

    assert launcher.returncode == 1, err[-3000:]
    assert waited < 45, f"the stage took {waited:.0f}s to stop after a server died"  # 15 s stop grace, x3
    errors = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1, err[-3000:]
    m = died_line(r"\S+").fullmatch(errors[0])
    assert m, errors[0]
    assert m["address"].startswith("127.0.0.1:") and int(m["checkpoint"]) == store.latest_stable("checkpoints")
    assert "Traceback" not in err and "exited with code" not in err
    wait_until(lambda: not processes_using(store.run_yaml), 60, "every process of the stage to exit")
    verify_stable_steps(store)

    # As the line says (one step past the checkpoint is enough to show it works).
    resumed = subprocess.run(submit_argv(tmp_path, *args, "--resume-step", "latest", steps=int(m["checkpoint"]) + 1),
                             capture_output=True, text=True, cwd=REPO, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert store.is_stable("weights", int(m["checkpoint"]) + 1)
    attempts = [r for r in store.read_metrics().records if r.get("event") == "attempt"]
    assert attempts[-1]["resume"] == m["checkpoint"], attempts


# --------------------------------------------------------------------------- on the local Slurm cluster


def sacct_rows(job: str, fields: str) -> list[list[str]]:
    out = subprocess.run(["sacct", "-P", "-n", "-j", job, "-o", fields], capture_output=True, text=True,
                         env=slurm_env()).stdout
    return [line.split("|") for line in out.splitlines() if line]


def submitted_job(store: RunStore) -> str:
    (job,) = [str(r["slurm_job_id"]) for r in store.read_metrics().records if r.get("event") == "submitted"]
    return job


@pytest.mark.slurm
@pytest.mark.slow
def test_a_server_killed_in_a_slurm_stage_is_named_by_submit_wait(slurm_cluster, tmp_path: Path) -> None:
    """Two servers on two nodes (hetjob component 0, one srun step, fake GPUs). server1's
    process SIGKILLed mid-stage: srun ends the whole servers step (137) and the orchestrator's
    request is refused, but ``submit --wait`` prints the one line naming server1, its node and
    signal 9, and the checkpoint a resume starts from."""
    store = RunStore(tmp_path, "tiny", 1)
    argv = [sys.executable, "-m", "deepscaler.submit", "--preset", "tiny-random", "--output-dir", str(tmp_path),
            "--stage", "1", "--executor", "slurm", "--max-steps", "8", "--wait", "slurm.inference.nodes=2",
            "slurm.inference.gpus_per_node=1", "inference.liveness_timeout_s=5", "data.max_problems=64",
            "checkpoint.interval=1"]
    submit = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env=slurm_env())
    job = None
    try:
        wait_until(lambda: store.is_stable("checkpoints", 1) and store.is_stable("rollouts", 1), 420,
                   "checkpoint step 1")
        job = submitted_job(store)
        pid = server_pid(store, "server1")  # every node of the local cluster runs on this host
        environ = dict(x.split(b"=", 1) for x in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in x)
        assert environ[b"SLURM_PROCID"] == b"1"
        server1_node = environ[b"SLURMD_NODENAME"].decode()  # where srun placed it
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        out, err = submit.communicate(timeout=180)
    finally:
        submit.kill()
        if job is not None and submit.returncode is None:
            subprocess.run(["scancel", job], env=slurm_env(), check=False)
    waited = time.monotonic() - killed_at
    # The servers' component spans two nodes, one server on each, and both sampled every step.
    nodes = {row[0]: row[1] for row in sacct_rows(job, "JobID,NodeList")}
    assert re.fullmatch(r"node\[\d[-,]\d\]", nodes[f"{job}+0"]), nodes
    assert len(per_server_counts(store)) >= 2
    for c in per_server_counts(store):
        assert min(c.values()) > 0 and sum(c.values()) == PROMPTS and len(c) == 2, c

    assert submit.returncode == 1, out[-2000:] + err[-3000:]
    assert waited < 90, f"the job took {waited:.0f}s to end after a server died"  # stop grace 15 s + sacct polls
    errors = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(errors) == 2 and errors[1].startswith(f"error: job {job} (s1-tiny-deepscaler) ended FAILED"), err
    m = died_line(server1_node).fullmatch(errors[0])
    assert m, errors[0]
    assert int(m["checkpoint"]) == store.latest_stable("checkpoints")
    assert "Traceback" not in err and "exited with code 137" not in err
    job_log = (store.logs_dir / "slurm" / f"{job}_0_log.err").read_text()
    assert job_log.rstrip().splitlines()[-1] == errors[0] and "Traceback" not in job_log
    verify_stable_steps(store)
