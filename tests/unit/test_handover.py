"""Waits on another process's step: they say what they wait for, and fail with one line when
the producer ended, moved past the step, or stopped reporting (deepscaler/handover.py)."""

from __future__ import annotations

import inspect
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deepscaler import handover
from deepscaler.handover import ATTEMPT_ENV, ProducerGone, Reporter, watch
from deepscaler.store import RunStore, StepTimeout

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path, monkeypatch) -> RunStore:
    monkeypatch.setenv(ATTEMPT_ENV, "attempt-1")
    s = RunStore(tmp_path, "exp", 1)
    s.ensure_dirs()
    return s


def write(store: RunStore, kind: str, step: int) -> None:
    with store.write_step(kind, step) as tmp:
        (tmp / "data.json").write_text("{}")


def test_a_killed_producer_fails_the_wait_with_one_line_naming_both_sides(store):
    stale_s = 2
    producer = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from deepscaler.handover import Reporter\nfrom deepscaler.store import RunStore\n"
         f"with Reporter(RunStore({str(store.output_dir)!r}, 'exp', 1), 'orchestrator', 3, heartbeat_s=0.2):\n"
         "    print('up', flush=True); time.sleep(600)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, ATTEMPT_ENV: "attempt-1"})
    try:
        assert producer.stdout.readline() == "up\n"
        time.sleep(0.5)
        producer.send_signal(signal.SIGKILL)  # no chance to say "failed": only the heartbeat stops
        producer.wait()
        t0 = time.monotonic()
        with pytest.raises(ProducerGone) as e:
            store.wait_for_step("rollouts", 3, timeout_s=60, poll_s=0.1,
                                check=watch(store, "rollouts", 3, stale_s=stale_s))
        waited = time.monotonic() - t0
    finally:
        producer.kill()
        producer.wait()
    message = str(e.value)
    assert "\n" not in message
    assert "rollouts/step_3" in message and f"orchestrator (pid {producer.pid}" in message
    # Not before the report went stale (its age, as the message states it, is past stale_s) ...
    age = int(re.search(r"running at step 3 has not reported for (\d+)s", message).group(1))
    assert age >= stale_s
    # ... and, the promise, well before the 60 s timeout: within 3x the staleness.
    assert waited < 3 * stale_s


def test_the_default_staleness_fails_a_wait_within_two_minutes():
    """The trainer and the orchestrator call watch() and Reporter() with their defaults: those
    are the constants, and a dead producer's last report is at most a heartbeat old when it
    dies, so the wait fails within STALE_S + 2 heartbeats (the behaviour: the test above)."""
    assert handover.STALE_S + 2 * handover.HEARTBEAT_S < 120 and handover.LOG_EVERY_S <= 30
    defaults = inspect.signature(watch).parameters
    assert (defaults["stale_s"].default, defaults["log_every_s"].default) == (handover.STALE_S, handover.LOG_EVERY_S)
    assert inspect.signature(Reporter).parameters["heartbeat_s"].default == handover.HEARTBEAT_S


def test_a_producer_past_the_step_fails_the_wait_at_once(store):
    """The deadlock of a resume where each side started from a different step."""
    checks = []
    inner = watch(store, "rollouts", 7)
    with Reporter(store, "orchestrator", 9):
        with pytest.raises(ProducerGone, match=r"for rollouts/step_7: orchestrator .* running at step 9: it is past "
                                               r"step 7 and will not write it"):
            store.wait_for_step("rollouts", 7, timeout_s=60,
                                check=lambda waited: checks.append(waited) or inner(waited))
    assert len(checks) == 1  # at once: the first check fails it, no poll waits on the producer


def test_a_producer_that_ended_without_the_step_fails_the_wait(store, monkeypatch):
    with Reporter(store, "trainer", 4):
        pass
    with pytest.raises(ProducerGone, match=r"weights/step_4 or newer: trainer .* finished at step 4 without writing it"):
        store.wait_for_step("weights", 4, timeout_s=60, or_newer=True, check=watch(store, "weights", 4, or_newer=True))
    with pytest.raises(ValueError), Reporter(store, "trainer", 5):
        raise ValueError("boom")
    assert handover.read(store, "trainer").state == "failed"
    # A failed producer is the supervisor's to report first (its own error names the cause).
    with pytest.raises(StepTimeout) as e:
        store.wait_for_step("weights", 5, timeout_s=0.3, poll_s=0.05, check=watch(store, "weights", 5))
    assert not isinstance(e.value, ProducerGone)
    monkeypatch.setattr(handover, "FAILED_GRACE_S", 0.0)
    with pytest.raises(ProducerGone, match=r"weights/step_5: trainer .* failed at step 5 without writing it"):
        store.wait_for_step("weights", 5, timeout_s=60, check=watch(store, "weights", 5))


def test_an_earlier_attempts_report_is_not_this_attempts_producer(store, monkeypatch):
    with Reporter(store, "orchestrator", 9):
        pass  # "finished at step 9", by attempt-1
    monkeypatch.setenv(ATTEMPT_ENV, "attempt-2")
    said = []

    class Enough(Exception):
        """Ends the wait once it has said twice that it goes on (no clock decides)."""

    def say(line: str) -> None:
        said.append(line)
        if len(said) == 2:
            raise Enough

    with pytest.raises(Enough):  # not ProducerGone: the wait went on past two log periods
        store.wait_for_step("rollouts", 3, timeout_s=60, poll_s=0.05,
                            check=watch(store, "rollouts", 3, log_every_s=0.2, say=say))
    assert all("orchestrator has not reported yet" in s for s in said)


def test_a_long_wait_says_every_interval_what_it_waits_for_and_where_the_producer_is(store):
    """Counted against periods, not seconds: the k-th line comes no sooner than k periods into
    the wait, however slow the machine; the step appears right after the third line, and the
    wait ends on it without another."""
    period, said, at = 0.2, [], []
    start = time.monotonic()

    def say(line: str) -> None:
        said.append(line)
        at.append(time.monotonic() - start)
        if len(said) == 3:
            write(store, "rollouts", 2)

    with Reporter(store, "orchestrator", 2):
        path = store.wait_for_step("rollouts", 2, timeout_s=60, poll_s=0.05,
                                   check=watch(store, "rollouts", 2, log_every_s=period, say=say))
    assert path == store.step_path("rollouts", 2)
    assert len(said) == 3
    assert all(t >= k * period for k, t in enumerate(at, 1)), at  # at most one line per period elapsed
    assert said[0].startswith("waiting 0s for rollouts/step_2; orchestrator at step 2, reported ")


def test_a_producer_moving_on_right_after_writing_never_fails_the_consumer(store):
    """The producer writes step N, then reports N+1: a consumer that reads the report between
    the two re-checks the step before it calls the producer past it."""
    steps = 30

    def produce():
        with Reporter(store, "orchestrator", 0) as report:
            for step in range(steps):
                time.sleep(0.01)
                write(store, "rollouts", step)
                report.at(step + 1)

    thread = threading.Thread(target=produce)
    thread.start()
    for step in range(steps):
        store.wait_for_step("rollouts", step, timeout_s=10, poll_s=0.001, check=watch(store, "rollouts", step))
    thread.join()


def test_a_newer_step_ends_a_wait_for_an_older_one(store):
    """The orchestrator needs weights at most async_level steps old: retention may have
    removed the one it asked for, a newer one serves."""
    write(store, "weights", 6)
    assert store.wait_for_step("weights", 5, timeout_s=0, or_newer=True) == store.step_path("weights", 6)
    with pytest.raises(StepTimeout):
        store.wait_for_step("weights", 5, timeout_s=0)


def test_ranks_other_than_0_write_no_report(store):
    with Reporter(store, "trainer", 1, active=False) as report:
        report.at(2)
    assert handover.read(store, "trainer") is None


def test_finished_means_this_attempts_trainer_finished(store, monkeypatch):
    """What ends the servers of a stage (they stop by themselves): only this attempt's
    trainer reporting it finished; not a running one, a failed one, another attempt's, nor any
    report for a process started by hand (no attempt)."""
    assert not handover.finished(store, "trainer", "attempt-1")  # no report yet
    with Reporter(store, "trainer", 3):
        assert not handover.finished(store, "trainer", "attempt-1")  # running
    assert handover.finished(store, "trainer", "attempt-1")
    assert not handover.finished(store, "trainer", "attempt-2") and not handover.finished(store, "trainer", None)
    with pytest.raises(RuntimeError), Reporter(store, "trainer", 3):
        raise RuntimeError("boom")
    assert not handover.finished(store, "trainer", "attempt-1")  # failed
