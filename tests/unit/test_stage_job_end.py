"""How a Slurm stage's end reads: the states ``submit --wait`` prints while sacct does not know
a just-submitted job yet, the one line a cancelled stage job ends with (and the command in it,
which resumes the stage with its own config), and the summary a ``--wait`` prints at the end.
Real counterpart: tests/integration/test_slurm_stage.py::test_scancel_leaves_stable_steps_and_resume_continues."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from deepscaler import handover
from deepscaler.config import stage_config
from deepscaler.inference.contract import write_token
from deepscaler.launch import LaunchError, write_run_yaml
from deepscaler.slurm import jobs, stage_job
from deepscaler.slurm.stage_job import Cancelled, Sigterm, StageJob, stage_error, stopped_line
from deepscaler.store import STABLE, RunStore


def polled_states(monkeypatch, rounds: list[str], unknown_after_s: float) -> list[str]:
    """What ``wait_for_jobs`` shows of one job whose sacct state is each of ``rounds`` in turn."""
    answers = iter(rounds)
    monkeypatch.setattr(jobs, "job_states", lambda js: {"7": next(answers)})
    seen: list[str] = []
    jobs.wait_for_jobs([object()], lambda states: seen.append(states["7"]), poll_s=0, unknown_after_s=unknown_after_s)
    return seen


def test_a_job_sacct_does_not_know_yet_reads_pending(monkeypatch, capsys) -> None:
    assert polled_states(monkeypatch, ["UNKNOWN", "UNKNOWN", "RUNNING", "COMPLETED"], 60) == [
        "PENDING", "PENDING", "RUNNING", "COMPLETED"]
    assert capsys.readouterr().err == ""


def test_a_job_sacct_keeps_not_knowing_reads_unknown_with_one_warning(monkeypatch, capsys) -> None:
    assert polled_states(monkeypatch, ["UNKNOWN", "UNKNOWN", "COMPLETED"], 0) == ["UNKNOWN", "UNKNOWN", "COMPLETED"]
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("warning: sacct has had no record of job 7 for 0 s: is Slurm's accounting (slurmdbd) up?")


@pytest.fixture
def handlers():
    """SIGTERM and SIGUSR2 as they were before the test."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR2)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def sigterm_self(wait_s: float = 5.0) -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(0.01)


def test_sigterm_stops_the_supervisor_once_and_is_remembered(handlers) -> None:
    sigterm = Sigterm()
    with pytest.raises(Cancelled), sigterm.raising():
        sigterm_self()
    assert sigterm.received
    sigterm_self(0.2)  # a second SIGTERM (Slurm's, after scancel's) while the stop is under way: no second raise


def test_the_sigterm_of_submitits_requeue_changes_nothing(handlers) -> None:
    """The time limit: USR2 goes to submitit's handler (it checkpoints and requeues), and the
    requeue's own SIGTERM is not a cancel."""
    requeues = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: requeues.append(signum))
    sigterm = Sigterm()
    with sigterm.raising():
        os.kill(os.getpid(), signal.SIGUSR2)
        sigterm_self(0.2)
    assert requeues == [signal.SIGUSR2] and not sigterm.received


@pytest.fixture
def run(tmp_path: Path):
    """A stage with run.yaml, checkpoint 2 stable, the orchestrator at step 3."""
    cfg = stage_config(1, "tiny-random", [f"run.output_dir={tmp_path}", "run.max_steps=6", "checkpoint.interval=2"])
    store = RunStore(tmp_path, cfg.run.name, 1)
    write_run_yaml(cfg, store)
    store.step_path("checkpoints", 2).mkdir(parents=True)
    (store.step_path("checkpoints", 2) / STABLE).touch()
    with handover.Reporter(store, "orchestrator", 3):
        pass
    return cfg, store


def test_a_cancel_ends_with_the_command_that_resumes_the_stage_with_its_config(run) -> None:
    cfg, store = run
    line = stopped_line(cfg, "41", "CANCELLED")
    head, command = line.split(": python ")
    assert head == ("stopped: stage 1 of run 'tiny' cancelled (scancel) during step 3. Resume with --resume-step "
                    "latest (from checkpoint step 2)")
    argv = shlex.split("python " + command)
    assert argv[:3] == ["python", "-m", "deepscaler.submit"] and argv[-2:] == ["--resume-step", "latest"]
    from deepscaler.submit import build_parser, resolve

    assert resolve(build_parser().parse_args(argv[3:])) == [cfg]  # the run's own config, every key


def test_how_slurm_stopped_the_job_says_whether_to_resume(run) -> None:
    cfg, _ = run
    timeout = stopped_line(cfg, "41", "TIMEOUT")
    assert "ended by Slurm (TIMEOUT) during step 3. Resume with --resume-step latest" in timeout
    assert "got SIGTERM (scancel, or Slurm) during step 3. Resume with" in stopped_line(cfg, "41", None)
    requeued = stopped_line(cfg, "41", "REQUEUED")  # Slurm resumes it by itself: no command
    assert requeued == ("stopped: stage 1 of run 'tiny' during step 3: Slurm requeued job 41 (REQUEUED); its next "
                        "attempt resumes from checkpoint step 2")


def stage_job_end(monkeypatch, capsys, tmp_path: Path, store: RunStore, stage) -> tuple[int, str]:
    """Run StageJob as the batch job would, with ``stage`` as the stage itself; (exit code, stderr)."""
    import deepscaler.launch

    write_token(store.root)
    monkeypatch.setattr(deepscaler.launch, "run_stage", lambda *a, **k: stage())
    monkeypatch.setattr(stage_job, "apply_process_settings", lambda cfg: None)
    monkeypatch.setattr(stage_job, "job_state", lambda job_id: "CANCELLED")
    for key in ("SLURM_JOB_NODELIST", "SLURM_JOB_NODELIST_HET_GROUP_1", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    with pytest.raises(SystemExit) as end:
        StageJob(str(store.run_yaml))()
    err = capsys.readouterr().err
    (tmp_path / "job.err").write_text(err)
    said = [x for x in err.splitlines() if x.startswith(("error: ", "stopped: "))]
    assert stage_error(tmp_path / "job.err") == said[-1]  # what submit --wait shows of it
    return end.value.code, err


def test_a_stage_job_cancelled_ends_with_the_stopped_line_and_no_traceback(run, monkeypatch, capsys, tmp_path,
                                                                          handlers) -> None:
    def cancelled():
        sigterm_self()

    code, err = stage_job_end(monkeypatch, capsys, tmp_path, run[1], cancelled)
    assert code == 143 and err.splitlines()[-1].startswith("stopped: stage 1 of run 'tiny' cancelled (scancel)")
    assert "Traceback" not in err and "error: " not in err


def test_the_stopped_line_comes_at_the_sigterm_before_the_stop_cleans_up(run, monkeypatch, capsys, tmp_path,
                                                                        handlers) -> None:
    """Slurm kills the job KillWait seconds after its SIGTERM (5 s on the local cluster), which
    stopping the processes may outlast: the line must not wait for it."""
    def cancelled_with_a_slow_stop():
        try:
            sigterm_self()
        finally:
            print("stopping the processes", file=sys.stderr, flush=True)

    code, err = stage_job_end(monkeypatch, capsys, tmp_path, run[1], cancelled_with_a_slow_stop)
    lines = err.splitlines()
    assert code == 143 and lines[-2].startswith("stopped: stage 1 of run 'tiny' cancelled (scancel)"), lines
    assert lines[-1] == "stopping the processes" and sum(x.startswith("stopped: ") for x in lines) == 1


def test_a_process_killed_by_the_cancel_is_not_the_cause(run, monkeypatch, capsys, tmp_path, handlers) -> None:
    """The trainer's exit 143 seen before the supervisor's own SIGTERM arrived."""
    def trainer_killed_first():
        try:
            raise LaunchError("trainer exited with code 143 (stage 1 of run 'tiny')\nits log tail")
        finally:
            sigterm_self(0.2)  # received while run_stage unwinds

    code, err = stage_job_end(monkeypatch, capsys, tmp_path, run[1], trainer_killed_first)
    assert code == 143 and err.splitlines()[-1].startswith("stopped: stage 1 of run 'tiny' cancelled (scancel)")


def test_a_failure_without_sigterm_still_ends_with_its_error(run, monkeypatch, capsys, tmp_path, handlers) -> None:
    def trainer_failed():
        raise LaunchError("trainer exited with code 1 (stage 1 of run 'tiny')\nits log tail")

    code, err = stage_job_end(monkeypatch, capsys, tmp_path, run[1], trainer_failed)
    assert code == 1
    assert err.splitlines() == ["its log tail", "error: trainer exited with code 1 (stage 1 of run 'tiny')"]


@pytest.mark.parametrize("code", [0, 1])
def test_submit_wait_ends_with_the_summary_of_a_local_run_once_every_job_completed(run, monkeypatch, capsys,
                                                                                  code) -> None:
    cfg, store = run
    import deepscaler.submit

    monkeypatch.setattr(stage_job, "submit_stages", lambda configs, resume, wait: code)
    monkeypatch.setattr(deepscaler.submit.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(deepscaler.submit, "apply_process_settings", lambda cfg, job: None)  # this process's umask
    assert deepscaler.submit.main(["--stage", "1", "--preset", str(store.run_yaml), "--executor", "slurm",
                                   "--resume-step", "latest", "--wait"]) == code
    out = capsys.readouterr().out
    assert ("stage 1 of run 'tiny' finished: " in out and "\nnext:\n" in out) == (code == 0), out


def test_submit_wait_waits_for_the_last_words_of_a_job_sacct_already_calls_cancelled(tmp_path) -> None:
    """sacct says CANCELLED at scancel; the supervisor's stopped line comes moments later."""
    log = tmp_path / "job.err"
    log.write_text("slurmstepd-node1: error: *** JOB 3 ON node1 CANCELLED ***\n")
    later = threading.Timer(1.0, lambda: log.write_text(log.read_text() + "stopped: stage 1 of run 'tiny' ...\n"))
    later.start()
    assert stage_error(log) is None  # no wait: not there yet
    assert stage_error(log, wait_s=10) == "stopped: stage 1 of run 'tiny' ..."
    assert stage_error(tmp_path / "missing.err", wait_s=0.6) is None  # a log that never comes: the wait ends
