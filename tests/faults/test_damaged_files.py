"""Damage a run's files between two attempts: a torn last line in metrics.jsonl, a weights
directory without its marker, a writer's leftover temp directory, and a truncated file in the
newest checkpoint. The resume detects each, skips or repairs it, says so, and finishes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deepscaler.store import RunStore
from tests.integration.test_loop import REPO, submit_argv

pytestmark = pytest.mark.slow


def test_resume_skips_or_repairs_damaged_files_and_reports_them(reference_stage: RunStore, tmp_path: Path) -> None:
    shutil.copytree(reference_stage.output_dir, tmp_path, dirs_exist_ok=True)  # a finished 4-step run
    store = RunStore(tmp_path, "tiny", 1)
    assert store.stable_steps("checkpoints") == [2, 4]

    with open(store.metrics_path, "ab") as f:
        f.write(b'{"source": "orchestrator", "step": 9, "rew')  # a crash mid-write
    (store.weights_dir / "step_9").mkdir()  # no STABLE marker: a rename that never got its marker
    (store.weights_dir / "step_9" / "model.safetensors").write_bytes(b"\0" * 100)
    (store.rollouts_dir / "step_7.tmp-0123abcd").mkdir()  # a writer killed mid-publish
    model = store.step_path("checkpoints", 4) / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # damaged after publishing

    resumed = subprocess.run(submit_argv(tmp_path, "--resume-step", "latest", steps=4), capture_output=True,
                             text=True, cwd=REPO, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "ended in a torn line" in resumed.stderr  # repaired, and said so
    # The supervisor decided the restart point once, for both processes, and said why.
    assert "skipping a damaged checkpoint" in resumed.stderr and "step_4" in resumed.stderr
    assert "restart from checkpoint 2: discarded checkpoints [4]" in resumed.stderr
    trainer_log = (store.logs_dir / "trainer.log").read_text()
    assert "removed an unfinished step left by a crash" in trainer_log and "step_9" in trainer_log
    assert "removed an unfinished step" in (store.logs_dir / "orchestrator.log").read_text()
    start = [r for r in store.read_metrics().records if r.get("source") == "trainer" and r.get("event") == "start"]
    assert start[-1]["resumed_from"] == 2  # the damaged step 4 was never chosen
    log = store.read_metrics()
    assert log.bad_lines == 0 and not log.torn_tail
    for kind in ("weights", "checkpoints", "rollouts"):
        for step in store.stable_steps(kind):
            store.verify_step(kind, step)
    assert store.stable_steps("checkpoints") == [2, 4] and store.is_stable("weights", 4)
    assert not (store.weights_dir / "step_9").exists() and not (store.rollouts_dir / "step_7.tmp-0123abcd").exists()
    assert_same_weights(store, reference_stage, 4)  # as if run from checkpoint 2 without the damage


def assert_same_weights(store: RunStore, reference: RunStore, step: int) -> None:
    got, expected = (load_file(s.step_dir("weights", step) / "model.safetensors") for s in (store, reference))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


# A missing marker is also covered (for weights) by the test above; its full trial is a
# trial (pytest -m trial).
@pytest.mark.parametrize("damage", ["truncated rank file", pytest.param("no STABLE marker", marks=pytest.mark.trial)])
def test_a_damaged_newest_checkpoint_restarts_both_sides_from_the_one_before(reference_stage: RunStore, tmp_path: Path,
                                                                            damage: str) -> None:
    """The trainer and the orchestrator start from the same checkpoint, so neither waits for a
    step the other will never write (both cases hung for hours before), and the weights come
    out as a run from that checkpoint gives them (deterministic CPU). Longer than the first run:
    a stale 'final' rollout of the shorter run must not stop the trainer early."""
    shutil.copytree(reference_stage.output_dir, tmp_path, dirs_exist_ok=True)
    store = RunStore(tmp_path, "tiny", 1)
    newest = store.step_path("checkpoints", 4)
    if damage == "truncated rank file":
        rank = newest / "rank_0.safetensors"
        os.truncate(rank, 1000)
    else:
        (newest / "STABLE").unlink()
    # keep_last=5 keeps weights/step_4 past retention so it can be compared with the reference.
    resumed = subprocess.run(submit_argv(tmp_path, "--resume-step", "latest", "checkpoint.keep_last=5", steps=6),
                             capture_output=True,
                             text=True, cwd=REPO, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    start = [r for r in store.read_metrics().records if r.get("source") == "trainer" and r.get("event") == "start"]
    assert start[-1]["resumed_from"] == 2 and store.is_stable("weights", 6)
    assert_same_weights(store, reference_stage, 4)


def test_a_damaged_newest_weights_step_is_published_again_and_the_run_goes_on(reference_stage: RunStore,
                                                                              tmp_path: Path) -> None:
    """The weights the servers start from and the rollouts step the orchestrator reads its data
    progress from lost bytes after the run ended. The resume discards them, says so, publishes
    weights/step_4 again from checkpoint 4 (the same weights), samples on, and finishes; before,
    the server failed deep in the safetensors loader, on every resume."""
    shutil.copytree(reference_stage.output_dir, tmp_path, dirs_exist_ok=True)
    store = RunStore(tmp_path, "tiny", 1)
    assert store.stable_steps("weights") == [3, 4] and store.stable_steps("rollouts") == [2, 3]
    os.truncate(store.step_path("weights", 4) / "model.safetensors", 3_000_000)
    os.truncate(store.step_path("weights", 3) / "model.safetensors", 1000)  # the servers pass it over
    os.truncate(store.step_path("rollouts", 3) / "rollout.safetensors", 1000)

    resumed = subprocess.run(submit_argv(tmp_path, "--resume-step", "latest", "checkpoint.keep_last=5", steps=5),
                             capture_output=True, text=True, cwd=REPO, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "weights/step_4: model.safetensors has 3000000 bytes" in resumed.stderr
    assert "discarded weights [4] (the trainer publishes them again)" in resumed.stderr
    assert "discarded rollouts [3] (the orchestrator samples them again)" in resumed.stderr
    assert store.is_stable("weights", 5)
    store.verify_step("weights", 4, checksums=True)
    assert_same_weights(store, reference_stage, 4)


def test_eval_of_a_damaged_step_is_one_line_naming_the_file(reference_stage: RunStore, tmp_path: Path) -> None:
    shutil.copytree(reference_stage.output_dir, tmp_path, dirs_exist_ok=True)
    store = RunStore(tmp_path, "tiny", 1)
    os.truncate(store.step_path("weights", 4) / "model.safetensors", 3_000_000)
    done = subprocess.run([sys.executable, "-m", "deepscaler.eval", "run", "--model", "4", "--output-dir",
                           str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-3000:]
    assert done.stderr.startswith(f"error: {store.step_path('weights', 4)}: model.safetensors has 3000000 bytes")
    assert not store.eval_dir(4).exists()
