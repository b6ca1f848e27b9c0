"""docs/quickstart.md, run as written: the bash block marked ``<!-- test: local -->``, line by
line in an empty directory, with the venv's python first on the PATH (the guide says to
activate it). Each line must exit 0 and leave the files the guide describes. (The
``<!-- test: slurm -->`` block's commands and flags are checked by tests/unit/test_docs.py;
the same workflow runs on the local cluster in tests/integration/test_slurm_stage.py and
test_eval_sweep.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.slurm_cluster import slurm_env
from tests.unit.test_docs import marked_blocks

REPO = Path(__file__).resolve().parents[2]


def env() -> dict[str, str]:
    """A shell as the guide's reader has it: the venv active, not inside a Slurm job."""
    e = slurm_env()
    e["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), e.get("PATH", "")])
    e.pop("PYTHONPATH", None)  # the package is installed in the venv, as the guide installs it
    return e


def run_lines(lines: list[str], cwd: Path, timeout: int) -> list[subprocess.CompletedProcess]:
    done = []
    for line in lines:
        out = subprocess.run(["bash", "-c", line], cwd=cwd, env=env(), capture_output=True, text=True,
                             timeout=timeout)
        done.append(out)
        assert out.returncode == 0, (f"`{line}` exited {out.returncode}\n--- stdout\n{out.stdout[-3000:]}"
                                     f"\n--- stderr\n{out.stderr[-3000:]}")
    return done


def assert_stable(path: Path) -> None:
    assert (path / "STABLE").is_file(), f"{path} is not a stable step"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_workstation_block(tmp_path):
    lines = marked_blocks("local")
    assert any("--resume-step latest --max-steps 6" in line for line in lines)  # what the checks below assume
    results = run_lines(lines, tmp_path, timeout=420)

    stage = tmp_path / "outputs" / "tiny" / "stage1"
    assert (stage / "run.yaml").is_file() and (stage / "metrics.jsonl").is_file()
    assert_stable(stage / "weights" / "step_6")
    assert not (stage / "weights" / "step_4").exists()  # retention: the tiny preset keeps the newest 2
    for step in (4, 6):  # the checkpoint resumed from, and the last
        assert_stable(stage / "checkpoints" / f"step_{step}")
    for log in ("server0.log", "trainer.log", "orchestrator.log"):
        assert (stage / "logs" / log).is_file(), log
    assert "stage 1 of run 'tiny' finished: 4 steps" in results[0].stdout
    assert "tiny" in results[1].stdout and "4/4" in results[1].stdout  # the status table
    assert "stage 1 of run 'tiny' finished: 6 steps" in results[2].stdout
    for bench in ("math500", "aime2024"):
        summary = json.loads((stage / "evals" / "step_6" / f"{bench}.json").read_text())["summary"]
        assert summary["step"] == 6 and summary["weight_step"] == 6, summary
    assert (stage / "evals" / "report.md").is_file() and (stage / "evals" / "eval.png").is_file()
    assert "step 6" in results[4].stdout  # the report's table
