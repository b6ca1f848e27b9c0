"""Damage a run's files between two attempts: a torn last line in metrics.jsonl, a weights
directory without its marker, a writer's leftover temp directory, and a truncated file in the
newest checkpoint. The resume detects each, skips or repairs it, says so, and finishes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

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
    trainer_log = (store.logs_dir / "trainer.log").read_text()
    assert "skipping a damaged checkpoint" in trainer_log and "step_4" in trainer_log
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
