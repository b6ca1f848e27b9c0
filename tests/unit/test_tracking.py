"""The W&B forwarder's pieces: which records become which points, where a restarted
forwarder continues (W&B's own offline mode, read back from its files), the package check and
the documented keys."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from deepscaler.config import load_config
from deepscaler.store import RunStore
from deepscaler.tracking import KEYS, Forwarder, point

REPO = Path(__file__).resolve().parents[2]


def test_a_trainer_record_lands_on_the_rollout_step_it_trained_on():
    src, step, values = point({"source": "trainer", "step": 5, "pg_loss": 0.5, "kl": math.nan, "lr": 1e-6,
                               "flag": True, "ids": [1, 2]})
    assert (src, step) == ("trainer", 4)
    assert values == {"trainer/pg_loss": 0.5, "trainer/lr": 1e-6, "trainer/step": 4}  # no NaN, bool or list
    assert point({"source": "orchestrator", "step": 3, "reward_mean": 0.25})[1:] == (
        3, {"orchestrator/reward_mean": 0.25, "orchestrator/step": 3})
    assert point({"source": "trainer", "event": "start", "step": 0}) is None
    assert point({"source": "launcher", "step": 1}) is None


def records(steps, reward):
    return [r for s in steps for r in ({"source": "orchestrator", "step": s, "reward_mean": reward},
                                       {"source": "trainer", "step": s + 1, "pg_loss": reward})]


def test_a_restarted_forwarder_continues_the_run_where_wandb_stands(tmp_path):
    pytest.importorskip("wandb")
    from deepscaler.wandb_offline import history

    cfg = load_config(["yaml/stage1.yaml", "yaml/tiny-random.yaml"],
                      [f"run.output_dir={tmp_path}", "wandb.project=p", "wandb.mode=offline"])
    store = RunStore(tmp_path, cfg.run.name, 1)
    store.ensure_dirs()
    for r in records(range(4), 0.1):
        store.append_metrics(r)
    first = Forwarder(cfg, store)
    first.start()
    assert first.forward() == 8
    first.finish()
    # A resumed stage recomputes steps 2-3 (other values) and goes on to 5.
    for r in records(range(2, 6), 0.9):
        store.append_metrics(r)
    again = Forwarder(cfg, store)
    again.start()
    assert again.last == {"orchestrator": 3, "trainer": 3}  # read back from W&B's files
    assert again.forward() == 4
    again.finish()
    run_id = again.run.id
    assert run_id == first.run.id
    deadline = time.monotonic() + 30  # W&B's service may still be writing this process's run
    while len(rows := history(store.wandb_dir / "wandb", run_id)) < 12 and time.monotonic() < deadline:
        time.sleep(0.5)
    for key in ("orchestrator/reward_mean", "trainer/pg_loss"):
        series = [(r["step"], r[key]) for r in rows if key in r]
        assert series == [(0, 0.1), (1, 0.1), (2, 0.1), (3, 0.1), (4, 0.9), (5, 0.9)]  # W&B keeps the first


def test_an_attempt_started_within_the_same_second_is_read_after_the_one_before(tmp_path):
    """W&B names a second attempt begun in the same second ``...-<id>-1`` (CI of 4e889e9 lost steps
    4-5 of the restarted forwarder's run this way)."""
    from deepscaler.wandb_offline import attempts

    for name in ("offline-run-20261130_201144-abc-1", "offline-run-20261130_201144-abc",
                 "offline-run-20261130_201150-abc", "offline-run-20261130_201144-abc-10",
                 "offline-run-20261130_201144-abcd"):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"run-{name.split('-')[3]}.wandb").write_bytes(b"")
    assert [p.parent.name for p in attempts(tmp_path, "abc")] == [
        "offline-run-20261130_201144-abc", "offline-run-20261130_201144-abc-1",
        "offline-run-20261130_201144-abc-10", "offline-run-20261130_201150-abc"]


def test_a_project_without_the_package_is_refused_before_submission(tmp_path, monkeypatch, capsys):
    """Simulated boundary: an environment without the optional wandb package (this one has it)."""
    import importlib.util

    from deepscaler import submit

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    argv = ["--stage", "1", "--preset", "tiny-random", "--executor", "local", "--output-dir", str(tmp_path / "out"),
            "--wandb.project", "deepscaler"]
    assert submit.main(argv) == 2
    err = capsys.readouterr().err
    assert err == ("error: wandb.project is 'deepscaler' but the wandb package is not installed: "
                   "pip install -e \".[wandb]\", or unset wandb.project\n")
    assert not (tmp_path / "out").exists()


def test_every_logged_key_is_explained_in_the_monitoring_page():
    page = (REPO / "docs" / "monitoring.md").read_text()
    for source, keys in KEYS.items():
        for key, meaning in keys.items():
            assert f"| `{source}/{key}` | {meaning} |" in page, f"{source}/{key}"
