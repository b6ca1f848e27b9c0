"""Fault-injection trials on the tiny loop: SIGKILL one process of a running stage at a seeded
random moment, resume with ``--resume-step latest``, and compare the final weights with an
uninterrupted run (deterministic CPU mode: they must be bit-identical).

Used by ``tests/faults/test_kill_and_resume.py``: three victims named in the suite and the
trials, twenty seeded kills among the trials (``pytest -m trial``).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file

from deepscaler.store import STABLE, RunStore

REPO = Path(__file__).resolve().parents[2]
VICTIMS = ("trainer", "orchestrator", "server0")
# Steps of the session's shared reference stage (the conftest fixture reference_stage).
REFERENCE_STEPS = 4


def submit_argv(out: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "deepscaler.submit", "--stage", "1", "--preset", "tiny-random", "--executor", "local",
            "--output-dir", str(out), "--max-steps", str(steps), "run.deterministic=true", "checkpoint.interval=2",
            *extra]


def final_weights(store: RunStore, step: int) -> dict:
    return load_file(store.step_dir("weights", step) / "model.safetensors")


def reference_run(out: Path, steps: int) -> RunStore:
    """An uninterrupted deterministic stage of ``steps`` steps: what a trial must end up equal to."""
    done = subprocess.run(submit_argv(out, steps), capture_output=True, text=True, cwd=REPO, timeout=900)
    if done.returncode != 0 or f"stage 1 of run 'tiny' finished: {steps} steps" not in done.stdout:
        raise RuntimeError(f"reference run failed (exit {done.returncode}):\n"
                           f"{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return RunStore(out, "tiny", 1)


def process_of(store: RunStore, victim: str) -> int | None:
    """The pid of a stage's process ("trainer", "orchestrator" or a server name)."""
    module = {"trainer": b"deepscaler.trainer", "orchestrator": b"deepscaler.orchestrator"}.get(victim,
                                                                                              b"deepscaler.inference")
    for pid in os.listdir("/proc"):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if module in cmd and str(store.run_yaml).encode() in cmd and (victim in VICTIMS[:2] or victim.encode() in cmd):
            return int(pid)
    return None


def trainer_starts(store: RunStore) -> list[dict]:
    return [r for r in store.read_metrics().records if r.get("source") == "trainer" and r.get("event") == "start"]


def corrupt_stable_steps(store: RunStore) -> list[str]:
    """Stable steps whose files do not match their manifest (must always be empty)."""
    bad = []
    for kind in ("rollouts", "weights", "checkpoints"):
        for step in store.stable_steps(kind):
            try:
                store.verify_step(kind, step)
            except Exception as e:  # noqa: BLE001 - report, do not stop
                bad.append(f"{kind}/step_{step}: {e}")
    return bad


@dataclass
class Trial:
    seed: int
    victim: str
    delay_s: float
    killed_at_weights: int | None = None  # newest stable weights step when the kill landed
    resumed_from: int | None = None  # checkpoint the resume started from
    attempts: int = 0  # resume submissions until success
    killed_pid: int | None = None  # the victim's pid, alive (not a zombie) when SIGKILL was sent
    launcher_exit: int | None = None  # the interrupted submit's exit code (non-zero: the stage stopped)
    launcher_error: str = ""  # its "error: " line: "error: <victim> exited with code -9 ..." for a worker
    resumes: tuple[str | None, ...] = ()  # "resume" of each launcher "attempt" after the first (the resumes)
    identical: bool = False
    corrupt: tuple[str, ...] = ()
    error: str = ""

    @property
    def steps_lost(self) -> int:
        """Published steps that had to be computed again."""
        if self.killed_at_weights is None:
            return 0
        return max(0, self.killed_at_weights - (self.resumed_from or 0))

    @property
    def recovered(self) -> bool:
        return self.identical and not self.corrupt and not self.error


def _state(pid: int) -> str | None:
    """The process's state letter from /proc (``Z``: a zombie); None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def kill_victim(store: RunStore, victim: str) -> int:
    """SIGKILL the victim and wait until it is gone; its pid. Raises when there is no live
    victim to kill: a trial without a kill proves nothing, so it must not pass."""
    pid = process_of(store, victim)
    if pid is None or _state(pid) in (None, "Z"):
        raise RuntimeError(f"no live {victim} process of {store.run_yaml} to kill (pid {pid}): "
                           "the stage ended before the kill, or the process lookup is broken")
    os.kill(pid, signal.SIGKILL)
    for _ in range(600):  # reaped by the launcher, or at least dead (a zombie), within a minute
        if _state(pid) in (None, "Z"):
            return pid
        time.sleep(0.1)
    raise RuntimeError(f"{victim} (pid {pid}) still runs a minute after SIGKILL")


def launcher_attempts(store: RunStore) -> list[dict]:
    """The launcher's "attempt" records, oldest first: one per submission that started the
    stage's processes. ``resume`` is the checkpoint it restarted from (None: none yet)."""
    return [r for r in store.read_metrics().records if r.get("source") == "launcher" and r.get("event") == "attempt"]


def run_trial(out: Path, reference: RunStore, steps: int, seed: int, victim: str | None = None) -> Trial:
    rng = random.Random(seed)
    trial = Trial(seed, victim or rng.choice(VICTIMS), round(rng.uniform(0.0, 12.0), 1))
    store = RunStore(out, "tiny", 1)
    out.mkdir(parents=True, exist_ok=True)
    launcher_log = out / "interrupted-submit.stderr"
    with open(launcher_log, "w") as err:
        launcher = subprocess.Popen(submit_argv(out, steps), stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
    try:
        # Start the clock once the loop is running (the first rollouts exist), then wait the delay.
        deadline = time.monotonic() + 300
        while not store.is_stable("rollouts", 0) and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(trial.delay_s)
        trial.killed_at_weights = store.latest_stable("weights")
        trial.killed_pid = kill_victim(store, trial.victim)
        trial.launcher_exit = launcher.wait(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    lines = launcher_log.read_text(errors="replace").strip().splitlines()
    trial.launcher_error = next((line for line in lines if line.startswith("error: ")), "")
    before = len(trainer_starts(store))
    for attempt in range(1, 4):
        if store.is_stable("weights", steps):
            break
        trial.attempts = attempt
        resume = subprocess.run(submit_argv(out, steps, "--resume-step", "latest"), capture_output=True, text=True,
                                cwd=REPO, timeout=900)
        if attempt == 1 and len(trainer_starts(store)) > before:
            trial.resumed_from = trainer_starts(store)[before]["resumed_from"] or 0
        if resume.returncode != 0:
            trial.error = resume.stderr.strip().splitlines()[-1] if resume.stderr.strip() else f"exit {resume.returncode}"
    trial.resumes = tuple(r.get("resume") for r in launcher_attempts(store)[1:])
    trial.corrupt = tuple(corrupt_stable_steps(store))
    if store.is_stable("weights", steps):
        trial.error = ""
        final, expected = final_weights(store, steps), final_weights(reference, steps)
        trial.identical = final.keys() == expected.keys() and all((final[k] == expected[k]).all() for k in final)
    elif not trial.error:
        trial.error = "no final weights"
    for d in store.kind_dir("weights").glob("step_*"):
        if ".tmp-" not in d.name and not (d / STABLE).is_file():
            trial.corrupt += (f"weights/{d.name} has no {STABLE} marker",)
    return trial
