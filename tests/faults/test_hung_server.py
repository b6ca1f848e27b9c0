"""An inference server that stops answering without exiting (SIGSTOP): the orchestrator's
liveness check gives its request up after ``inference.liveness_timeout_s`` (not the hour of
``orchestrator.request_timeout_s``), the stage fails with one line naming the server, and
nothing waits forever; while a live server's long generation still runs to its end."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from deepscaler import handover
from deepscaler.orchestrator import StaleWeightsError, check_fresh
from deepscaler.store import RunStore
from tests.integration.test_loop import REPO, processes_using, submit_argv, wait_until

pytestmark = pytest.mark.slow


def pid_of(store: RunStore, name: str) -> int:
    for pid in os.listdir("/proc"):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(store.run_yaml).encode() in cmd and name.encode() in cmd and b"deepscaler.inference" in cmd:
            return int(pid)
    raise AssertionError(f"no process of {name}")


def kill_if_ours(store: RunStore, pid: int) -> None:
    try:
        if str(store.run_yaml).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def test_a_frozen_server_fails_the_stage_with_one_line_naming_it(tmp_path: Path) -> None:
    """Alive is not done: every generation takes 5 s longer (server.slow_generate) than the
    3 s liveness bound, and the stage runs, since /health answers meanwhile. Frozen (SIGSTOP),
    the server stops answering, and with request_timeout_s at its hour, only the liveness bound
    can end the orchestrator's wait: the stage fails with one line naming the server."""
    store = RunStore(tmp_path, "tiny", 1)
    env = {**os.environ, "DEEPSCALER_FAULT": "server.slow_generate@5"}
    launcher = subprocess.Popen(submit_argv(tmp_path, "inference.liveness_timeout_s=3", "data.max_problems=64", steps=8),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    server = None
    try:
        wait_until(lambda: store.is_stable("rollouts", 0), 300, "the first rollouts")
        server = pid_of(store, "server0")
        beat = handover.read(store, "server0")  # its heartbeat, for a wait on its start-up (tests/unit)
        assert beat is not None and beat.pid == server and beat.attempt == handover.read(store, "orchestrator").attempt
        os.kill(server, signal.SIGSTOP)
        frozen_at = time.monotonic()
        out, err = launcher.communicate(timeout=180)
    finally:
        launcher.kill()
        if server is not None:
            kill_if_ours(store, server)  # if the test failed: a stopped process outlives SIGTERM
    waited = time.monotonic() - frozen_at
    sampled = [r["time_sample_s"] for r in store.read_metrics().records if "time_sample_s" in r]
    assert sampled and min(sampled) >= 5  # longer than the liveness bound, and it succeeded
    assert launcher.returncode == 1
    assert waited < 60, f"the stage took {waited:.0f}s to notice a frozen server"  # 3 s + the 15 s stop grace
    assert "orchestrator exited with code 2" in err
    line = (store.logs_dir / "orchestrator.log").read_text().splitlines()[-1]
    assert re.fullmatch(r"error: server server0 \(127\.0\.0\.1:\d+\): (GET|POST) /\w+ abandoned after \d+ s: "
                        r"no answer to GET /health for 3 s \(the server is stopped, hung, or its node lost; "
                        r"inference\.liveness_timeout_s\)", line), line
    assert line in err  # the launcher shows it, after the server's log tail
    assert "server0.log ---" in err
    wait_until(lambda: not processes_using(store.run_yaml), 60, "every process of the stage to exit")


def test_stale_weights_are_refused() -> None:
    fresh = [("server0", 5, []), ("server1", 4, [])]
    check_fresh(fresh, step=5, required=4)  # async_level 1: step 4's weights are fine
    with pytest.raises(StaleWeightsError) as err:
        check_fresh(fresh, step=5, required=5)
    assert "server server1 sampled step 5 with weights step 4" in str(err.value) and err.value.server == "server1"


def test_a_frozen_orchestrator_fails_the_stage_from_the_trainers_wait(tmp_path: Path) -> None:
    """SIGSTOP: the process lives on, so the supervisor sees nothing (as with a lost node whose
    srun step lingers). The trainer's wait for rollouts sees the orchestrator's hand-over file
    stop beating and fails with one line naming both sides, well within 2 minutes."""
    store = RunStore(tmp_path, "tiny", 1)
    launcher = subprocess.Popen(submit_argv(tmp_path, steps=8), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=REPO)
    try:
        wait_until(lambda: store.is_stable("weights", 2), 300, "the trainer's second step")
        orchestrator = handover.read(store, "orchestrator")
        os.kill(orchestrator.pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        out, err = launcher.communicate(timeout=180)
    finally:
        launcher.kill()
    waited = time.monotonic() - frozen_at
    assert launcher.returncode == 1 and waited < 120, f"the stage took {waited:.0f}s to notice"
    assert "trainer exited with code 2" in err
    line = next(x for x in (store.logs_dir / "trainer.log").read_text().splitlines() if x.startswith("error: "))
    assert f"orchestrator (pid {orchestrator.pid} on " in line and "has not reported for" in line
    assert "for rollouts/step_" in line and "running at step " in line
    said = (store.logs_dir / "trainer.log").read_text()
    assert re.search(r"waiting 3[01]s for rollouts/step_\d+; orchestrator at step \d+, reported", said)  # meanwhile
    wait_until(lambda: not processes_using(store.run_yaml), 60, "every process of the stage to exit")
