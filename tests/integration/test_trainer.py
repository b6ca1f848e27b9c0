"""The trainer process end to end on CPU: real DeepSpeed, real files, real SIGKILLs.

Rollouts come from ``tests/helpers/scripted.py``, a seeded stand-in for the orchestrator.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from deepscaler.config import load_config, to_yaml
from deepscaler.prefetch import prepare_model
from deepscaler.store import RunStore
from tests.helpers.scripted import write_scripted_rollouts

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
PROMPTS, GROUP = 4, 4


def make_run(tmp_path: Path, *overrides: str, steps: int = 4) -> tuple[Path, RunStore]:
    cfg = load_config(
        [REPO / "yaml/stage1.yaml", REPO / "yaml/tiny-random.yaml"],
        [
            f"run.output_dir={tmp_path}",
            f"run.max_steps={steps}",
            "run.deterministic=true",
            "checkpoint.interval=2",
            f"orchestrator.prompts_per_step={PROMPTS}",
            f"sampling.samples_per_prompt={GROUP}",
            "trainer.rollout_timeout_s=20",
            "trainer.micro_batch_tokens=64",
            *overrides,
        ],
    )
    store = RunStore(cfg.run.output_dir, cfg.run.name, cfg.run.stage)
    store.ensure_dirs()
    store.run_yaml.write_text(to_yaml(cfg))
    prepare_model(cfg)  # the launcher's step before the trainer starts
    write_scripted_rollouts(store, range(steps), prompts=PROMPTS, group_size=GROUP, vocab=cfg.model.tiny.vocab_size)
    return store.run_yaml, store


def run_trainer(run_yaml: Path, *args: str, fault: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DEEPSCALER_FAULT", None)
    if fault:
        env["DEEPSCALER_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "deepscaler.trainer", "--config", str(run_yaml), *args],
        capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO,
    )


def final_weights(store: RunStore, step: int) -> dict:
    return load_file(store.step_dir("weights", step) / "model.safetensors")


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype
        assert (a[k] == b[k]).all(), f"{k} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 4-step run: the weights every resumed run must reproduce exactly."""
    run_yaml, store = make_run(tmp_path_factory.mktemp("ref"))
    out = run_trainer(run_yaml)
    assert out.returncode == 0, out.stderr[-3000:]
    return store


def test_a_run_publishes_weights_checkpoints_and_metrics(reference):
    store = reference
    assert store.stable_steps("weights") == [3, 4]  # the tiny preset keeps the last 2
    assert store.stable_steps("checkpoints") == [2, 4]
    metrics = [r for r in store.read_metrics().records if "pg_loss" in r]
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]
    for r in metrics:
        assert r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["kl"] >= 0
    # A published step is a Hugging Face folder that transformers loads directly.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(store.step_dir("weights", 4))
    AutoTokenizer.from_pretrained(store.step_dir("weights", 4))


def test_training_changes_the_weights(reference):
    w3, w4 = final_weights(reference, 3), final_weights(reference, 4)
    assert any(not (w3[k] == w4[k]).all() for k in w3)


@pytest.mark.parametrize("stop_after", [1, 3])  # before the first checkpoint; one step after it
def test_resume_after_a_kill_gives_bit_identical_weights(tmp_path, reference, stop_after):
    """SIGKILL right after step `stop_after`, resume from the newest stable checkpoint."""
    run_yaml, store = make_run(tmp_path)
    out = run_trainer(run_yaml, fault=f"trainer.after_step@{stop_after}")
    assert out.returncode == -9
    out = run_trainer(run_yaml, "--resume-step", "latest")
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same(final_weights(store, 4), final_weights(reference, 4))


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, reference):
    run_yaml, store = make_run(tmp_path)
    out = run_trainer(run_yaml, fault="checkpoint.mid_write@4")
    assert out.returncode == -9
    assert store.stable_steps("checkpoints") == [2]  # the half-written step 4 is not stable
    assert any(p.name.startswith("step_4") for p in store.checkpoints_dir.iterdir())
    out = run_trainer(run_yaml, "--resume-step", "latest")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "removed an unfinished step" in out.stderr
    assert_same(final_weights(store, 4), final_weights(reference, 4))


def test_resume_step_that_does_not_exist_lists_the_stable_ones(reference):
    out = run_trainer(reference.run_yaml, "--resume-step", "3")
    assert out.returncode == 2
    assert "no stable checkpoint" in out.stderr and "(stable: 2, 4)" in out.stderr


def test_missing_rollouts_time_out_with_a_clear_error(tmp_path):
    run_yaml, store = make_run(tmp_path, "trainer.rollout_timeout_s=2", steps=4)
    import shutil

    shutil.rmtree(store.step_path("rollouts", 1))
    out = run_trainer(run_yaml)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "rollouts" in last and "step_1" in last


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ranks_match_one_rank(tmp_path, reference, zero_stage):
    """Data-parallel ranks split each mini-batch; the gradient is the same token-mean."""
    run_yaml, store = make_run(tmp_path, f"trainer.deepspeed.zero_stage={zero_stage}", "run.deterministic=false")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "deepscaler.trainer", "--config", str(run_yaml)],
        capture_output=True, text=True, env=env, timeout=600, cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = final_weights(reference, 4), final_weights(store, 4)
    for k in one:
        assert (one[k] - two[k]).abs().max() < 1e-5, k
