"""The orchestrator's pure pieces: the seeded data order, step statistics, progress rows."""

from __future__ import annotations

import json
from dataclasses import replace

import torch

from deepscaler.config import stage_config
from deepscaler.inference.client import Sample
from deepscaler.orchestrator import (next_batch, permutation, resume_point, small_data_note, stage_steps,
                                     step_stats)
from deepscaler.rollouts import META_FILE, write_rollout
from deepscaler.store import RunStore
from tests.unit.test_rollouts import make_rollout
from deepscaler.progress import line, step_rows


def test_permutation_is_seeded_and_changes_every_epoch() -> None:
    assert permutation(50, seed=1, epoch=0) == permutation(50, seed=1, epoch=0)
    assert sorted(permutation(50, seed=1, epoch=0)) == list(range(50))
    assert permutation(50, seed=1, epoch=0) != permutation(50, seed=1, epoch=1)
    assert permutation(50, seed=1, epoch=0) != permutation(50, seed=2, epoch=0)


def test_batches_cover_an_epoch_without_repeats_and_cross_into_the_next() -> None:
    progress = {"seed": 3, "epoch": 0, "cursor": 0}
    seen = []
    for _ in range(3):  # 3 x 4 = 12 of 10 problems: the third batch crosses the epoch boundary
        batch, progress = next_batch(10, 4, progress)
        assert len(batch) == 4
        seen += batch
    assert sorted(seen[:10]) == list(range(10))
    assert seen[10:] == permutation(10, 3, 1)[:2]
    assert progress == {"seed": 3, "epoch": 1, "cursor": 2}


def test_resuming_from_saved_progress_continues_the_same_order(tmp_path) -> None:
    """A restart resumes from the progress saved in a rollout: same problems as no restart.
    The progress goes the real way: into a published rollout's JSON (write_rollout), and back
    through the orchestrator's own resume_point, as after a restart."""
    straight, p = [], {"seed": 0, "epoch": 0, "cursor": 0}
    for _ in range(5):
        batch, p = next_batch(7, 3, p)
        straight.append(batch)
    store = RunStore(tmp_path, "exp", 1)
    store.ensure_dirs()
    resumed, p = [], {"seed": 0, "epoch": 0, "cursor": 0}
    for step in range(2):  # the first attempt: two steps published, then it dies
        batch, p = next_batch(7, 3, p)
        resumed.append(batch)
        write_rollout(store, step, replace(make_rollout(step), extra={"progress": p, "final": False}))
    first, p = resume_point(stage_config(1, "tiny-random"), store, None, 0)  # the restart
    assert first == 2 and json.loads((store.step_dir("rollouts", 1) / META_FILE).read_text())["extra"]["progress"] == p
    for _ in range(3):
        batch, p = next_batch(7, 3, p)
        resumed.append(batch)
    assert resumed == straight


def test_data_smaller_than_a_step_spreads_its_problems_evenly_and_is_noted() -> None:
    """10 problems, 128 prompts per step: each problem 12 or 13 times per step, said once, in one line."""
    batch, _ = next_batch(10, 128, {"seed": 0, "epoch": 0, "cursor": 0})
    assert len(batch) == 128 and sorted({batch.count(i) for i in range(10)}) == [12, 13]
    note = small_data_note(10, 128)
    assert note is not None and "\n" not in note
    assert "10 problems" in note and "orchestrator.prompts_per_step=128" in note and "13 times" in note
    assert small_data_note(1, 2) is not None and "2 times" in small_data_note(1, 2)
    assert small_data_note(128, 128) is None and small_data_note(100, 16) is None  # the tiny preset's


def test_a_stage_without_max_steps_runs_one_epoch_and_at_least_one_step() -> None:
    assert stage_steps(None, problems=1000, per_step=128) == 7
    assert stage_steps(None, problems=10, per_step=128) == 1  # was 0: the stage did nothing
    assert stage_steps(20, problems=10, per_step=128) == 20


def sample(n_tokens: int, truncated: bool = False) -> Sample:
    return Sample(list(range(n_tokens)), [0.0] * n_tokens, "length" if truncated else "stop", truncated)


def test_step_stats_by_hand() -> None:
    # 3 groups of 2: all solved, none solved, mixed.
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    samples = [sample(4), sample(6), sample(10, True), sample(2), sample(8), sample(6)]
    stats = step_stats(rewards, 2, samples)
    assert stats["reward_mean"] == 0.5
    assert abs(stats["solve_all"] - 1 / 3) < 1e-6 and abs(stats["solve_none"] - 1 / 3) < 1e-6
    assert stats["response_length_mean"] == 6.0 and stats["response_length_max"] == 10
    assert abs(stats["truncation_rate"] - 1 / 6) < 1e-9


def test_progress_rows_join_rollouts_with_the_update_they_fed() -> None:
    records = [
        {"source": "trainer", "event": "start", "step": 0},
        {"source": "orchestrator", "step": 0, "reward_mean": 0.25, "time_step_s": 2.0},
        {"source": "trainer", "step": 1, "pg_loss": 0.1, "kl": 0.0, "entropy": 1.0, "time_step_s": 3.0},
        {"source": "orchestrator", "step": 1, "reward_mean": 0.5, "time_step_s": 1.0},
        {"source": "orchestrator", "step": 1, "reward_mean": 0.75, "time_step_s": 1.0},  # after a restart
    ]
    rows = step_rows(records)
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[0]["reward_mean"] == 0.25 and rows[0]["pg_loss"] == 0.1 and rows[0]["time_step_s"] == 3.0
    assert rows[1]["reward_mean"] == 0.75 and "pg_loss" not in rows[1]
    assert "reward 0.250" in line(rows[0]) and "loss -" in line(rows[1])
