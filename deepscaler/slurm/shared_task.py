"""One task of a shared stage's job step: an inference server or a trainer rank, by its place
on its node (``slurm.layout: shared``; docs/cluster.md, "Shared GPUs").

A shared stage runs its servers and its trainer ranks as one job step, with one task per
process. Slurm then gives each task CPUs of its own (``--cpus-per-task``, bound wherever the
cluster binds tasks), and every task the node's GPUs (``--gpus-per-node``), so a server and a
trainer rank share each GPU without sharing CPUs. Two job steps with ``--overlap`` would share
the GPUs as well, but not divide the CPUs: an overlapping step takes its cores from the first
one up, whatever the other steps use (slurmctld's ``_pick_step_core`` under
``SSF_OVERLAP_FORCE``).

On each node the first tasks are the servers, one per ``inference.tensor_parallel`` GPUs in
GPU order, and the rest the trainer ranks, one per GPU (:func:`role`). A trainer rank starts
once the servers on its node have announced themselves: vLLM sizes its KV cache from the GPU
memory that is free when it starts (``gpu_memory_utilization`` of the whole GPU), so the
trainer must not hold any yet. A server stops by itself, cleanly, once the trainer has finished (as in every layout), so the
step ends with exit 0 when the stage is done.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

from deepscaler.config import Config, load_config, shared_shape
from deepscaler.process import GPUS_ENV
from deepscaler.store import RunStore

POLL_S = 1.0
STALE_ADDRESS_S = 5.0  # an address file older than the task's start, by more than this, is a previous attempt's


@dataclass(frozen=True)
class Role:
    kind: str  # "server" or "trainer"
    index: int  # the server's number (server<index>) or the trainer's global rank
    local: int  # its place among its kind on the node: server j, or local rank r
    gpus: tuple[int, ...]  # positions in the node's GPU list (empty on CPU)


def per_node(cfg: Config) -> tuple[int, int]:
    """(servers, trainer ranks) on each node of a shared stage: one server per
    ``tensor_parallel`` GPUs and one rank per GPU; one of each on a CPU node."""
    _, gpus = shared_shape(cfg)
    if not gpus:
        return 1, 1
    return gpus // cfg.inference.tensor_parallel, gpus


def role(cfg: Config, task: int) -> Role:
    """What task ``task`` of the shared step (``SLURM_PROCID``, block distribution) runs."""
    servers, ranks = per_node(cfg)
    node, local = divmod(task, servers + ranks)
    tp = cfg.inference.tensor_parallel if shared_shape(cfg)[1] else 0
    if local < servers:
        return Role("server", node * servers + local, local, tuple(range(local * tp, (local + 1) * tp)))
    r = local - servers
    return Role("trainer", node * ranks + r, r, (r,) if tp else ())


def task_name(cfg: Config, task: int) -> str:
    """How logs and errors name task ``task``: ``server3`` or ``trainer rank 5``."""
    r = role(cfg, task)
    return f"server{r.index}" if r.kind == "server" else f"trainer rank {r.index}"


def pick(gpus: tuple[int, ...], listed: str | None) -> str:
    """The entries of a comma-separated GPU list at these positions ("" when there is none)."""
    ids = (listed or "").split(",")
    return ",".join(ids[i] for i in gpus if i < len(ids) and ids[i])


def physical(gpus: tuple[int, ...], env: dict[str, str]) -> str:
    """The node's GPU ids at these positions of the step's GPUs (``SLURM_STEP_GPUS``, else
    ``CUDA_VISIBLE_DEVICES``): what the process logs."""
    return pick(gpus, env.get("SLURM_STEP_GPUS") or env.get("CUDA_VISIBLE_DEVICES"))


def wait_for_servers(store: RunStore, names: list[str], since: float, timeout_s: float) -> None:
    """Until each server in ``names`` has announced itself after ``since`` (a file left by a
    previous attempt is older). The servers' own failure ends the step (``--kill-on-bad-exit``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        fresh = [n for n in names if _written_since(store.server_file(n), since)]
        if len(fresh) == len(names):
            return
        if time.monotonic() > deadline:
            missing = sorted(set(names) - set(fresh))
            raise SystemExit(f"error: servers {missing} did not announce themselves within "
                             f"{timeout_s:g} s (inference.startup_timeout_s); the trainer rank did not start")
        time.sleep(POLL_S)


def _written_since(path, since: float) -> bool:
    try:
        return path.stat().st_mtime >= since - STALE_ADDRESS_S
    except FileNotFoundError:
        return False


def main(argv: list[str] | None = None) -> None:
    """Become this task's process (exec): the server, or the trainer rank once its node's
    servers are up."""
    started = time.time()
    parser = argparse.ArgumentParser(prog="python -m deepscaler.slurm.shared_task", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--resume-step")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    store = RunStore(cfg.run.output_dir, cfg.run.name, cfg.run.stage)
    task = int(os.environ["SLURM_PROCID"])
    me = role(cfg, task)
    env = dict(os.environ)
    gpus = physical(me.gpus, env)
    if gpus:
        env[GPUS_ENV] = gpus
    py, config = sys.executable, ["--config", args.config]
    if me.kind == "server":
        if me.gpus and env.get("CUDA_VISIBLE_DEVICES"):  # its own GPUs, as cuda:0..tensor_parallel-1
            # CUDA's numbering, which Slurm sets (relative to the step's devices where cgroups constrain them)
            env["CUDA_VISIBLE_DEVICES"] = pick(me.gpus, env["CUDA_VISIBLE_DEVICES"])
        # It stops by itself once the trainer has finished (deepscaler.inference.server).
        os.execve(py, [py, "-m", "deepscaler.inference", *config, "--name", f"server{me.index}"], env)
    servers, ranks = per_node(cfg)
    node = task // (servers + ranks)
    wait_for_servers(store, [f"server{node * servers + j}" for j in range(servers)], started,
                     cfg.inference.startup_timeout_s)
    nodes, _ = shared_shape(cfg)
    # The rank among the trainer's ranks, not the task among the step's (engine.distributed_env).
    env.update(RANK=str(me.index), WORLD_SIZE=str(nodes * ranks), LOCAL_RANK=str(me.local))
    resume = ["--resume-step", args.resume_step] if args.resume_step is not None else []
    os.execve(py, [py, "-m", "deepscaler.trainer", *config, *resume], env)


if __name__ == "__main__":
    main()
