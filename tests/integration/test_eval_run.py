"""One evaluation end to end on the tiny preset: a real hf inference server as a child process,
real sampling and the project's reward. Same seed twice, same numbers and samples; a model
folder of no run is evaluated as the base of a run of its own. About 20 s per evaluation."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from deepscaler.store import RunStore, read_json
from tests.helpers.inference import make_run

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^Evaluated (\w+) in \d+\.\d\ds \(Avg@(\d+)=\d\.\d{4}, Pass@(\d+): \d\.\d{4}, Completion Length: "
                  r"\d+\.\d\d \(±\d+\.\d\d, ∈\[\d+\.\d\d, \d+\.\d\d\]\), Truncated: \d+\.\d%\)$")
TIMING = {"wall_time_s", "server_start_s", "created_unix"}


def eval_cli(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "deepscaler.eval", *argv], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


def live_processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmd:
            found.append(cmd)
    return found


def test_same_seed_same_numbers(tmp_path: Path) -> None:
    _, store = make_run(tmp_path)
    args = ["run", "--model", "1", "--output-dir", str(tmp_path), "--seed", "7", "--benchmarks", "aime2024,math500",
            "eval.benchmarks.math500.max_problems=6"]
    first = eval_cli(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    results = {b: read_json(store.eval_path(1, b)) for b in ("aime2024", "math500")}
    second = eval_cli(*args)
    assert second.returncode == 0, second.stdout + second.stderr
    again = {b: read_json(store.eval_path(1, b)) for b in ("aime2024", "math500")}

    lines = [line for line in first.stdout.splitlines() if line.startswith("Evaluated ")]
    assert [LINE.match(line).group(1, 2, 3) for line in lines] == [("aime2024", "4", "2"), ("math500", "1", "1")]
    for bench in ("aime2024", "math500"):
        a, b = results[bench], again[bench]
        assert a["samples"] == b["samples"]  # token for token
        assert {k: v for k, v in a["summary"].items() if k not in TIMING | {"line"}} == \
               {k: v for k, v in b["summary"].items() if k not in TIMING | {"line"}}
    aime = results["aime2024"]
    assert aime["summary"]["problems"] == 8 and len(aime["samples"]) == 32  # the tiny preset's 8 problems x 4
    assert aime["summary"]["weight_step"] == 1 and aime["summary"]["seed"] == 7
    # what sampled: the tiny preset's hf backend, so no vLLM, and this environment's torch/transformers
    from importlib.metadata import version
    assert aime["summary"]["backend"] == "hf" and aime["summary"]["versions"] == {
        "vllm": None, "torch": f"torch {version('torch')}", "transformers": f"transformers {version('transformers')}"}
    assert {"problem_id", "sample", "response", "tokens", "score", "truncated"} <= aime["samples"][0].keys()
    assert results["math500"]["summary"]["problems"] == 6
    # the server was a child: stopped, its address file gone, and the weights lease released
    assert not live_processes_mentioning(str(store.logs_dir / "eval-step_1-"))
    assert store.read_server_addresses() == {}
    assert not store.fresh_leases("weights", 1)


def test_a_model_folder_is_evaluated_as_a_base(tmp_path: Path) -> None:
    cfg, store = make_run(tmp_path / "trained")
    folder = store.step_dir("weights", 2)  # any Hugging Face folder will do
    out = tmp_path / "evals"
    done = eval_cli("run", "--model", str(folder), "--output-dir", str(out), "--preset", "tiny-random",
                    "--benchmarks", "math500", "eval.benchmarks.math500.max_problems=3")
    assert done.returncode == 0, done.stdout + done.stderr
    own = RunStore(out, "step_2", 1)  # a run named after the folder
    result = read_json(own.eval_path("base", "math500"))
    assert result["summary"]["model"] == str(folder) and result["summary"]["weight_step"] == -1
    report = eval_cli("report", "--output-dir", str(out))
    assert report.returncode == 0, report.stderr
    assert "| step_2 (base) | 0.0 |" in report.stdout and (own.evals_dir / "eval.png").is_file()


def test_retention_keeps_steps_a_sweep_has_claimed(tmp_path: Path) -> None:
    """The trainer's retention (keep_last 1 here) spares weights steps with an eval PENDING
    marker, as a sweep writes them before it submits, and deletes the others."""
    store = RunStore(tmp_path, "tiny", 1)
    store.mark_eval_pending(1, ["math500"])
    done = subprocess.run([sys.executable, "-m", "deepscaler.submit", "--stage", "1", "--preset", "tiny-random",
                           "--executor", "local", "--output-dir", str(tmp_path), "--max-steps", "3",
                           "checkpoint.keep_last=1"], capture_output=True, text=True, cwd=REPO, timeout=400,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert store.stable_steps("weights") == [1, 3]
    store.clear_eval_pending(1)
    assert store.pending_evals() == []
