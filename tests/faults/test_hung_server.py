"""An inference server that stops answering without exiting (SIGSTOP): the orchestrator's
request times out, the stage fails with the server's log tail, and nothing waits forever."""

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


def test_a_hung_server_fails_the_stage_with_its_log_tail(tmp_path: Path) -> None:
    store = RunStore(tmp_path, "tiny", 1)
    launcher = subprocess.Popen(submit_argv(tmp_path, "orchestrator.request_timeout_s=6", steps=8),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        wait_until(lambda: store.is_stable("rollouts", 1), 300, "the first rollouts")
        os.kill(pid_of(store, "server0"), signal.SIGSTOP)
        hung_at = time.monotonic()
        out, err = launcher.communicate(timeout=180)
    finally:
        launcher.kill()
    assert launcher.returncode == 1
    waited = time.monotonic() - hung_at
    assert waited < 120, f"the stage took {waited:.0f}s to notice a hung server"
    assert "orchestrator exited with code 2" in err
    assert "server server0" in err and "timed out" in err
    assert "server0.log ---" in err  # the server's log tail came with the error
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
