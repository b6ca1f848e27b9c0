"""One run per stage directory (deepscaler/run_lock.py): who holds the lock, and when another
supervisor may take it over. A second process is a real one; another host and another Slurm
job are simulated by the holder file they would write."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepscaler import run_lock
from deepscaler.run_lock import Holder, RunLock, RunLocked, live_holder
from deepscaler.store import RunStore

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return RunStore(tmp_path, "run", 1)


def plant(store: RunStore, **holder) -> None:
    """A lock as another supervisor left it."""
    d = run_lock.lock_dir(store)
    d.mkdir(parents=True)
    (d / run_lock.HOLDER).write_text(json.dumps({"since": time.time(), **holder}))


def test_a_held_lock_names_its_holder_and_is_released(store):
    with RunLock(store):
        found = run_lock.holder(store)
        assert found is not None and found[0].pid == os.getpid()
        elsewhere = Holder("another-host", 1, None, time.time())  # a supervisor on another node
        held_by = live_holder(store, elsewhere)
        assert held_by is not None and held_by.pid == os.getpid()
        message = str(run_lock.refusal(store, held_by))
        assert "\n" not in message and f"pid {os.getpid()} on {Holder.me().host}" in message
    assert not run_lock.lock_dir(store).exists()


@contextlib.contextmanager
def held_elsewhere(store, attempt: str | None = None):
    """Another process holding the stage's lock (as a supervisor does) until the block ends;
    yields that process."""
    code = ("import sys, time\nfrom deepscaler.run_lock import RunLock\nfrom deepscaler.store import RunStore\n"
            f"with RunLock(RunStore({str(store.output_dir)!r}, 'run', 1), {attempt!r}):\n"
            "    print('held', flush=True)\n    time.sleep(30)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_a_second_process_is_refused_while_the_first_holds_the_lock(store):
    with held_elsewhere(store) as holder:
        with pytest.raises(RunLocked) as err:
            RunLock(store).acquire()
        assert f"pid {holder.pid}" in str(err.value) and "is in use by another run of this stage" in str(err.value)
    with RunLock(store):  # its pid is gone: taken over at once
        assert run_lock.holder(store)[0].pid == os.getpid()


@pytest.mark.parametrize("case", ["same job", "dead pid", "stale"])
def test_a_lock_is_taken_over_when_its_holder_is_gone(store, monkeypatch, case):
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setattr(run_lock, "_job_running", lambda job_id: True)  # simulated boundary: squeue
    if case == "same job":  # a requeued attempt of the job that took it, on another node
        plant(store, host="node7", pid=1, job_id="41")
    elif case == "dead pid":
        done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        plant(store, host=Holder.me().host, pid=int(done.stdout), job_id=None)
    else:
        plant(store, host="node7", pid=1, job_id="40")
        old = time.time() - run_lock.STALE_S - 5
        os.utime(run_lock.lock_dir(store) / run_lock.HOLDER, (old, old))
    with RunLock(store):
        assert run_lock.holder(store)[0].pid == os.getpid()


def test_a_live_holder_on_another_node_keeps_the_lock(store, monkeypatch):
    monkeypatch.setattr(run_lock, "_job_running", lambda job_id: job_id == "40")  # simulated boundary: squeue
    plant(store, host="node7", pid=1, job_id="40")
    with pytest.raises(RunLocked) as err:
        RunLock(store).acquire()
    assert "pid 1 on node7, Slurm job 40" in str(err.value)
    monkeypatch.setattr(run_lock, "_job_running", lambda job_id: False)  # its job was cancelled
    with RunLock(store):
        pass


def test_a_lock_being_made_counts_as_held(store):
    run_lock.lock_dir(store).mkdir(parents=True)  # its holder file is not written yet
    with pytest.raises(RunLocked):
        RunLock(store).acquire()


def test_a_process_started_by_hand_beside_a_running_supervisor_is_refused(store, monkeypatch):
    """The supervisor's children carry its attempt id (as deepscaler.launch starts them); a
    trainer or orchestrator started by hand on the live stage does not, and is refused."""
    from deepscaler.handover import ATTEMPT_ENV
    from deepscaler.run_lock import refuse_outsider

    monkeypatch.delenv(ATTEMPT_ENV, raising=False)
    refuse_outsider(store)  # no supervisor: a process by hand may run
    with held_elsewhere(store, "attempt-7") as holder:
        monkeypatch.setenv(ATTEMPT_ENV, "attempt-7")
        refuse_outsider(store)  # the supervisor's own child
        for env in ("attempt-6", None):
            if env is None:
                monkeypatch.delenv(ATTEMPT_ENV)
            else:
                monkeypatch.setenv(ATTEMPT_ENV, env)
            with pytest.raises(RunLocked, match=rf"in use by another run of this stage \(pid {holder.pid} on "):
                refuse_outsider(store)


@pytest.mark.parametrize("state, running", [("RUNNING", True), ("SUSPENDED", True), ("COMPLETING", False),
                                            ("PENDING", False)])
def test_a_completing_job_no_longer_holds_the_lock(monkeypatch, state, running):
    """Right after scancel the job is COMPLETING while Slurm kills its processes: a resubmit
    then must not be refused (it was, in CI). Simulated boundary: squeue's answer."""
    monkeypatch.setattr(run_lock.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=f"{state}\n", stderr=""))
    assert run_lock._job_running("21") is running
