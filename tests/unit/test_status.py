"""``python -m deepscaler.status`` without a cluster: progress from metrics.jsonl and run.yaml."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from deepscaler.config import load_config, to_yaml
from deepscaler.status import find_stages, stage_summary
from deepscaler.store import RunStore

REPO = Path(__file__).resolve().parents[2]


def make_stage(root: Path, name: str, stage: int, steps: int) -> RunStore:
    store = RunStore(root, name, stage)
    store.ensure_dirs()
    cfg = load_config([REPO / "yaml/stage1.yaml"], [f"run.name={name}", "run.max_steps=10"])
    store.run_yaml.write_text(to_yaml(cfg))
    for step in range(steps):
        store.append_metrics({"source": "orchestrator", "step": step, "reward_mean": 0.1 * step,
                              "response_length_mean": 100.0 + step, "truncation_rate": 0.05, "time_step_s": 60.0})
        store.append_metrics({"source": "trainer", "step": step + 1, "pg_loss": 0.0, "time_step_s": 30.0,
                              "mismatch_kl": 1e-3 * (step + 1)})
    return store


def test_summary_of_a_stage(tmp_path: Path) -> None:
    store = make_stage(tmp_path, "exp", 1, steps=4)
    s = stage_summary(store)
    assert s["steps"] == 4 and s["max_steps"] == 10
    assert abs(s["reward"] - 0.15) < 1e-9  # mean of 0, .1, .2, .3
    assert s["length"] == 103.0 and s["truncation"] == 0.05 and s["mismatch_kl"] == 4e-3  # the newest step's
    assert s["eta_s"] == 6 * 60.0  # 6 steps left at the slower side's 60 s


def test_status_lists_every_run_and_stage_without_a_terminal(tmp_path: Path) -> None:
    make_stage(tmp_path, "exp", 1, steps=4)
    make_stage(tmp_path, "exp", 2, steps=1)
    make_stage(tmp_path, "other", 1, steps=2)
    assert [(s.run, s.stage) for s in find_stages(tmp_path, None)] == [("exp", 1), ("exp", 2), ("other", 1)]
    out = subprocess.run([sys.executable, "-m", "deepscaler.status", "--output-dir", str(tmp_path), "--run", "exp"],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert "4/10" in out.stdout and "1/10" in out.stdout and "other" not in out.stdout
    assert "mismatch KL" in out.stdout and "4.00e-03" in out.stdout


def test_no_run_is_a_one_line_error(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "deepscaler.status", "--output-dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and out.stderr.startswith("error: no run in") and out.stderr.count("\n") == 1
