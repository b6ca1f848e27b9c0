"""Slurm job names: squeue's default NAME column shows 8 characters, which must tell runs,
stages and evaluations apart (issue 26, item 4)."""

from __future__ import annotations

import re
from pathlib import Path

from deepscaler.config import load_config
from deepscaler.eval.sweep import job_name as eval_job_name
from deepscaler.slurm.stage_job import job_name
from deepscaler.store import RunStore

REPO = Path(__file__).resolve().parents[2]


def stage_name(run: str, stage: int) -> str:
    return job_name(load_config([REPO / f"yaml/stage{stage}.yaml"], [f"run.name={run}"]))


def test_the_first_8_characters_tell_runs_stages_and_evals_apart() -> None:
    servers = job_name(load_config([REPO / "yaml/stage1.yaml"], ["run.name=tiny"]), servers=True)  # two-jobs
    names = [stage_name("tiny", 1), stage_name("base", 1), stage_name("tiny", 2),
             eval_job_name(RunStore("/tmp", "tiny", 1)), servers]
    assert names == ["s1-tiny-deepscaler", "s1-base-deepscaler", "s2-tiny-deepscaler", "e1-tiny-deepscaler",
                     "s1i-tiny-deepscaler"]
    assert len({n[:8] for n in names}) == len(names), names


def test_runs_that_differ_only_after_5_characters_share_the_column_but_not_the_name() -> None:
    """The limit of an 8-character column: the full name (sacct, ``squeue -o %j``) still differs."""
    a, b = stage_name("sweep-lr1", 1), stage_name("sweep-lr2", 1)
    assert a[:8] == b[:8] == "s1-sweep" and a != b


def test_every_valid_run_name_gives_a_plain_job_name() -> None:
    """Letters, digits, '.', '_', '-' (config's run.name rule): nothing sbatch or a shell would
    split or expand."""
    for run in ("a", "A.b_c-9", "x" * 64):
        assert re.fullmatch(r"[A-Za-z0-9._-]+", stage_name(run, 1)), run
