"""The shared layout's job as Slurm gets it, checked as text and as pure functions: every GPU a
server and a trainer rank (docs/cluster.md, "Shared GPUs"). Simulated boundary: the 8-GPU nodes
of stages 1-3 (the srun lines as text, the task's place from SLURM_PROCID); the local cluster
runs the same steps on fake GPUs (tests/integration/test_slurm_shapes.py)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from deepscaler.config import ConfigError, load_config, server_names, shared_shape, trainer_ranks
from deepscaler.launch import Child, dead_server, failure
from deepscaler.slurm.shared_task import Role, per_node, physical, pick, role, task_name
from deepscaler.slurm.stage_job import dry_run_script, job_steps, layout, main_job_requests
from deepscaler.store import RunStore

REPO = Path(__file__).resolve().parents[2]


def config(stage: int, *overrides: str):
    return load_config([REPO / f"yaml/stage{stage}.yaml"], ["slurm.layout=shared", *overrides])


def test_shared_pools_both_components_gpus() -> None:
    one = config(1)  # 4 + 4 GPUs on one node: one node of 8
    assert shared_shape(one) == (1, 8) and len(server_names(one)) == 8 and trainer_ranks(one) == 8
    many = config(2)  # 2 x 8 + 2 x 8: four nodes of 8
    assert shared_shape(many) == (4, 8) and len(server_names(many)) == 32 and trainer_ranks(many) == 32
    assert len(server_names(config(1, "inference.tensor_parallel=2"))) == 4
    split = load_config([REPO / "yaml/stage2.yaml"], ["slurm.layout=split"])
    assert len(server_names(split)) == 16 and trainer_ranks(split) == 16


def test_a_shape_that_does_not_pool_into_whole_nodes_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        config(2, "slurm.trainer.gpus_per_node=4")
    assert "slurm.layout" in str(err.value) and "do not pool" in str(err.value)
    with pytest.raises(ConfigError) as err:
        config(1, "inference.tensor_parallel=3", "slurm.inference.gpus_per_node=3", "slurm.trainer.gpus_per_node=5")
    assert "inference.tensor_parallel" in str(err.value)
    # Nearby shapes that pool: unequal components on one node, equal GPUs per node over nodes.
    assert shared_shape(config(1, "slurm.inference.gpus_per_node=2", "slurm.trainer.gpus_per_node=6")) == (1, 8)
    assert shared_shape(config(2, "slurm.inference.nodes=1")) == (3, 8)


def test_each_task_is_a_server_or_a_trainer_rank_by_its_place_on_its_node() -> None:
    cfg = config(2)  # 4 nodes; per node 8 servers then 8 ranks
    assert per_node(cfg) == (8, 8)
    assert role(cfg, 0) == Role("server", 0, 0, (0,))
    assert role(cfg, 7) == Role("server", 7, 7, (7,))
    assert role(cfg, 8) == Role("trainer", 0, 0, (0,))
    assert role(cfg, 16) == Role("server", 8, 0, (0,))  # node 1's first server
    assert role(cfg, 63) == Role("trainer", 31, 7, (7,))
    # A server of tensor_parallel 2 takes two GPUs; the ranks still take one each.
    tp = config(1, "inference.tensor_parallel=2")
    assert per_node(tp) == (4, 8)
    assert role(tp, 1) == Role("server", 1, 1, (2, 3))
    assert role(tp, 4) == Role("trainer", 0, 0, (0,)) and role(tp, 11) == Role("trainer", 7, 7, (7,))
    assert task_name(tp, 3) == "server3" and task_name(tp, 5) == "trainer rank 1"
    # Every GPU of a node holds exactly one rank and is served by exactly one server.
    tasks = [role(tp, t) for t in range(12)]
    assert sorted(g for r in tasks if r.kind == "trainer" for g in r.gpus) == list(range(8))
    assert sorted(g for r in tasks if r.kind == "server" for g in r.gpus) == list(range(8))


def test_a_cpu_shared_stage_runs_one_server_and_one_rank_per_node() -> None:
    cfg = load_config([REPO / "yaml/tiny-random.yaml"], ["slurm.layout=shared"])
    assert per_node(cfg) == (1, 1)
    assert role(cfg, 0) == Role("server", 0, 0, ()) and role(cfg, 1) == Role("trainer", 0, 0, ())


def test_a_task_names_the_nodes_gpus_it_uses() -> None:
    assert physical((1,), {"SLURM_STEP_GPUS": "4,5"}) == "5"
    assert physical((0, 1), {"CUDA_VISIBLE_DEVICES": "2,3"}) == "2,3"
    assert physical((), {"SLURM_STEP_GPUS": "0,1"}) == "" and physical((0,), {}) == ""
    assert pick((2, 3), "0,1,2,3") == "2,3"  # a server's CUDA_VISIBLE_DEVICES, in CUDA's numbering


def test_dry_run_shows_the_shared_steps_each_with_its_cpus_and_gpus() -> None:
    cfg = config(1)
    assert layout(cfg) == "shared"
    ((what, req),) = main_job_requests(cfg)
    assert (req.nodes, req.ntasks_per_node, req.cpus_per_task, req.gpus_per_node) == (1, 16, 4, 8)
    text = dry_run_script(cfg)
    assert "#SBATCH --nodes=1" in text and "#SBATCH --ntasks-per-node=16" in text and "#SBATCH --gpus-per-node=8" in text
    assert "# job steps (shared)" in text
    steps = {name: argv for name, argv in job_steps(cfg, Path("/runs/run.yaml"), None).items()}
    assert set(steps) == {"shared", "orchestrator"}
    shared = steps["shared"]
    for flag in ("--nodes=1", "--ntasks=16", "--ntasks-per-node=16", "--cpus-per-task=4", "--gpus-per-node=8"):
        assert flag in shared, shared
    # Every task sees the node's GPUs: no per-task request, and not --gpu-bind=none, with which
    # Slurm 22.05 sets no CUDA_VISIBLE_DEVICES for a step of several tasks.
    assert not any(a.startswith(("--gpu-bind", "--gpus-per-task")) for a in shared), shared
    assert shared[shared.index("-m") + 1] == "deepscaler.slurm.shared_task"
    assert "--overlap" not in shared  # one step: Slurm divides the CPUs between its tasks
    assert "--overlap" in steps["orchestrator"] and any(a.startswith("--cpus-per-task=") for a in steps["orchestrator"])
    for name, argv in steps.items():  # the dry run's srun lines, but for the run.yaml path
        assert f"# {name}\n" + shlex.join(argv[:argv.index("--config")]) in text, name
    # Stage 2's: four nodes of 16 tasks.
    many = job_steps(config(2), Path("/runs/run.yaml"), "latest")["shared"]
    assert "--nodes=4" in many and "--ntasks=64" in many and many[-2:] == ["--resume-step", "latest"]


def test_a_dead_task_of_the_shared_step_is_named_server_or_not_a_server(tmp_path) -> None:
    """srun's report of the first task that ended badly names a server only when the task is
    one; a trainer rank's death is the step's own failure."""
    cfg = config(1, "slurm.inference.gpus_per_node=1", "slurm.trainer.gpus_per_node=1")  # 2 servers, 2 ranks
    log = tmp_path / "shared.log"
    proc = subprocess.Popen(["true"])
    proc.wait()
    child = Child("shared", proc, log)
    log.write_text("=== srun ...\nsrun: error: node3: task 1: Killed\n")
    assert dead_server(cfg, [child])[:3] == ("server1", "node3", "killed by signal 9 (SIGKILL)")
    log.write_text("=== srun ...\nsrun: error: node3: task 2: Exited with exit code 1\n")
    assert dead_server(cfg, [child]) is None  # task 2 is trainer rank 0
    store = RunStore(tmp_path, "run", 1)
    assert failure(cfg, store, [child], child).splitlines()[0] == (
        "trainer rank 0 on node3 exited with code 1 (job step shared) (stage 1 of run 'deepscaler')")
