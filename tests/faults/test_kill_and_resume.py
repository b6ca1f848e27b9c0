"""SIGKILL of the trainer, the orchestrator and an inference server at seeded random moments of
a running tiny stage: the stage stops, ``--resume-step latest`` finishes it, no stable step is
corrupt, and the final weights are bit-identical to an uninterrupted run (deterministic CPU).
The same trials run many more times, for a victim and a moment each seed picks, as trials
(``pytest -m trial -k seeded_kill``, about 20 minutes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.chaos import REFERENCE_STEPS, VICTIMS, run_trial

pytestmark = pytest.mark.slow
STEPS = REFERENCE_STEPS


@pytest.fixture
def reference(reference_stage):
    assert reference_stage.latest_stable("weights") == STEPS  # conftest's shared run has this many steps
    return reference_stage


# The trainer's kill stays in the suite; the other two victims are trials (pytest -m trial),
# to keep the suite under its 40 minutes.
@pytest.mark.parametrize("victim,seed", [pytest.param(v, s, marks=() if v == "trainer" else pytest.mark.trial)
                                         for v, s in zip(VICTIMS, (11, 12, 13))])
def test_kill_then_resume_gives_the_same_weights(reference, tmp_path: Path, victim: str, seed: int) -> None:
    trial = run_trial(tmp_path, reference, STEPS, seed, victim)  # raises when there was no live victim to kill
    # The kill landed and stopped the stage: the victim is gone, the submit failed; a worker's
    # death is named with its signal (a server's may surface first as the orchestrator's error).
    assert trial.killed_pid is not None and not Path(f"/proc/{trial.killed_pid}/cmdline").exists(), trial
    assert trial.launcher_exit not in (None, 0), trial
    if victim != "server0":
        assert trial.launcher_error.startswith(f"error: {victim} exited with code -9 "), trial
    # and a resume happened: a second attempt in metrics.jsonl, whose restart point (None before
    # the first checkpoint) is the one the trainer started from, and that finished the stage
    assert trial.attempts >= 1 and len(trial.resumes) >= 1 and trial.resumed_from is not None, trial
    assert int(trial.resumes[0] or 0) == trial.resumed_from, trial
    assert not trial.corrupt, trial.corrupt
    assert trial.recovered, trial
    assert trial.steps_lost <= 2, trial  # at most checkpoint.interval steps are computed again


# Twenty seeded kills (victim and moment chosen by the seed): how often a killed stage recovers
# exactly. A trial, not the suite: it repeats what the test above holds.
@pytest.mark.trial
@pytest.mark.parametrize("seed", range(20))
def test_a_seeded_kill_recovers_the_same_weights(reference, tmp_path: Path, seed: int) -> None:
    trial = run_trial(tmp_path, reference, STEPS, seed)
    assert trial.recovered, trial  # bit-identical weights, no corrupt stable step, no error
