"""Whose log-probs the PPO ratio is taken against, through the real processes (hf server,
orchestrator, DeepSpeed trainer). Two test-only faults (deepscaler/faults.py) stand in for what
CPU runs of the tiny model lack: ``server.logprob_noise`` puts noise on the server's returned
log-probs (on CPU in fp32 the sampler and the trainer agree to 1e-6, on GPUs vLLM's bf16 kernels
and the trainer's disagree per token), and ``orchestrator.random_rewards`` draws the rewards at
random (the random tiny model earns none, so every advantage would be 0 and nothing clipped)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from deepscaler.store import RunStore

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
FAULTS = "server.logprob_noise@0.3,orchestrator.random_rewards@on"


def run(out: Path, *overrides: str) -> list[dict]:
    argv = [sys.executable, "-m", "deepscaler.submit", "--stage", "1", "--preset", "tiny-random", "--executor", "local",
            "--output-dir", str(out), "--max-steps", "3", "run.deterministic=true", *overrides]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=400, cwd=REPO,
                          env={**os.environ, "DEEPSCALER_FAULT": FAULTS})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    store = RunStore(out, "tiny", 1)
    return [r for r in store.read_metrics().records if r.get("source") == "trainer" and "event" not in r]


def test_against_the_trainers_own_log_probs_the_first_update_neither_moves_nor_clips(tmp_path: Path) -> None:
    records = run(tmp_path)
    assert len(records) == 3
    for r in records:
        assert r["first_update_ratio_mean"] == 1.0 and r["first_update_clip_fraction"] == 0.0, r
        assert 0.01 < r["mismatch_kl"] < 1.0 and r["mismatch_max"] > 0.3, r  # N(0, 0.3) noise: k3 about 0.045
        assert "tis_weight_mean" not in r  # on-policy: truncated IS is off


def test_against_the_samplers_log_probs_the_first_update_clips_on_noise(tmp_path: Path) -> None:
    records = run(tmp_path, "trainer.loss.old_logprobs=inference")
    assert len(records) == 3
    for r in records:
        assert r["first_update_ratio_mean"] != 1.0 and r["first_update_clip_fraction"] > 0.05, r
        assert "mismatch_kl" not in r  # no extra pass in this mode


def test_sampling_ahead_weights_each_token_by_a_truncated_ratio(tmp_path: Path) -> None:
    records = run(tmp_path, "orchestrator.async_level=1")
    assert len(records) == 3  # an empty list would pass the loop below
    for r in records:
        assert r["first_update_ratio_mean"] == 1.0, r
        assert 0.0 < r["tis_weight_mean"] <= 2.0 and 0.0 <= r["tis_clipped_fraction"] < 1.0, r
    weights = load_file(RunStore(tmp_path, "tiny", 1).step_dir("weights", 3) / "model.safetensors")
    assert all(bool(t.isfinite().all()) for t in weights.values())
