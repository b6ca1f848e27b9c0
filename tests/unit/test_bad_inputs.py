"""Bad settings and bad command lines are refused before anything runs: exit 2, one line that
names the key or the file, no traceback, and nothing written under the output dir.

Each case runs a real command line (the module's ``main``; a few also as a process, to see
that no traceback reaches the terminal)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.slurm_cluster import in_ci

REPO = Path(__file__).resolve().parents[2]

# (command, argv after the output dir options, words the one line must hold)
CASES = [
    ("config", ["yaml/stage1.yaml", "sampling.temperature=0"], ["sampling.temperature", "more than 0"]),
    ("config", ["yaml/stage1.yaml", "sampling.temperature=-1"], ["sampling.temperature"]),
    ("config", ["yaml/stage1.yaml", "sampling.samples_per_prompt=1"], ["sampling.samples_per_prompt", "2 or more"]),
    ("config", ["yaml/stage1.yaml", "orchestrator.prompts_per_step=0"], ["orchestrator.prompts_per_step"]),
    ("config", ["yaml/stage1.yaml", "orchestrator.async_level=3"], ["orchestrator.async_level", "keep_last"]),
    ("config", ["yaml/stage1.yaml", "run.name=a/b"], ["run.name"]),
    ("config", ["yaml/stage1.yaml", "run.name=" + "x" * 65], ["run.name", "1-64"]),
    ("config", ["yaml/stage1.yaml", "run.name=.hidden"], ["run.name"]),
    ("config", ["yaml/stage1.yaml", "run.seed=1", "run.seed=2"], ["run.seed", "already set"]),
    ("config", ["yaml/stage1.yaml", "trainer.optimizer.lr"], ["trainer.optimizer.lr", "expected key=value"]),
    ("config", ["yaml/stage1.yaml", "trainer.optimiser.lr=1"], ["trainer.optimiser", "did you mean"]),
    ("config", ["yaml/stage1.yaml", "trainer.optimizer.lr=fast"], ["trainer.optimizer.lr", "a number"]),
    ("config", ["yaml/stage1.yaml", "trainer.optimizer.lr=0"], ["trainer.optimizer.lr", "more than 0"]),
    ("config", ["yaml/stage1.yaml", "trainer.optimizer.lr=inf"], ["trainer.optimizer.lr", "(inf)", "finite"]),
    ("config", ["yaml/stage1.yaml", "trainer.optimizer.lr=nan"], ["trainer.optimizer.lr", "(nan)", "finite"]),
    ("config", ["yaml/stage1.yaml", "trainer.ppo_epochs=0"], ["trainer.ppo_epochs", "(0)", "1 or more"]),
    ("config", ["yaml/stage1.yaml", "inference.gpu_memory_utilization=1.5"], ["inference.gpu_memory_utilization"]),
    ("config", ["yaml/stage1.yaml", "sampling.top_p=1.5"], ["sampling.top_p"]),
    ("config", ["yaml/stage1.yaml", "trainer.loss.tis_cap=0.5"], ["trainer.loss.tis_cap"]),
    ("config", ["yaml/stage1.yaml", "trainer.loss.clip_ratio_c=1"], ["trainer.loss.clip_ratio_c"]),
    ("config", ["yaml/stage1.yaml", "trainer.loss.old_logprobs=inference", "trainer.loss.tis_cap=2"],
     ["trainer.loss.tis_cap", "old_logprobs"]),
    ("config", ["yaml/stage2.yaml", "slurm.colocate=true"], ["slurm.colocate", "do not fit"]),
    ("config", ["yaml/stage1.yaml", "slurm.time=2 days"], ["slurm.time"]),
    ("config", ["yaml/stage1.yaml", "run.umask=0777"], ["run.umask"]),
    ("config", ["{empty}"], ["empty.yaml", "empty"]),
    ("config", ["{bad_yaml}"], ["bad.yaml", "invalid YAML"]),
    ("config", ["yaml/nope.yaml"], ["nope.yaml", "no such config file"]),
    ("submit", ["--stage", "1", "--preset", "tiny-random", "sampling.temperature=0"], ["sampling.temperature"]),
    ("submit", ["--stage", "1", "--preset", "tiny-random", "run.name=a b"], ["run.name"]),
    ("submit", ["--stages", "1,x", "--preset", "tiny-random"], ["--stages"]),
    ("submit", ["--stage", "1", "--preset", "nope"], ["nope", "no such config file"]),
    ("submit", ["--stage", "1", "--preset", "tiny-random", "--resume-step", "abc"], ["--resume-step", "abc"]),
    ("submit", ["--stage", "1", "--preset", "tiny-random", "--resume-step", "-1"], ["--resume-step '-1'", "0 or more"]),
    ("submit", ["--stage", "1", "--preset", "tiny-random", "--resume-step=-1", "--dry-run"], ["--resume-step '-1'"]),
    ("submit", ["--stage", "1", "--preset", "tiny-random", "--resume-step", "1e3", "--dry-run"], ["--resume-step '1e3'"]),
    ("submit", ["--stages", "1,3", "--preset", "tiny-random", "--dry-run"], ["--stages '1,3'", "stage 3 starts from stage 2"]),
    ("submit", ["--stages", "2,1", "--preset", "tiny-random", "--dry-run"], ["--stages '2,1'", "stage 1 starts from the base model"]),
    ("submit", ["--stages", "1,1", "--preset", "tiny-random", "--dry-run"], ["--stages '1,1'", "stage 1 starts from the base model"]),
    ("submit", ["--stages", "1,2,2", "--preset", "tiny-random", "--dry-run"], ["--stages '1,2,2'", "from stage 1"]),
    ("submit", ["--stages", "1,,2", "--preset", "tiny-random", "--dry-run"], ["--stages '1,,2'"]),
    ("submit", ["--stages", "4", "--preset", "tiny-random"], ["stage4", "no such config file"]),
    ("submit", ["--stage", "1", "--stages", "1,2", "--preset", "tiny-random", "--dry-run"], ["--stage", "--stages", "not both"]),
    ("submit", ["--stages", "1,2", "--stage", "2", "--preset", "tiny-random", "--dry-run"], ["--stage", "--stages", "not both"]),
    ("submit", ["--stage", "1", "--preset", "tiny-random", "--executor", "local", "--output-dir", "{a_file}"],
     ["run.output_dir", "is a file"]),
    ("plan", ["--stage", "1", "trainer.micro_batch_tokens=0"], ["trainer.micro_batch_tokens"]),
    ("eval", ["report", "--output-dir", "{out}"], ["no run"]),
]


def main_of(command: str):
    from deepscaler import config, plan, submit
    from deepscaler.eval import cli

    return {"config": config.main, "submit": submit.main, "plan": plan.main, "eval": cli.main}[command]


def fill(argv: list[str], tmp_path: Path) -> list[str]:
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "bad.yaml").write_text("run: [unclosed\n")
    (tmp_path / "a_file").write_text("not a directory")
    names = {"{empty}": tmp_path / "empty.yaml", "{bad_yaml}": tmp_path / "bad.yaml", "{a_file}": tmp_path / "a_file",
             "{out}": tmp_path / "out"}
    return [str(names.get(a, a)) for a in argv]


@pytest.mark.parametrize("command, argv, words", CASES, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_a_bad_input_is_one_line_exit_2_and_writes_nothing(command, argv, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    out.mkdir()
    argv = fill(argv, tmp_path)
    if command == "submit" and "--output-dir" not in argv:
        argv = [*argv, "--output-dir", str(out), "--executor", "local"]
    assert main_of(command)(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, (word, err)
    assert not any(out.iterdir()), sorted(out.rglob("*"))


@pytest.mark.parametrize("argv", [
    ["deepscaler.config", "yaml/stage1.yaml", "sampling.temperature=0"],
    ["deepscaler.submit", "--stage", "1", "--preset", "tiny-random", "--executor", "local", "sampling.samples_per_prompt=1"],
])
def test_no_traceback_reaches_the_terminal(argv, tmp_path):
    done = subprocess.run([sys.executable, "-m", *argv, *(["--output-dir", str(tmp_path)] if "submit" in argv[0] else [])],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv, stages", [
    ([], [1]), (["--stage", "2"], [2]), (["--stage", "3"], [3]), (["--stages", "1"], [1]), (["--stages", "1,2"], [1, 2]),
    (["--stages", "1,2,3"], [1, 2, 3]), (["--stages", "2,3"], [2, 3]), (["--stages", "2"], [2]), (["--stages", "3"], [3]),
    (["--stages", " 1, 2 "], [1, 2]),
])
def test_a_stage_chain_that_can_run_is_accepted(argv, stages, monkeypatch, capsys):
    """Each stage after the first starts from the one before it (checkpoint.init_from_stage)."""
    from deepscaler import submit

    monkeypatch.chdir(REPO)
    assert submit.main([*argv, "--preset", "tiny-random", "--executor", "local", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert [int(line.split()[2]) for line in out.splitlines() if line.startswith("# stage ")] == stages


def test_resume_step_0_and_latest_are_accepted_syntax():
    from deepscaler.stage import parse_resume_step

    assert [parse_resume_step(t) for t in (None, "latest", "0", "12", " 7 ")] == [None, "latest", 0, 12, 7]


def test_resume_latest_without_a_checkpoint_says_it_starts_from_step_0(tmp_path):
    """A mistyped output dir would otherwise start a new run silently. A real run says so, and
    is then stopped with Ctrl-C (SIGINT), as a user who sees the notice would."""
    import signal

    run = subprocess.Popen([sys.executable, "-m", "deepscaler.submit", "--stage", "1", "--preset", "tiny-random",
                            "--executor", "local", "--output-dir", str(tmp_path), "--resume-step", "latest"],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert run.stdout.readline().startswith("# stage 1")  # the stage has started
        run.send_signal(signal.SIGINT)
        err = run.stderr.read()
        code = run.wait(timeout=120)
    finally:
        run.kill()
        run.wait()
    assert code == 130, (code, err)
    first, *_, last = err.splitlines()
    assert first.startswith(f"notice: --resume-step latest: no checkpoint in {tmp_path}")
    assert "starting from step 0" in first
    assert last.startswith("interrupted: every process of the stage was stopped")


@pytest.mark.parametrize("fault, text", [("read-only", "Read-only file system"), ("full", "No space left on device")])
def test_an_unusable_output_dir_is_one_line_before_anything_runs(fault, text, tmp_path, monkeypatch, capsys):
    """A real read-only mount and a real full disk (a tmpfs with no inode left): submit says so
    in one line and starts nothing. run_stage is a spy, so that a broken check fails here at
    once instead of running a stage."""
    from deepscaler import submit
    from tests.helpers.mounts import read_only, tmpfs

    fs = tmp_path / "fs"
    fs.mkdir()
    out = fs / "out"
    started = []
    monkeypatch.setattr("deepscaler.launch.run_stage", lambda *a, **k: started.append(a))
    with (read_only(fs) if fault == "read-only" else tmpfs(fs, "64k", inodes=1)):
        assert submit.main(["--stage", "1", "--preset", "tiny-random", "--executor", "local",
                            "--output-dir", str(out)]) == 2
        assert not out.exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: run.output_dir '{out}': cannot create {out}")
    assert err.endswith(f": {text}\n") and started == []


@pytest.mark.parametrize("mode", [0o755, 0o700], ids=["not-writable", "not-enterable"])
def test_an_output_dir_in_another_users_folder_is_one_line_before_anything_runs(mode):
    """A real folder of another user: submit runs as ``nobody`` (setpriv) when the tests run as
    root, whom mode bits do not stop; else as this user, with the folder's write and search bits
    taken away. One line, exit 2, nothing started (an unenterable folder was a traceback)."""
    import shutil
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="deepscaler-perm-"))  # in /tmp: every user may enter it
    top.chmod(0o755)
    folder = top / "theirs"
    folder.mkdir()
    out = folder / "out"
    argv = [sys.executable, "-m", "deepscaler.submit", "--stage", "1", "--preset", "tiny-random", "--executor", "local",
            "--output-dir", str(out)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            (pytest.fail if in_ci() else pytest.skip)("setpriv (util-linux) is not installed")
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    else:
        mode &= 0o500
    folder.chmod(mode)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)
    finally:
        folder.chmod(0o700)
        shutil.rmtree(top)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: run.output_dir '{out}': cannot ") and \
        done.stderr.endswith(": Permission denied\n"), done.stderr
    assert done.stdout == "" and not out.exists()
