"""A resume keeps the recipe it was trained with: the real submit command over a copy of the
session's finished 4-step reference stage (checkpoints 2 and 4), each real resume one step.

A changed recipe key is refused before anything is written; keys that may change are accepted
and recorded (run.yaml says what runs, run-history/ keeps what ran); with
--allow-config-change a changed lr is really used by the resumed trainer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from deepscaler.store import RunStore
from tests.helpers.chaos import REFERENCE_STEPS, submit_argv

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
OLD_LR = 1.0e-4  # yaml/tiny-random.yaml


def copy_of(reference_stage: RunStore, tmp_path: Path) -> RunStore:
    shutil.copytree(reference_stage.output_dir, tmp_path, dirs_exist_ok=True)
    store = RunStore(tmp_path, "tiny", 1)
    assert store.latest_stable("checkpoints") == REFERENCE_STEPS
    return store


def resume(store: RunStore, steps: int, *extra: str) -> subprocess.CompletedProcess:
    """The reference's own command, resumed from its newest checkpoint, ``steps`` steps in all."""
    return subprocess.run(submit_argv(store.output_dir, steps, "--resume-step", "latest", *extra),
                          capture_output=True, text=True, cwd=REPO, timeout=400)


def snapshot(store: RunStore) -> dict[str, bytes]:
    return {str(p.relative_to(store.root)): p.read_bytes() for p in sorted(store.root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("executor", ["local", pytest.param("slurm", marks=pytest.mark.skipif(
    shutil.which("sbatch") is None, reason="no sbatch on PATH"))])
def test_a_changed_recipe_key_is_refused_in_one_line_and_nothing_is_written(reference_stage, tmp_path, executor):
    store = copy_of(reference_stage, tmp_path)
    before = snapshot(store)
    done = resume(store, REFERENCE_STEPS, "--executor", executor, "sampling.samples_per_prompt=8",
                  "trainer.optimizer.lr=5e-4")
    assert done.returncode == 2, done.stdout + done.stderr
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: --resume-step latest would change the recipe of run 'tiny' stage 1: ")
    assert "sampling.samples_per_prompt 4 -> 8, trainer.optimizer.lr 0.0001 -> 0.0005" in err
    assert "--allow-config-change" in err
    assert snapshot(store) == before  # run.yaml, metrics, logs: not a byte written
    assert not store.run_history_dir.exists()


def test_a_resume_may_change_how_long_and_how_it_logs_and_run_yaml_records_it(reference_stage, tmp_path):
    store = copy_of(reference_stage, tmp_path)
    old_text = store.run_yaml.read_text()
    done = resume(store, REFERENCE_STEPS + 1, "log.level=debug")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    notice = next(x for x in done.stderr.splitlines() if x.startswith("notice: resuming with a changed config"))
    # run.output_dir too: this stage was copied from the reference's directory
    assert "run.max_steps 4 -> 5, " in notice and 'log.level "info" -> "debug"' in notice
    assert store.latest_stable("weights") == REFERENCE_STEPS + 1
    now = yaml.safe_load(store.run_yaml.read_text())
    assert now["run"]["max_steps"] == REFERENCE_STEPS + 1 and now["log"]["level"] == "debug"
    history = sorted(store.run_history_dir.iterdir())
    assert len(history) == 1 and history[0].read_text() == old_text  # what ran before, as it was


def trainer_lr(store: RunStore, step: int) -> float:
    rows = [r for r in store.read_metrics().records if r.get("source") == "trainer" and r.get("step") == step
            and "lr" in r]
    return rows[-1]["lr"]


def checkpoint_lrs(store: RunStore, step: int) -> set[float]:
    """The lr of every param group in the optimizer state saved with ``checkpoints/step_N``."""
    meta = json.loads((store.step_dir("checkpoints", step) / "rank_0.json").read_text())

    def groups(node):  # the state tree of trainer/checkpoint.py: {"dict": [[key, node], ...]}, {"list": [...]}
        if "dict" in node:
            items = dict(node["dict"])
            if "lr" in items and "params" in items:
                yield items["lr"]["value"]
            for v in items.values():
                yield from groups(v)
        for v in node.get("list", []) + node.get("tuple", []):
            yield from groups(v)

    return set(groups(meta["optimizer"]))


def weight_change(store: RunStore, step: int) -> float:
    """The norm of what the update of ``step`` changed in the published weights."""
    after, before = (load_file(store.step_dir("weights", s) / "model.safetensors") for s in (step, step - 1))
    return sum(((after[k] - before[k]).double() ** 2).sum() for k in after).sqrt().item()


def test_with_allow_config_change_a_new_lr_is_what_the_resumed_trainer_uses(reference_stage, tmp_path):
    store = copy_of(reference_stage, tmp_path)
    assert trainer_lr(store, REFERENCE_STEPS) == OLD_LR
    done = resume(store, REFERENCE_STEPS + 1, "--allow-config-change", "trainer.optimizer.lr=5e-4")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "trainer.optimizer.lr 0.0001 -> 0.0005" in done.stderr
    assert trainer_lr(store, REFERENCE_STEPS + 1) == 5e-4
    assert checkpoint_lrs(store, REFERENCE_STEPS + 1) == {5e-4}  # the optimizer's own param groups
    # ... and the resumed step's own update: Adam's steps scale with the lr (5x here; 1x if the
    # loaded optimizer kept the checkpoint's lr, as it did before)
    last = weight_change(store, REFERENCE_STEPS + 1) / weight_change(reference_stage, REFERENCE_STEPS)
    assert last > 3.0, last
    assert yaml.safe_load(store.run_yaml.read_text())["trainer"]["optimizer"]["lr"] == 5e-4
