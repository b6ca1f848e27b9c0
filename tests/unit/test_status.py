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


def stage_with_bad_values(root: Path) -> RunStore:
    """A stage whose metrics.jsonl holds what a user's tool or a crash can write: nulls and
    strings in numeric fields, steps that are not numbers, non-finite times."""
    store = make_stage(root, "odd", 1, steps=3)
    bad = [
        {"source": "orchestrator", "step": 3, "reward_mean": None, "response_length_mean": "long",
         "truncation_rate": None, "time_step_s": "slow", "solve_all": [1], "response_length_max": 2.5},
        {"source": "trainer", "step": 4, "pg_loss": None, "kl": "x", "entropy": {}, "time_step_s": None,
         "mismatch_kl": "1e-3"},
        {"source": "orchestrator", "step": None, "reward_mean": 1.0},
        {"source": "orchestrator", "step": "5", "reward_mean": 1.0},
        {"source": "orchestrator", "step": True, "reward_mean": 1.0},
        {"source": None, "step": 6, "reward_mean": 1.0},
        {"source": "trainer", "step": 2, "time_step_s": float("inf"), "pg_loss": float("nan")},
    ]
    for record in bad:
        store.append_metrics(record)
    return store


def test_values_that_are_not_numbers_are_skipped_in_the_summary(tmp_path: Path) -> None:
    s = stage_summary(stage_with_bad_values(tmp_path))
    assert s["steps"] == 4  # steps 0-2, and step 3 whose figures are unreadable
    assert abs(s["reward"] - 0.1) < 1e-9  # mean of the readable rewards 0, .1, .2
    assert s["length"] is None and s["truncation"] is None and s["mismatch_kl"] is None  # step 3's: unreadable
    assert s["eta_s"] == 6 * 60.0  # only finite numeric step times count


def test_step_rows_keep_only_numbers(tmp_path: Path) -> None:
    from deepscaler.progress import cell, line, step_rows

    store = stage_with_bad_values(tmp_path)
    rows = step_rows(store.read_metrics().records)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    last = rows[-1]
    for key in ("reward_mean", "response_length_mean", "truncation_rate", "solve_all", "pg_loss", "kl", "entropy",
                "mismatch_kl"):
        assert key not in last, key
        assert cell(last, key, "{:.3f}") == "-"
    assert last["time_step_s"] is None and cell(last, "response_length_max", "{:d}") == "2.5"
    assert "reward -" in line(last) and "loss -" in line(last)
    assert "loss +nan" in line(rows[1])  # a diverged loss is shown, not hidden


def test_status_and_the_stage_summary_show_a_dash_for_a_null(tmp_path: Path) -> None:
    from deepscaler.submit import summary

    store = stage_with_bad_values(tmp_path)
    text = summary(store)
    assert "finished: 4 steps" in text and "reward per step: 0.00 0.10 0.20 -" in text, text
    out = subprocess.run([sys.executable, "-m", "deepscaler.status", "--output-dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.split()[:1] == ["1"])  # stage 1 of run odd
    assert "4/10" in row and "0.100" in row and row.count("-") >= 3, out.stdout


def test_the_live_display_prints_a_row_whose_values_are_null(tmp_path: Path) -> None:
    import io

    from deepscaler.progress import Display

    store = stage_with_bad_values(tmp_path)
    out = io.StringIO()
    with Display(load_config(store.run_yaml), stream=out) as display:
        display.update(store.read_metrics().records)
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and lines[-1].startswith("step 3  reward -"), lines  # the title, then steps 0-3


def test_the_wandb_forwarder_takes_only_numbers_at_a_numbered_step(tmp_path: Path) -> None:
    from deepscaler.tracking import point

    points = [point(r) for r in stage_with_bad_values(tmp_path).read_metrics().records]
    kept = [p for p in points if p is not None]
    assert len(kept) == 3 * 2 + 3  # the good records, steps 3 and 4 (numbers only), and step 2's repeat
    assert all(type(step) is int for _, step, _ in kept)
    step3 = next(values for source, step, values in kept if source == "orchestrator" and step == 3)
    assert step3 == {"orchestrator/response_length_max": 2.5, "orchestrator/step": 3}


def rendered(stores: list[RunStore], width: int = 80) -> str:
    import io

    from rich.console import Console

    from deepscaler.status import render

    out = io.StringIO()
    Console(file=out, width=width, force_terminal=False).print(render(stores))
    return out.getvalue()


def test_the_table_fits_80_columns_with_every_header_and_cell_whole(tmp_path: Path, monkeypatch) -> None:
    """At 80 columns (or piped) no header or cell is cut to '…': long runs, a pending hetjob
    with a long reason (folded onto a second line) and wide figures all fit."""
    import deepscaler.status as status

    long_run = "a-very-long-run-name-" + "x" * 40
    stores = [make_stage(tmp_path, long_run, 1, steps=4), make_stage(tmp_path, "exp", 3, steps=2)]
    for st in stores:
        st.run_yaml.write_text(st.run_yaml.read_text().replace("max_steps: 10", "max_steps: 100000"))
    reason = "ReqNodeNotAvail, UnavailableNodes:node[1-4],node[10-12] and a few more words"
    jobs = {"12345678": {"State": "CANCELLED by 10001", "Elapsed": "1-02:03:04", "NodeList": "node[1-3],node7"},
            "12345679": {"State": "PENDING", "Elapsed": "00:00:00", "NodeList": "None assigned,None assigned",
                         "Reason": reason}}
    monkeypatch.setattr(status, "slurm_jobs", lambda ids: jobs)
    text = rendered(find_stages(tmp_path, None))
    lines = text.splitlines()
    assert "…" not in text and max(map(len, lines)) <= 80, text
    for header in (*status.PROGRESS_COLUMNS, *status.JOB_COLUMNS):
        assert any(header in line for line in lines), (header, text)
    assert "None assigned" not in text and "node[1-3],node7" in text and "CANCELLED by 10001" in text
    assert "(ReqNodeNotAvail," in text and "more words)" in text  # the reason, whole, on two lines
    assert "4/100000" in text and "4.00e-03" in text and "1666h" in text and long_run in text.replace("\n", "")


def test_nodes_show_where_a_job_runs_or_why_it_waits() -> None:
    from deepscaler.status import nodes_or_reason

    assert nodes_or_reason({"NodeList": "None assigned,None assigned", "Reason": "Priority"}) == "(Priority)"
    assert nodes_or_reason({"NodeList": "None assigned"}) == "-"
    assert nodes_or_reason({"NodeList": "node[1,3],node4"}) == "node[1,3],node4"  # a hetjob's two components
    assert nodes_or_reason({"NodeList": "node1,None assigned", "Reason": "Resources"}) == "node1"


def test_status_is_whole_at_80_columns_and_when_piped(tmp_path: Path) -> None:
    make_stage(tmp_path, "exp", 1, steps=4)
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    for extra in ({"COLUMNS": "80"}, {}):  # a narrow terminal; a pipe (rich's default width)
        out = subprocess.run([sys.executable, "-m", "deepscaler.status", "--output-dir", str(tmp_path)],
                             capture_output=True, text=True, cwd=REPO, env={**env, **extra})
        assert out.returncode == 0, out.stderr
        assert "…" not in out.stdout and max(map(len, out.stdout.splitlines())) <= 80, out.stdout
        assert "mismatch KL" in out.stdout and "reward" in out.stdout and "4/10" in out.stdout
