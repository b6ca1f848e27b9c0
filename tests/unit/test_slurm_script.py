"""The sbatch script of a stage, as text (no cluster needed), and the hetjob state folding."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepscaler.config import load_config, server_names
from deepscaler.slurm.jobs import HetInfoWatcher, combine_states
from deepscaler.slurm.stage_job import job_commands, stage_script

REPO = Path(__file__).resolve().parents[2]


def config(*overrides: str):
    """Stage 2 as the split layout: the split job shapes (the shared one: test_shared_layout.py)."""
    return load_config([REPO / "yaml/stage2.yaml"], ["slurm.layout=split", *overrides])


def sbatch_lines(script: str) -> list[list[str]]:
    """The #SBATCH lines of each hetjob component."""
    blocks: list[list[str]] = [[]]
    for line in script.splitlines():
        if line == "#SBATCH hetjob":
            blocks.append([])
        elif line.startswith("#SBATCH "):
            blocks[-1].append(line[len("#SBATCH "):])
    return blocks


def test_every_resource_becomes_the_right_sbatch_line() -> None:
    cfg = config("slurm.partition=gpu", "slurm.account=proj", "slurm.qos=high", "slurm.constraint=a100",
                 "slurm.time=1-12:00:00", "slurm.inference.mem=200G", "slurm.trainer.cpus_per_gpu=6",
                 "inference.tensor_parallel=2", "slurm.extra_sbatch=[--exclusive]", "run.name=exp1")
    script = stage_script(cfg, Path("/shared/runs/logs"), "python -u -m submitit.core._submit /x", "afterok:41")
    inference, trainer = sbatch_lines(script)
    for line in ("--job-name=s2-exp1-deepscaler", "--dependency=afterok:41", "--requeue", "--exclusive",
                 "--signal=B:USR2@300", "--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=4", "--cpus-per-task=16",
                 "--mem=200G", "--partition=gpu", "--account=proj", "--qos=high", "--constraint=a100",
                 "--time=1-12:00:00"):
        assert line in inference, line
    for line in ("--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=8", "--cpus-per-task=6", "--partition=gpu",
                 "--account=proj", "--time=1-12:00:00"):
        assert line in trainer, line
    assert "--mem=200G" not in trainer and not any(x.startswith("--job-name") for x in trainer)
    assert len(server_names(cfg)) == 8  # 2 nodes x 8 GPUs / TP 2
    assert script.rstrip().endswith("exec python -u -m submitit.core._submit /x")


def test_paths_and_user_values_are_quoted() -> None:
    weird = "/tmp/my runs/it's \"here\"; rm -rf ~"
    cfg = config(f"run.output_dir={weird}", "slurm.partition=gpu; touch /tmp/pwned", "slurm.setup=[module load cuda/12.4]")
    script = stage_script(cfg, Path(weird) / "logs", "cmd")
    out = next(line for line in script.splitlines() if line.startswith("#SBATCH --output="))
    assert out == "#SBATCH --output='/tmp/my runs/it'\"'\"'s \"here\"; rm -rf ~/logs/%j_0_log.out'"
    assert "#SBATCH --partition='gpu; touch /tmp/pwned'" in script
    assert "module load cuda/12.4" in script.splitlines()  # set-up lines are the user's shell, verbatim
    # The script is valid shell: bash parses it, and the quoted values stay single words.
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_job_steps_place_servers_trainer_and_orchestrator() -> None:
    cfg = config("inference.tensor_parallel=2")
    steps = job_commands(cfg, Path("/r/run.yaml"), "latest")
    assert steps["servers"][:10] == ["srun", "--unbuffered", "--kill-on-bad-exit=1", "--het-group=0", "--nodes=2",
                                     "--ntasks=8", "--cpus-per-task=16", "--gpus-per-node=8", "--gpus-per-task=2",
                                     sys.executable]
    assert steps["servers"][-2:] == ["--name", "server{rank}"]
    assert {"--het-group=1", "--ntasks=16", "--ntasks-per-node=8", "--cpus-per-task=8",
            "--gpus-per-node=8"} <= set(steps["trainer"])
    # Every rank sees the node's trainer GPUs: not --gpu-bind=none, with which Slurm 22.05 sets
    # no CUDA_VISIBLE_DEVICES for a step of several tasks (a rank would take GPU r of the node).
    assert not any(a.startswith(("--gpu-bind", "--gpus-per-task")) for a in steps["trainer"])
    assert steps["trainer"][-2:] == ["--resume-step", "latest"]
    assert {"--overlap", "--mem=0", "--het-group=1", "--ntasks=1", "--cpus-per-task=8"} <= set(steps["orchestrator"])


def test_every_job_step_asks_for_its_cpus() -> None:
    """srun of Slurm 22.05-23.02 does not inherit --cpus-per-task from sbatch: a step that does
    not say it gets one CPU per task."""
    for overrides in ((), ("slurm.hetjob=false",), ("slurm.trainer.gpus_per_node=0", "slurm.inference.gpus_per_node=0")):
        cfg = config(*overrides)
        for name, argv in job_commands(cfg, Path("/r/run.yaml"), None).items():
            assert any(a.startswith("--cpus-per-task=") for a in argv), (overrides, name)


@pytest.mark.parametrize("states,expected", [
    (["COMPLETED", "COMPLETED"], "COMPLETED"),
    (["RUNNING", "COMPLETED"], "RUNNING"),
    (["PENDING", "PENDING"], "PENDING"),
    (["FAILED", "RUNNING"], "FAILED"),
    (["CANCELLED by 0", "COMPLETED"], "CANCELLED"),
    (["NODE_FAIL", "CANCELLED by 0"], "NODE_FAIL"),
    (["TIMEOUT", "TIMEOUT"], "TIMEOUT"),
    (["REQUEUED", "REQUEUED"], "REQUEUED"),
])
def test_component_states_fold_into_one(states, expected) -> None:
    assert combine_states(states) == expected


def test_sacct_hetjob_lines_give_the_job_id_a_state() -> None:
    """Canned sacct text, for speed and for states a real job cannot be made to reach at will
    (PENDING beside a finished one). Real counterpart:
    tests/unit/test_slurm_script.py::test_real_sacct_of_a_failed_hetjob_gives_the_job_id_failed."""
    sacct = ("JobID|State|NodeList\n"
             "15+0|COMPLETED|node1\n15+0.batch|COMPLETED|node1\n15+0.0|CANCELLED by 0|node1\n"
             "15+1|FAILED|node2\n15+1.1|FAILED|node2\n16|PENDING|None assigned\n")
    info = HetInfoWatcher().read_info(sacct)
    assert info["15"]["State"] == "FAILED" and info["15"]["NodeList"] == "node1,node2"
    assert info["16"]["State"] == "PENDING"


@pytest.mark.slurm
def test_real_sacct_of_a_failed_hetjob_gives_the_job_id_failed(slurm_cluster, tmp_path: Path) -> None:
    """A real hetjob on the local Slurm whose second component fails, read back from the real
    sacct as submitit asks it: the job id gets FAILED and both components' nodes."""
    import time

    from tests.slurm_cluster import slurm_env

    script = tmp_path / "het.sh"
    script.write_text("#!/bin/bash\n#SBATCH --job-name=het-fail --output=/dev/null --time=2\n"
                      "#SBATCH --ntasks=1 --cpus-per-task=1 --mem=200M\n#SBATCH hetjob\n"
                      "#SBATCH --ntasks=1 --cpus-per-task=2 --mem=200M --time=2\n"
                      "srun --het-group=0 true\nsrun --het-group=1 false\n")
    job = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=15,
                         check=True, cwd=tmp_path, env=slurm_env()).stdout.strip().split(";")[0].split("+")[0]
    try:
        for _ in range(120):
            sacct = subprocess.run(["sacct", "-o", "JobID,State,NodeList", "--parsable2", "-j", job],
                                   capture_output=True, text=True, timeout=15, env=slurm_env()).stdout
            info = HetInfoWatcher().read_info(sacct)
            if {f"{job}+0", f"{job}+1"} <= info.keys() and "RUNNING" not in sacct and "PENDING" not in sacct:
                break
            time.sleep(0.5)
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=15, env=slurm_env())
    assert info[job]["State"] == "FAILED", sacct
    nodes = info[job]["NodeList"].split(",")
    assert len(set(nodes)) == 2 and set(nodes) <= {"node1", "node2", "node3", "node4"}, sacct  # one per component


def run_submit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepscaler.submit", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)


def test_dry_run_prints_the_script_and_submits_nothing(tmp_path: Path) -> None:
    out = run_submit("--stages", "1,2", "--preset", "tiny-random", "--executor", "slurm", "--dry-run", "--output-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("#SBATCH hetjob") == 2
    assert "--dependency='afterok:<job of stage 1>'" in out.stdout
    assert not (tmp_path / "tiny").exists()


@pytest.mark.parametrize("extra", [[], ["--no-hetjob"]])
def test_dry_run_shows_the_srun_line_of_every_job_step(tmp_path: Path, extra: list[str]) -> None:
    out = run_submit("--stage", "1", "--executor", "slurm", "--dry-run", "--output-dir", str(tmp_path), *extra,
                     "slurm.layout=split")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    steps = {lines[i - 1].removeprefix("# "): line for i, line in enumerate(lines) if line.startswith("srun ")}
    assert set(steps) == {"servers", "trainer", "orchestrator"}
    for name, module in (("servers", "deepscaler.inference"), ("trainer", "deepscaler.trainer"),
                         ("orchestrator", "deepscaler.orchestrator")):
        assert "--cpus-per-task=8" in steps[name].split() and f"-m {module} --config" in steps[name]
    assert "--gpus-per-task=1" in steps["servers"] and "--gpus-per-node=4" in steps["trainer"]


def test_missing_sbatch_without_local_executor_is_a_one_line_error(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # python, but no sbatch
    out = run_submit("--stage", "1", "--preset", "tiny-random", "--executor", "slurm", "--output-dir", str(tmp_path), env=env)
    assert out.returncode == 2
    assert out.stderr.strip() == ("error: sbatch is not on PATH: run this on a Slurm login node, "
                                  "or pass --executor local")


@pytest.mark.parametrize("override,message", [
    ("slurm.time=2 days", "key 'slurm.time' '2 days' is not a Slurm time"),
    ("slurm.trainer.gpus_per_node=16", "key 'slurm.trainer.gpus_per_node' (16) is more than a node has"),
])
def test_bad_resources_fail_before_sbatch(tmp_path: Path, override: str, message: str) -> None:
    out = run_submit("--stage", "1", "--executor", "slurm", "--output-dir", str(tmp_path), override)
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_stage_1_is_colocated_on_one_node_and_multi_node_stages_are_hetjobs() -> None:
    """Slurm never puts two components of a het job on one node, so stage 1's 4 + 4 GPUs as a
    hetjob would hold two 8-GPU nodes; colocated it is one node whose job steps split its GPUs."""
    from deepscaler.slurm.stage_job import layout

    stage1 = load_config([REPO / "yaml/stage1.yaml"], ["slurm.layout=split"])
    assert layout(stage1) == "colocated"
    script = stage_script(stage1, Path("/r/logs"), "cmd")
    assert "#SBATCH hetjob" not in script and script.count("#SBATCH --nodes=1") == 1
    assert "#SBATCH --gpus-per-node=8" in script and "#SBATCH --ntasks-per-node=8" in script
    steps = job_commands(stage1, Path("/r/run.yaml"), None)
    assert "--exact" in steps["servers"] and "--exact" in steps["trainer"]  # both steps run at once
    assert not any(a.startswith("--het-group") for argv in steps.values() for a in argv)
    assert layout(config()) == "hetjob" and layout(config("slurm.hetjob=false")) == "two_jobs"
    assert layout(load_config([REPO / "yaml/stage1.yaml"], ["slurm.layout=split", "slurm.colocate=false"])) == "hetjob"


def test_colocating_what_does_not_fit_on_one_node_is_refused() -> None:
    with pytest.raises(Exception) as err:
        config("slurm.colocate=true")  # stage 2: 2 x 8 + 2 x 8 GPUs
    assert "slurm.colocate" in str(err.value) and "do not fit on one node" in str(err.value)


@pytest.mark.parametrize("key, value", [
    ("slurm.partition", "gpu\ntouch /tmp/pwned"),
    ("slurm.account", "proj\r"),
    ("slurm.qos", "high\x1b"),
    ("slurm.constraint", "a100\n"),
    ("slurm.extra_sbatch", ["--exclusive", "--comment=x\nrm -rf ~"]),
    ("slurm.setup", ["module load cuda\nexport X=1"]),
    ("slurm.inference.mem", "200G\nid"),
    ("run.output_dir", "/shared/runs\n/x"),
])
def test_a_control_character_in_a_value_that_reaches_the_script_is_refused(tmp_path, key, value) -> None:
    """A newline would end its #SBATCH line and start a line of shell."""
    import yaml

    from deepscaler.config import ConfigError

    tree: dict = value
    for part in reversed(key.split(".")):
        tree = {part: tree}
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({"extends": str(REPO / "yaml/stage2.yaml"), **tree}))
    with pytest.raises(ConfigError, match=rf"^{path}: key '{key}' holds a control character"):
        load_config([path])


def test_values_with_spaces_and_shell_characters_stay_quoted_values(tmp_path) -> None:
    import yaml

    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({"extends": str(REPO / "yaml/stage2.yaml"),
                                    "run": {"output_dir": "/shared/my runs"},
                                    "slurm": {"inference": {"mem": "200G; touch /tmp/pwned"}}}))
    cfg = load_config([path])
    script = stage_script(cfg, Path(cfg.run.output_dir) / "logs", "cmd")
    assert "#SBATCH --mem='200G; touch /tmp/pwned'" in script.splitlines()
    assert "#SBATCH --output='/shared/my runs/logs/%j_0_log.out'" in script.splitlines()
    assert "#SBATCH --mem=200G" in stage_script(config("slurm.inference.mem=200G"), Path("/x"), "cmd").splitlines()
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_a_cpu_component_runs_one_task_per_node_in_its_srun_step_and_locally() -> None:
    """gpus_per_node 0 (the tiny presets) on 2 nodes: 2 servers and 2 trainer ranks, one per
    node, as the srun steps run them; before, the servers' step asked for 1 task on 2 nodes and
    the launcher and the resume check counted 1 trainer rank where srun started 2."""
    from deepscaler.config import trainer_ranks
    from deepscaler.launch import stage_commands

    cpu = config("slurm.inference.nodes=2", "slurm.inference.gpus_per_node=0", "slurm.trainer.nodes=2",
                 "slurm.trainer.gpus_per_node=0")
    assert server_names(cpu) == ["server0", "server1"] and trainer_ranks(cpu) == 2
    steps = job_commands(cpu, Path("/r/run.yaml"), None)
    assert "--ntasks=2" in steps["servers"] and "--ntasks=2" in steps["trainer"]
    local = stage_commands(cpu, Path("/r/run.yaml"), None)
    assert "--nproc-per-node=2" in local["trainer"] and {"server0", "server1"} <= local.keys()
    one = config("slurm.inference.nodes=1", "slurm.inference.gpus_per_node=0", "slurm.trainer.nodes=1",
                 "slurm.trainer.gpus_per_node=0")
    assert server_names(one) == ["server0"] and trainer_ranks(one) == 1  # the tiny presets' shape is unchanged
    gpu = config()  # 2 nodes x 8 GPUs each side
    assert len(server_names(gpu)) == 16 and trainer_ranks(gpu) == 16


def test_a_stage_override_applies_to_its_stage_only(tmp_path: Path) -> None:
    from deepscaler.config import ConfigError
    from deepscaler.submit import build_parser, resolve

    def shapes(*args: str) -> list[int]:
        cfgs = resolve(build_parser().parse_args(["--preset", "tiny-random", "--output-dir", str(tmp_path), *args]))
        return [c.slurm.trainer.nodes for c in cfgs]

    assert shapes("--stages", "1,2", "stage2.slurm.trainer.nodes=2") == [1, 2]
    assert shapes("--stages", "1,2", "slurm.trainer.nodes=2") == [2, 2]
    assert shapes("--stages", "1,2", "slurm.trainer.nodes=2", "stage1.slurm.trainer.nodes=1") == [1, 2]
    assert shapes("--stage", "2", "stage2.slurm.trainer.nodes=2") == [2]
    with pytest.raises(ConfigError, match=r"override 'stage3.slurm.trainer.nodes=2': stage 3 is not among"):
        shapes("--stages", "1,2", "stage3.slurm.trainer.nodes=2")
    with pytest.raises(ConfigError, match="unknown key 'slurm.trainer.node'"):
        shapes("--stages", "1,2", "stage2.slurm.trainer.node=2")
    # Nearby forms still accepted: a dotted value, and a key that only starts like a stage's.
    lrs = [c.trainer.optimizer.lr for c in resolve(build_parser().parse_args(
        ["--preset", "tiny-random", "--output-dir", str(tmp_path), "--stages", "1,2", "stage2.trainer.optimizer.lr=2.5e-5"]))]
    assert lrs[1] == 2.5e-5 and lrs[0] != 2.5e-5
    with pytest.raises(ConfigError, match="unknown key 'stages'"):  # not a stage prefix: an ordinary (unknown) key
        shapes("--stages", "1,2", "stages.x=1")


def test_a_stage_that_loads_the_optimizer_state_must_keep_the_trainer_shape(tmp_path: Path) -> None:
    """The weights load into any shape; ZeRO's optimizer partitions only into the one they were
    written by. A chain that would fail in stage 2's job after stage 1 ran is refused at submit."""
    from deepscaler.config import ConfigError
    from deepscaler.submit import build_parser, resolve

    def chain(*args: str):
        return resolve(build_parser().parse_args(["--stages", "1,2", "--preset", "tiny-random", "--output-dir",
                                                  str(tmp_path), *args]))

    assert chain("stage2.slurm.trainer.nodes=2")[1].checkpoint.load_optimizer is False  # stage2.yaml: weights only
    assert chain("stage2.checkpoint.load_optimizer=true")[1].checkpoint.load_optimizer  # same shape: fine
    with pytest.raises(ConfigError) as err:
        chain("stage2.slurm.trainer.nodes=2", "stage2.checkpoint.load_optimizer=true")
    assert "\n" not in str(err.value) and "partitioned for 1 trainer rank(s) with ZeRO-1" in str(err.value)
    assert "stage2.checkpoint.load_optimizer=false" in str(err.value)
    with pytest.raises(ConfigError, match="ZeRO-1, but stage 2 has 1 with ZeRO-2"):
        chain("stage2.trainer.deepspeed.zero_stage=2", "stage2.checkpoint.load_optimizer=true")
