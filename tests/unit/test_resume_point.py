"""Which step a restart or an eval starts from, on real stage folders (no process runs): off by
one here is a silent divergence (a skipped or repeated batch, another step's score), so each
answer is pinned exactly. The end-to-end bit-identical resume is tests/integration/test_trainer.py
and tests/faults/test_kill_and_resume.py. Planted by tests/mutants.py."""

from __future__ import annotations

import json
from pathlib import Path

from deepscaler.config import load_config, to_yaml
from deepscaler.launch import restart_point
from deepscaler.orchestrator import resume_point
from deepscaler.stage import TRAINER_STATE
from deepscaler.store import RunStore

REPO = Path(__file__).resolve().parents[2]


def make_stage(root: Path):
    cfg = load_config([REPO / "yaml/stage1.yaml", REPO / "yaml/tiny-random.yaml"],
                      [f"run.output_dir={root}", "run.name=tiny"])
    store = RunStore(root, "tiny", 1)
    store.ensure_dirs()
    store.run_yaml.write_text(to_yaml(cfg))
    return cfg, store


def publish(store: RunStore, kind: str, step: int, data: dict | None = None) -> None:
    with store.write_step(kind, step) as tmp:
        (tmp / "a.bin").write_bytes(b"x" * 8)
        if kind == "checkpoints":
            state = {"step": step, "progress": {"stage_first_step": 0, "data": data}}
            (tmp / TRAINER_STATE).write_text(json.dumps(state))


def test_the_orchestrator_samples_again_from_the_checkpoints_own_step(tmp_path):
    """No rollouts kept: the orchestrator starts at checkpoint C's step itself (the trainer's
    next batch), with the data progress saved in C."""
    cfg, store = make_stage(tmp_path)
    saved = {"seed": 7, "epoch": 1, "cursor": 3}
    publish(store, "checkpoints", 1, {"seed": 7, "epoch": 0, "cursor": 9})
    publish(store, "checkpoints", 2, saved)
    assert resume_point(cfg, store, "latest", 0) == (2, saved)
    assert resume_point(cfg, store, "2", 0) == (2, saved)


def test_the_restart_point_drops_exactly_what_follows_the_checkpoint(tmp_path):
    """Restart from checkpoint 2: checkpoints and weights after 2 go, rollouts from 2 on go
    (the orchestrator samples them again); step 2's weights and earlier rollouts stay."""
    _, store = make_stage(tmp_path)
    for step in (2, 4):
        publish(store, "checkpoints", step, {"seed": 0, "epoch": 0, "cursor": step})
    for step in (1, 2, 3, 4, 5):
        publish(store, "weights", step)
        publish(store, "rollouts", step)
    assert restart_point(store, "2") == "2"
    assert store.stable_steps("checkpoints") == [2]
    assert store.stable_steps("weights") == [1, 2]
    assert store.stable_steps("rollouts") == [1]


def test_latest_is_the_newest_intact_checkpoint(tmp_path):
    _, store = make_stage(tmp_path)
    for step in (2, 4, 6):
        publish(store, "checkpoints", step, {"seed": 0, "epoch": 0, "cursor": step})
    assert restart_point(store, "latest") == "6"


def test_an_eval_of_step_n_scores_step_n_not_the_newest(tmp_path):
    from deepscaler.eval.run import eval_config

    _, store = make_stage(tmp_path)
    for step in (0, 1, 2):
        publish(store, "weights", step)
    for step in (0, 1, 2):
        assert eval_config(str(step), tmp_path, None, 1)[2] == step
