"""A run of a stage that is paused (Ctrl-Z) or whose ``LOCK/`` is removed by hand keeps its
files: a second run of the stage is refused while any process of the first can still write, and
a run that finds it no longer holds the lock stops before it writes again
(``deepscaler/run_lock.py``). Real local stages of the tiny-random preset; the lock's stale time
is the config key ``run.lock_stale_s``, in seconds here."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from deepscaler.run_lock import lock_dir
from deepscaler.store import RunStore
from tests.helpers.chaos import REPO, corrupt_stable_steps, process_of, submit_argv

pytestmark = pytest.mark.slow
STEPS = 2
STALE_S = 2.0
LOCK_KEYS = (f"run.lock_stale_s={STALE_S}", "run.lock_heartbeat_s=0.5", "checkpoint.keep_last=100")  # no retention


def start(out: Path) -> subprocess.Popen:
    return subprocess.Popen(submit_argv(out, STEPS, *LOCK_KEYS), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)


def wait_for_loop(store: RunStore, run: subprocess.Popen) -> None:
    """Until the stage's loop runs (its first rollouts are written)."""
    deadline = time.monotonic() + 300
    while not store.is_stable("rollouts", 0):
        assert run.poll() is None, run.communicate()
        assert time.monotonic() < deadline, "the stage did not start its loop in 300 s"
        time.sleep(0.2)


def stopped(store: RunStore, *names: str):
    """SIGSTOP the stage's processes ``names`` until the block ends: a slow step, so that they are
    surely alive while the test looks (the tiny steps may otherwise all end first)."""
    import contextlib

    @contextlib.contextmanager
    def block():
        pids = [process_of(store, name) for name in names]
        assert None not in pids, pids
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)

    return block()


def remove_by_hand(path: Path) -> None:
    """``rm -r`` of a directory that the heartbeat may be writing into."""
    for _ in range(20):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} is made again as fast as it is removed")


def second_run(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(submit_argv(out, STEPS, *LOCK_KEYS, "--resume-step", "latest"), capture_output=True,
                          text=True, cwd=REPO, timeout=300)


def published(store: RunStore) -> set[tuple[str, int]]:
    return {(kind, s) for kind in ("weights", "checkpoints") for s in store.stable_steps(kind)}


def trainer_steps(store: RunStore) -> list[int]:
    return [r["step"] for r in store.read_metrics().records if r.get("source") == "trainer" and "pg_loss" in r]


def test_a_paused_run_keeps_its_stage_and_finishes(tmp_path: Path) -> None:
    """Ctrl-Z on submit: its heartbeat stops but its children (own sessions) run on. Past the
    stale time a second run is refused in one line naming the stopped supervisor and its live
    processes; continued, the first run finishes every step with nothing of it lost."""
    store = RunStore(tmp_path, "tiny", 1)
    first = start(tmp_path)
    try:
        wait_for_loop(store, first)
        os.kill(first.pid, signal.SIGSTOP)  # Ctrl-Z (SIGTSTP, which a test's process group may ignore)
        try:
            with stopped(store, "orchestrator"):  # the trainer runs on: it waits for the orchestrator's rollouts
                time.sleep(STALE_S + 1.5)
                beat = (lock_dir(store) / "holder.json").stat().st_mtime
                assert time.time() - beat > STALE_S  # its heartbeat stopped
                before = published(store)
                second = second_run(tmp_path)
                assert second.returncode == 2, second.stderr
                line = second.stderr
                assert line.count("\n") == 1 and line.startswith(
                    f"error: {store.root} is in use by another run of this stage (pid {first.pid} on "), line
                assert f"stopped (Ctrl-Z or SIGSTOP: continue it with fg or kill -CONT {first.pid})" in line
                assert "; its processes are alive: " in line and "trainer pid " in line and "orchestrator pid " in line
                assert published(store) >= before  # the refused run deleted nothing
        finally:
            os.kill(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err[-3000:]
    assert f"stage 1 of run 'tiny' finished: {STEPS} steps" in out
    assert "discarded" not in err  # no restart point was applied to its files
    assert trainer_steps(store) == list(range(1, STEPS + 1))  # each step once, by the first run alone
    assert published(store) >= before | {("weights", STEPS), ("checkpoints", STEPS)}
    assert not corrupt_stable_steps(store)


def test_a_run_whose_lock_is_removed_by_hand_stops_before_writing_again(tmp_path: Path) -> None:
    """``rm -r LOCK`` mid-run: a second run is still refused while the first's processes run,
    and the first, finding that it no longer holds the lock, stops before its next write with
    one line; none of its files is lost."""
    store = RunStore(tmp_path, "tiny", 1)
    first = start(tmp_path)
    try:
        wait_for_loop(store, first)
        with stopped(store, "trainer", "orchestrator"):  # both still to write their next step
            remove_by_hand(lock_dir(store))
            time.sleep(1.0)
            assert not lock_dir(store).exists()  # the first run's heartbeat (0.5 s) does not make it again
            before = published(store)
            second = second_run(tmp_path)
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert second.returncode == 2, second.stderr
    line = second.stderr
    assert line.count("\n") == 1 and line.startswith(
        f"error: {store.root} is in use by another run of this stage (its LOCK/ is gone (removed by hand?); its "
        "processes are alive: "), line
    prefix = f"error: {store.root}: this run (attempt "
    assert first.returncode == 1, err[-3000:]
    logs = {name: (store.logs_dir / f"{name}.log").read_text() for name in ("trainer", "orchestrator")}
    lines = [ln for text in logs.values() for ln in text.splitlines() if ln.startswith(prefix)]
    assert lines and all(f"no longer holds the stage's lock: {lock_dir(store)} is gone (removed by hand?); stopped "
                         "before writing again" in ln for ln in lines), logs
    assert lines[0] in err  # the supervisor shows it
    after = published(store)
    assert after >= before  # nothing of the first run was deleted
    assert len(after - before) <= 1, (before, after)  # at most the one write under way when the lock went
    assert not corrupt_stable_steps(store)
