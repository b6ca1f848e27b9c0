"""``python -m deepscaler.eval sweep --emit-sbatch FILE``: the plain array script a user reads,
edits and submits with ``sbatch``. Here it is parsed with ``bash -n`` and run by bash with a
stand-in for python that records its arguments (nothing is evaluated); the real submission is
tests/integration/test_eval_sweep.py::test_emitted_script_runs_with_plain_sbatch."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from deepscaler.config import load_config
from deepscaler.eval.sweep import executor, task_argv
from tests.unit.test_eval_cli import fake_eval, make_run, run_main

SITE = ("slurm.partition=gpu", "slurm.account=my proj", "slurm.time=01:30:00", "eval.resources.gpus_per_node=2",
        "eval.resources.cpus_per_gpu=4", "eval.resources.mem=64G", "slurm.extra_sbatch=[--exclusive]",
        "slurm.setup=[export FROM_SETUP=1]")


def sbatch_lines(script: Path) -> list[str]:
    return [line for line in script.read_text().splitlines() if line.startswith("#SBATCH ")]


def fake_python(tmp_path: Path) -> Path:
    """An executable that writes its argv (after the interpreter's) as JSON to $ARGV_OUT."""
    exe = tmp_path / "fake bin" / "python"
    exe.parent.mkdir()
    exe.write_text('#!/bin/bash\nprintf "%s\\0" "$@" "FROM_SETUP=$FROM_SETUP" > "$ARGV_OUT"\n')
    exe.chmod(0o755)
    return exe


def run_task(script: Path, task: int, out: Path) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    done = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": str(task), "ARGV_OUT": str(out)},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return out.read_text().split("\0")[:-1]


def test_each_task_runs_its_step_with_the_arguments_of_a_sweep_task(tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "my runs"  # a space: every path in the script must be quoted
    store = make_run(out, "tiny", (0, 1, 2, 3), *SITE)
    for bench in ("math500", "aime2024"):
        fake_eval(store, 1, bench)  # evaluated: the script skips it, as the sweep does
    script = out / "eval array.sh"
    monkeypatch.setattr(sys, "executable", str(fake_python(tmp_path)))
    code, text, _ = run_main(capsys, "sweep", "--output-dir", str(out), "--include-base", "--max-parallel", "2",
                             "--seed", "3", "--emit-sbatch", str(script), "eval.temperature=0.7")
    assert code == 0, text
    assert "4 task(s): base, step_0, step_2, step_3; already evaluated: step_1" in text  # the sweep's plan line
    assert text.splitlines()[-1] == f"sbatch {shlex.quote(str(script.resolve()))}"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "#SBATCH --array=0-3%2" in sbatch_lines(script)

    args = argparse.Namespace(preset=None, seed=3, force=False, overrides=["eval.temperature=0.7"])
    for task, what in enumerate(["base", 0, 2, 3]):
        argv = run_task(script, task, tmp_path / "argv")
        assert argv == ["-u", "-m", "deepscaler.eval", *task_argv(store, what, ["math500", "aime2024"], args),
                        "FROM_SETUP=1"], (task, argv)
        assert "--skip-existing" in argv


def test_the_header_holds_the_runs_eval_resources_and_site_settings(tmp_path: Path, capsys) -> None:
    out = tmp_path / "my runs"
    store = make_run(out, "tiny", (1, 2), *SITE)
    script = tmp_path / "eval.sh"
    assert run_main(capsys, "sweep", "--output-dir", str(out), "--emit-sbatch", str(script))[0] == 0
    lines = sbatch_lines(script)
    logs = shlex.quote(str((store.logs_dir / "slurm-eval").resolve()))
    for line in ("--job-name=e1-tiny-deepscaler", "--array=0-1%2", "--partition=gpu", "--account='my proj'",
                 "--time=01:30:00", "--nodes=1", "--gpus-per-node=2", "--cpus-per-task=8", "--mem=64G",
                 "--exclusive", f"--output={logs[:-1]}/%j_0_log.out'", f"--error={logs[:-1]}/%j_0_log.err'"):
        assert f"#SBATCH {line}" in lines, (line, lines)
    assert "export FROM_SETUP=1" in script.read_text().splitlines()
    assert (store.logs_dir / "slurm-eval").is_dir()  # Slurm opens the logs there: it must exist
    # the same resources as the array the sweep submits through submitit
    o = executor(load_config(store.run_yaml), store, None).parameters
    assert (o["partition"], o["account"], o["gpus_per_node"], o["cpus_per_task"], o["mem"]) == (
        "gpu", "my proj", 2, 8, "64G")


def test_the_script_claims_its_steps_as_a_submit_does(tmp_path: Path, capsys) -> None:
    store = make_run(tmp_path, "tiny", (1, 2))
    script = tmp_path / "eval.sh"
    text = run_main(capsys, "sweep", "--output-dir", str(tmp_path), "--include-base", "--emit-sbatch", str(script))[1]
    assert store.pending_evals() == [1, 2] and "steps 1, 2 are claimed" in text  # base is no weights step
    marker = json.loads((store.eval_dir(1) / "PENDING").read_text())
    assert marker["benchmarks"] == ["aime2024", "math500"]
    # everything evaluated: no script, no claim
    for what in ("base", 1, 2):
        for bench in ("math500", "aime2024"):
            fake_eval(store, what, bench)
        if what != "base":
            store.clear_eval_pending(what)
    script.unlink()
    text = run_main(capsys, "sweep", "--output-dir", str(tmp_path), "--include-base", "--emit-sbatch", str(script))[1]
    assert "nothing to evaluate" in text and not script.exists() and store.pending_evals() == []


def test_an_unwritable_file_is_one_line_and_drops_only_its_own_claims(tmp_path: Path, capsys) -> None:
    store = make_run(tmp_path, "tiny", (1, 2))
    store.mark_eval_pending(1, ["math500", "aime2024"])  # an earlier sweep's claim: kept
    (tmp_path / "a file").write_text("")
    code, _, err = run_main(capsys, "sweep", "--output-dir", str(tmp_path), "--emit-sbatch",
                            str(tmp_path / "a file" / "x.sh"))
    line = err.strip()
    assert code == 2 and line.startswith("error: --emit-sbatch ") and "x.sh: cannot write it" in line
    assert "\n" not in line
    assert store.pending_evals() == [1]
    # a folder that does not exist yet is made
    new = tmp_path / "new" / "x.sh"
    assert run_main(capsys, "sweep", "--output-dir", str(tmp_path), "--emit-sbatch", str(new))[0] == 0
    assert new.is_file() and store.pending_evals() == [1, 2]


@pytest.mark.parametrize("other", ["--wait", "--dry-run"])
def test_emit_sbatch_refuses_wait_and_dry_run(tmp_path: Path, capsys, other: str) -> None:
    store = make_run(tmp_path, "tiny", (1,))
    with pytest.raises(SystemExit) as e:
        run_main(capsys, "sweep", "--output-dir", str(tmp_path), other, "--emit-sbatch", str(tmp_path / "x.sh"))
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "x.sh").exists() and store.pending_evals() == []
    # each alone is accepted (--emit-sbatch alone: the tests above)
    assert run_main(capsys, "sweep", "--output-dir", str(tmp_path), "--dry-run")[0] == 0
