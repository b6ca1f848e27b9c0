"""``python -m deepscaler.eval`` without a server: what is evaluated where, the sweep's plan and
its sbatch lines, the one-line errors, the eval files' layout and the retention markers.

Weights steps here are STABLE-marked folders with placeholder files: nothing loads them."""

from __future__ import annotations

import argparse
import json
import os
import shlex
from dataclasses import replace
from pathlib import Path

import pytest

from deepscaler.config import load_config, to_yaml
from deepscaler.eval import sweep as sweep_mod
from deepscaler.eval.cli import main
from deepscaler.eval.run import eval_config
from deepscaler.eval.sweep import EvalTask, array_script, executor, task_argv, task_request
from deepscaler.store import RunStore, StepNotFound

REPO = Path(__file__).resolve().parents[2]


def make_run(root: Path, run: str = "tiny", steps=(0, 1, 2), *overrides: str) -> RunStore:
    cfg = load_config([REPO / "yaml/stage1.yaml", REPO / "yaml/tiny-random.yaml"],
                      [f"run.output_dir={root}", f"run.name={run}", *overrides])
    store = RunStore(root, run, 1)
    store.ensure_dirs()
    store.run_yaml.write_text(to_yaml(cfg))
    for step in steps:
        with store.write_step("weights", step) as tmp:
            (tmp / "config.json").write_text("{}")
            (tmp / "model.safetensors").write_bytes(b"\0" * 16)
            (tmp / "probe.json").write_text("{}")
    return store


def fake_eval(store: RunStore, what, bench: str, n: int = 1) -> None:
    """A result file as a finished eval writes it, without the eval's minute of sampling (kept
    for speed). Real counterpart: tests/integration/test_eval_run.py::test_same_seed_same_numbers."""
    summary = {"benchmark": bench, "step": what, "model": "tiny", "samples_per_problem": n, "pass_k": 1,
               "avg_at_n": 0.25, "pass_at_k": 0.5, "length_mean": 40.0, "length_std": 3.0, "length_min": 30.0,
               "length_max": 64.0, "truncated_rate": 0.5, "wall_time_s": 2.0, "temperature": 0.6, "top_p": 0.95,
               "max_response_tokens": 64, "seed": 0, "backend": "hf", "line": f"Evaluated {bench} ..."}
    store.write_eval(what, bench, {"summary": summary, "samples": []})


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# --------------------------------------------------------------------------- one-line errors


def test_a_step_without_stable_weights(tmp_path: Path, capsys) -> None:
    store = make_run(tmp_path, steps=(1, 2))
    (store.weights_dir / "step_5").mkdir()  # unfinished: no STABLE marker
    code, _, err = run_main(capsys, "run", "--model", "5", "--output-dir", str(tmp_path))
    assert code == 2 and "step_5 exists but has no STABLE marker" in one_error_line(err)
    assert "stable weights steps: [1, 2]" in err
    code, _, err = run_main(capsys, "run", "--model", "7", "--output-dir", str(tmp_path))
    assert code == 2 and "step_7 does not exist; stable weights steps: [1, 2]" in one_error_line(err)


def test_an_unknown_benchmark_lists_the_known_ones(tmp_path: Path, capsys) -> None:
    make_run(tmp_path)
    code, _, err = run_main(capsys, "run", "--model", "1", "--output-dir", str(tmp_path), "--benchmarks", "aime24")
    line = one_error_line(err)
    assert code == 2 and "unknown benchmark 'aime24'; known: aime2024, amc, math500, minerva, olympiad_bench" in line


def test_an_output_dir_with_no_run(tmp_path: Path, capsys) -> None:
    for argv in (["run", "--model", "3"], ["sweep"], ["report"]):
        code, _, err = run_main(capsys, *argv, "--output-dir", str(tmp_path))
        assert code == 2 and f"{tmp_path}: no run (no <run>/stage1/run.yaml under it)" in one_error_line(err)
    make_run(tmp_path)
    code, _, err = run_main(capsys, "report", "--output-dir", str(tmp_path), "--run", "other")
    assert code == 2 and "no run here (no run.yaml); runs with a stage 1 in" in one_error_line(err)
    assert err.strip().endswith(": tiny")


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("model", ["999", "/no/such/path", "./models/nope", "a/b/c"])
def test_a_model_that_does_not_exist_is_one_line_listing_what_does_and_creates_nothing(tmp_path: Path, capsys,
                                                                                      model: str) -> None:
    make_run(tmp_path, steps=(1, 2))
    before = tree(tmp_path)
    code, _, err = run_main(capsys, "run", "--model", model, "--output-dir", str(tmp_path))
    line = one_error_line(err)
    assert code == 2 and "stable weights steps" in line and "[1, 2]" in line, line
    if model != "999":
        assert f"--model {model}: no such model folder" in line and "run 'tiny' stage 1" in line
    assert tree(tmp_path) == before  # no run folder of its own, no evals/, no logs


def test_a_path_that_does_not_exist_with_no_run_there_says_so(tmp_path: Path, capsys) -> None:
    code, _, err = run_main(capsys, "run", "--model", "/no/such/path", "--output-dir", str(tmp_path))
    assert code == 2 and "no such model folder" in one_error_line(err) and f"no run in {tmp_path}" in err
    assert tree(tmp_path) == []


def test_a_hub_model_missing_from_the_cache_creates_nothing(tmp_path: Path, capsys) -> None:
    code, _, err = run_main(capsys, "run", "--model", "no-such-org/no-such-model", "--output-dir", str(tmp_path),
                            "run.hub_offline=true")
    assert code == 2 and "the Hub cache has no model no-such-org/no-such-model" in one_error_line(err)
    assert tree(tmp_path) == []


def test_a_damaged_step_is_one_line_and_latest_passes_over_it(tmp_path: Path, capsys) -> None:
    """A step whose file lost bytes (or changed one) since it was published: named, it is a
    one-line error naming the file; ``latest`` evaluates the newest step that verifies."""
    store = make_run(tmp_path, steps=(1, 2, 3))
    os.truncate(store.step_path("weights", 3) / "model.safetensors", 4)
    (store.step_path("weights", 2) / "config.json").write_text("[]")  # same size, other bytes
    code, _, err = run_main(capsys, "run", "--model", "3", "--output-dir", str(tmp_path))
    assert code == 2 and "step_3: model.safetensors has 4 bytes, manifest says 16" in one_error_line(err)
    code, _, err = run_main(capsys, "run", "--model", "2", "--output-dir", str(tmp_path))
    assert code == 2 and "step_2: config.json does not match the checksum" in one_error_line(err)
    assert not store.evals_dir.joinpath("step_3").exists()
    _, _, what = eval_config("latest", tmp_path, None, 1)
    err = capsys.readouterr().err
    assert what == 1 and "passing over a damaged weights step" in err and "step_3" in err and "step_2" in err


def test_several_runs_need_a_name(tmp_path: Path, capsys) -> None:
    make_run(tmp_path, "a")
    make_run(tmp_path, "b")
    code, _, err = run_main(capsys, "sweep", "--output-dir", str(tmp_path), "--dry-run")
    assert code == 2 and "holds several runs with a stage 1 (a, b): pass --run" in one_error_line(err)


def test_sweep_steps_must_be_stable(tmp_path: Path, capsys) -> None:
    make_run(tmp_path)
    code, _, err = run_main(capsys, "sweep", "--output-dir", str(tmp_path), "--steps", "1,9", "--dry-run")
    assert code == 2 and "step_9 does not exist; stable weights steps: [0, 1, 2]" in one_error_line(err)
    code, _, err = run_main(capsys, "sweep", "--output-dir", str(tmp_path), "--steps", "x", "--dry-run")
    assert code == 2 and "--steps 'x'" in one_error_line(err)


# --------------------------------------------------------------------------- what is evaluated where


def test_a_step_is_evaluated_with_the_runs_settings(tmp_path: Path) -> None:
    make_run(tmp_path)
    cfg, store, what = eval_config("2", tmp_path, None, 1)
    assert (store.run, what, cfg.model.name, cfg.inference.backend) == ("tiny", 2, "tiny", "hf")
    assert cfg.eval.max_response_tokens == 64 and cfg.eval.benchmarks["aime2024"].max_problems == 8
    _, _, latest = eval_config("latest", tmp_path, None, 1)
    assert latest == 2
    # a preset and overrides apply on top, but never change the run's identity or base model
    cfg, store, what = eval_config("base", tmp_path, "tiny", 1, "eval", ["eval.max_response_tokens=99"])
    assert (what, cfg.run.name, cfg.model.name, cfg.eval.max_response_tokens) == ("base", "tiny", "tiny", 99)
    assert cfg.run.output_dir == str(tmp_path)


def test_a_model_folder_of_no_run_gets_a_run_of_its_own(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "models" / "My Model"
    folder.mkdir(parents=True)
    cfg, store, what = eval_config(str(folder), tmp_path / "out", None, 1, "tiny-random")
    assert (store.run, what, cfg.model.name) == ("My_Model", "base", str(folder))
    assert store.run_yaml.is_file() and load_config(store.run_yaml).model.name == str(folder)
    # that run's evals/base/ is this model's: another model is refused there
    other = tmp_path / "models" / "other"
    other.mkdir()
    code, _, err = run_main(capsys, "run", "--model", str(other), "--output-dir", str(tmp_path / "out"),
                            "--run", "My_Model")
    assert code == 2 and "was trained from" in one_error_line(err)


def test_eval_files_layout_and_base_first(tmp_path: Path) -> None:
    store = make_run(tmp_path)
    fake_eval(store, 10, "math500")
    fake_eval(store, 2, "math500")
    fake_eval(store, "base", "aime2024")
    assert store.eval_path("base", "aime2024") == store.evals_dir / "base" / "aime2024.json"
    assert store.eval_path(2, "math500") == store.evals_dir / "step_2" / "math500.json"
    # The files are where the layout says, and reading them back gives what was written, in
    # step order (10 after 2, though "step_10" sorts first as text), the base model first.
    on_disk = sorted(p.relative_to(store.evals_dir).as_posix() for p in store.evals_dir.rglob("*.json"))
    assert on_disk == ["base/aime2024.json", "step_10/math500.json", "step_2/math500.json"]
    (store.evals_dir / "step_2" / ".math500.json.tmp-1").write_text("{")  # an unfinished write: ignored
    evals = store.read_evals()
    assert list(evals) == ["base", 2, 10] and list(evals[2]) == ["math500"]
    assert evals[2]["math500"] == json.loads((store.evals_dir / "step_2" / "math500.json").read_text())
    assert evals[2]["math500"]["summary"]["step"] == 2 and evals["base"]["aime2024"]["summary"]["step"] == "base"


def test_pending_markers_protect_weights_from_retention(tmp_path: Path) -> None:
    store = make_run(tmp_path, steps=(0, 1, 2, 3, 4))
    store.mark_eval_pending(1, ["math500"])
    store.mark_eval_pending(3, ["math500"])
    assert store.pending_evals() == [1, 3]
    assert store.read_evals() == {}  # a marker is no result
    deleted = store.apply_retention("weights", keep_last=1, protected=store.pending_evals()).deleted
    assert deleted == [0, 2] and store.stable_steps("weights") == [1, 3, 4]
    store.clear_eval_pending(1)
    assert store.pending_evals() == [3]


# --------------------------------------------------------------------------- the sweep's plan


def test_dry_run_skips_evaluated_steps_and_prints_the_array_script(tmp_path: Path, capsys) -> None:
    out = tmp_path / "my runs"  # a space: the printed lines must quote it
    store = make_run(out, steps=(0, 1, 2, 3))
    for bench in ("math500", "aime2024"):
        fake_eval(store, 1, bench)
    fake_eval(store, 2, "math500")  # aime2024 missing: step 2 is evaluated again
    code, text, _ = run_main(capsys, "sweep", "--output-dir", str(out), "--include-base", "--max-parallel", "2",
                             "--dry-run")
    assert code == 0
    assert "4 task(s): base, step_0, step_2, step_3; already evaluated: step_1" in text
    tasks = [shlex.split(line) for line in text.splitlines() if line.startswith("python -m deepscaler.eval run ")]
    assert [t[t.index("--model") + 1] for t in tasks] == ["base", "0", "2", "3"]
    assert tasks[0][tasks[0].index("--output-dir") + 1] == str(out.resolve())
    sbatch = [line for line in text.splitlines() if line.startswith("#SBATCH ")]
    for line in ("#SBATCH --array=0-3%2", "#SBATCH --job-name=e1-tiny-deepscaler", "#SBATCH --cpus-per-task=1",
                 "#SBATCH --signal=USR2@60"):
        assert line in sbatch, (line, sbatch)
    assert not store.pending_evals()  # a dry run claims nothing
    # --force: every step again
    text = run_main(capsys, "sweep", "--output-dir", str(out), "--force", "--dry-run")[1]
    assert "4 task(s): step_0, step_1, step_2, step_3" in text


def test_tasks_run_the_same_entry_point(tmp_path: Path) -> None:
    store = make_run(tmp_path)
    args = argparse.Namespace(preset="tiny-random", seed=3, force=False, overrides=["eval.temperature=0.7"])
    argv = task_argv(store, 2, ["math500"], args)
    assert argv == ["run", "--model", "2", "--output-dir", str(tmp_path.resolve()), "--run", "tiny", "--stage", "1",
                    "--benchmarks", "math500", "--preset", "tiny-random", "--seed", "3", "--skip-existing",
                    "eval.temperature=0.7"]


def test_a_task_calls_the_run_function_and_a_requeue_skips_what_is_done(tmp_path: Path, monkeypatch, capsys) -> None:
    """run_eval is a spy here (kept for speed: a real one samples for a minute); the requeue's
    request is the point. Real counterpart of a task running run_eval:
    tests/integration/test_eval_sweep.py::test_sweep_is_one_array_with_a_task_per_step."""
    store = make_run(tmp_path)
    args = argparse.Namespace(preset=None, seed=None, force=True, overrides=[])
    request = task_request(store, 2, ["math500"], args)
    seen = []
    monkeypatch.setattr(sweep_mod, "run_eval", lambda r: seen.append(r) or {})
    assert EvalTask()(request) == shlex.join(task_argv(store, 2, ["math500"], args))
    assert seen == [request] and not request.skip_existing  # --force: no --skip-existing
    requeued = EvalTask().checkpoint(request)
    assert isinstance(requeued.function, EvalTask) and requeued.args == (replace(request, skip_existing=True),)
    # a one-line error fails the task, with the same error line as the command line's
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="step_7 does not exist"):
        EvalTask()(task_request(store, 7, ["math500"], args))
    assert "error: " in one_error_line(capsys.readouterr().err)


def test_task_resources_come_from_eval_resources_and_slurm(tmp_path: Path) -> None:
    store = make_run(tmp_path)
    tiny = load_config(store.run_yaml)
    assert executor(tiny, store, None).parameters == {
        "job_name": "e1-tiny-deepscaler", "time": 30, "nodes": 1, "ntasks_per_node": 1, "cpus_per_task": 1,
        "signal_delay_s": 60}
    gpu = load_config(REPO / "yaml/eval.yaml", ["slurm.partition=gpu", "slurm.account=proj", "eval.resources.mem=64G",
                                                "slurm.extra_sbatch=[--exclusive, --mail-type=END]",
                                                "slurm.setup=[module load cuda]"])
    ex = executor(gpu, store, 4)
    o = ex.parameters
    assert (o["gpus_per_node"], o["cpus_per_task"], o["mem"], o["partition"], o["account"]) == (1, 8, "64G", "gpu", "proj")
    assert o["array_parallelism"] == 4 and o["setup"] == ["module load cuda"]
    assert o["additional_parameters"] == {"exclusive": True, "mail-type": "END"}
    script = array_script(ex, 3)
    for line in ("#SBATCH --gpus-per-node=1", "#SBATCH --partition=gpu", "#SBATCH --exclusive", "#SBATCH --array=0-2%3"):  # at most the tasks
        assert line in script.splitlines(), line
    assert "module load cuda" in script.splitlines()


def test_step_not_found_is_what_a_missing_step_raises(tmp_path: Path) -> None:
    store = make_run(tmp_path, steps=(1,))
    with pytest.raises(StepNotFound):
        eval_config("4", tmp_path, "tiny", 1)
    assert store.stable_steps("weights") == [1]
