"""W&B as the recipe uses it, offline (no network here; W&B's own offline mode, read back from
its ``.wandb`` files): one run per stage fed from metrics.jsonl, continued after its forwarder
is killed mid-stage, with no step logged twice or left out."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from deepscaler.store import RunStore, read_json
from deepscaler.tracking import KEYS
from deepscaler.wandb_offline import history
from tests.integration.test_loop import REPO, submit_argv, wait_until

pytestmark = pytest.mark.slow
STEPS = 6


def forwarder_pid(store: RunStore) -> int | None:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"deepscaler.tracking" in cmd and str(store.run_yaml).encode() in cmd:
            return int(pid)
    return None


def test_an_offline_wandb_run_gets_every_step_once_across_a_killed_forwarder(tmp_path: Path) -> None:
    store = RunStore(tmp_path, "tiny", 1)
    argv = submit_argv(tmp_path, "--wandb.project", "deepscaler", "--wandb.name", "stage1-debug", "--log.level",
                       "debug", "--wandb.mode=offline", steps=STEPS)
    launcher = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        wait_until(lambda: store.is_stable("weights", 2) and (store.wandb_dir / "state.json").is_file(), 300,
                   "weights step 2 and the forwarder's state")
        first = read_json(store.wandb_dir / "state.json")["run_id"]
        os.kill(forwarder_pid(store), signal.SIGKILL)
        out, err = launcher.communicate(timeout=400)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, out[-2000:] + err[-3000:]
    assert "warning: the W&B forwarder exited with code -9; restarting it (1/3)" in err
    state = read_json(store.wandb_dir / "state.json")
    assert state["run_id"] == first  # the restarted forwarder continued the same W&B run
    runs = sorted((store.wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) >= 2 and all(r.name.endswith(f"-{first}") for r in runs)

    rows = history(store.wandb_dir / "wandb", first)
    for key in ("orchestrator/reward_mean", "trainer/pg_loss", "trainer/kl"):
        steps = [r["step"] for r in rows if key in r]
        assert steps == list(range(STEPS)), (key, steps)  # every step once, in order
    logged = {k for r in rows for k in r if "/" in k}
    documented = {f"{source}/{key}" for source, keys in KEYS.items() for key in keys}
    assert logged <= documented, logged - documented  # docs/monitoring.md explains each

    assert f"wandb sync {store.wandb_dir / 'wandb'}/offline-run-*" in out  # the end message says how to upload
    status = subprocess.run([sys.executable, "-m", "deepscaler.status", "--output-dir", str(tmp_path)], capture_output=True,
                            text=True, cwd=REPO, timeout=60)
    assert "wandb sync" in status.stdout
    # log.level debug reached the trainer and the orchestrator.
    assert " DEBUG step 0: problems " in (store.logs_dir / "orchestrator.log").read_text()
    assert " DEBUG step 0: " in (store.logs_dir / "trainer.log").read_text()
