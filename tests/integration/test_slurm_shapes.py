"""The recipe's multi-node shapes (stages 2 and 3: servers on 2 nodes, trainer ranks on 2 nodes)
as real jobs on the local Slurm cluster (four logical nodes, two fake GPUs each), at tiny scale:
gloo on CPU stands in for NCCL.

One 4-node job (2 server nodes + 2 trainer nodes, one GPU and one task each) feeds several
assertions; its final weights must equal, bit for bit, the same seed run as 2 ranks on one node
(the local executor, torchrun). A 3-node variant is requeued with one of its nodes drained, so it
resumes on another node set, from shards written by ranks on other nodes.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from deepscaler.store import RunStore
from tests.integration.test_slurm_stage import hostnames, step_cpus, submitted_jobs, wait_until
from tests.slurm_cluster import slurm_env

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
STEPS = 3
# Coin-flip rewards (seeded by the step): the tiny random model earns none by itself, and with
# every advantage 0 the ranks would all-reduce zeros and any layout would look bit-exact.
ENV = {"DEEPSCALER_FAULT": "orchestrator.random_rewards@on"}
RUN = ["--stage", "1", "--preset", "tiny-random", "--max-steps", str(STEPS), "run.deterministic=true",
       "checkpoint.interval=1"]
TWO_SERVERS_TWO_TRAINER_NODES = ["slurm.inference.nodes=2", "slurm.inference.gpus_per_node=1",
                                 "slurm.trainer.nodes=2", "slurm.trainer.gpus_per_node=1"]


def submit(out: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "deepscaler.submit", "--output-dir", str(out), *RUN, *args]
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=timeout, env={**slurm_env(), **ENV})


def cancel_jobs(store: RunStore) -> None:
    if store.metrics_path.exists() and submitted_jobs(store):
        subprocess.run(["scancel", *submitted_jobs(store)], env=slurm_env(), check=False)


def sacct_rows(job: str, *, duplicates: bool = False) -> list[dict[str, str]]:
    """sacct's rows of a job (``-D``: of every attempt of a requeued job too)."""
    argv = ["sacct", "-P", "-n", "-j", job, "-o", "JobID,State,NodeList,Start", *(["-D"] if duplicates else [])]
    out = subprocess.run(argv, capture_output=True, text=True, env=slurm_env(), check=True).stdout
    return [dict(zip(("id", "state", "nodes", "start"), line.split("|"))) for line in out.splitlines() if "|" in line]


def component_nodes(job: str) -> dict[int, list[str]]:
    """The nodes sacct records for each hetjob component (``ID+K``) of the job's latest attempt."""
    return {int(r["id"].split("+")[1]): hostnames(r["nodes"]) for r in sacct_rows(job)
            if re.fullmatch(rf"{job}\+\d", r["id"])}


def rank_lines(store: RunStore, log: str = "trainer") -> dict[int, tuple[int, str, str]]:
    """rank -> (local rank, node, rendezvous) from the trainer's log (a shared stage's: the
    ``shared`` step's) of the latest attempt."""
    return {r: (local, node, where) for r, (local, node, _, where) in rank_details(store, log).items()}


def rank_details(store: RunStore, log: str) -> dict[int, tuple[int, str, str, str]]:
    """rank -> (local rank, node, GPUs, rendezvous), as each rank logs it."""
    text = (store.logs_dir / f"{log}.log").read_text()
    found = re.findall(r"trainer rank (\d+) of 2: local rank (\d+) on node (\S+), device \S+, GPUs (\S+), "
                       r"rendezvous (\S+)", text.rsplit("=== ", 1)[-1])
    return {int(r): (int(local), node, gpus, where) for r, local, node, gpus, where in found}


def shard_nodes(store: RunStore, step: int) -> dict[int, str]:
    """rank -> the node that wrote its shard of ``checkpoints/step_N``."""
    ckpt = store.step_dir("checkpoints", step)
    return {r: json.loads((ckpt / f"rank_{r}.json").read_text())["node"] for r in range(2)}


def differing(a: RunStore, b: RunStore, step: int, b_step: int | None = None) -> list[str]:
    """Tensors of ``weights/step_N`` that differ (bitwise) between two runs (or two steps)."""
    x = load_file(a.step_dir("weights", step) / "model.safetensors")
    y = load_file(b.step_dir("weights", step if b_step is None else b_step) / "model.safetensors")
    assert x.keys() == y.keys()
    return [k for k in x if not (x[k] == y[k]).all()]


@pytest.fixture(scope="module")
def two_ranks_one_node(tmp_path_factory) -> RunStore:
    """The reference: the same seed with 2 servers and 2 trainer ranks on this one machine."""
    out = tmp_path_factory.mktemp("one-node")
    t0 = time.monotonic()
    done = submit(out, "--executor", "local", "slurm.inference.nodes=2", "slurm.inference.gpus_per_node=1",
                  "slurm.trainer.nodes=1", "slurm.trainer.gpus_per_node=2")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    print(f"reference (local, 2 ranks on one node): {time.monotonic() - t0:.0f} s")
    return RunStore(out, "tiny", 1)


@pytest.fixture(scope="module")
def four_nodes(slurm_cluster, tmp_path_factory):
    """Stage 2/3's shape: a hetjob of 2 server nodes and 2 trainer nodes, one task each."""
    if len(slurm_cluster.nodes) < 4:
        pytest.fail(f"the local cluster must have 4 nodes ready, sinfo has {slurm_cluster.nodes}")
    yield from completed_job(tmp_path_factory.mktemp("four-nodes"), "4-node job", *TWO_SERVERS_TWO_TRAINER_NODES)


def completed_job(out: Path, what: str, *overrides: str):
    """Submit the stage with ``--wait``; yield (store, job) once it completed; cancel what is left."""
    store = RunStore(out, "tiny", 1)
    t0 = time.monotonic()
    try:
        done = submit(out, "--executor", "slurm", "--wait", *overrides)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        print(f"{what}: {time.monotonic() - t0:.0f} s")
        (job,) = submitted_jobs(store)
        yield store, job
    finally:
        cancel_jobs(store)


def test_stage_2_shape_places_servers_and_trainer_ranks_on_four_nodes(four_nodes) -> None:
    store, job = four_nodes
    nodes = component_nodes(job)  # placement from Slurm's accounting, not from our logs
    assert len(nodes[0]) == len(nodes[1]) == 2 and len(set(nodes[0] + nodes[1])) == 4, nodes
    # Each rank says where it runs: one rank per trainer node, local rank 0 on each, both meeting
    # at the first trainer node's address (its NodeAddr; 127.0.0.1 for every local node).
    ranks = rank_lines(store)
    assert sorted(ranks) == [0, 1], ranks
    assert [ranks[r][1] for r in (0, 1)] == nodes[1], (ranks, nodes)
    assert {ranks[r][0] for r in (0, 1)} == {0}
    assert ranks[0][2] == ranks[1][2] and ranks[0][2].startswith("127.0.0.1:"), ranks
    # The checkpoint holds both ranks' shards, each written on its rank's node.
    assert shard_nodes(store, STEPS) == {0: nodes[1][0], 1: nodes[1][1]}
    # The orchestrator sampled from both servers (one per inference node).
    start = next(r for r in store.read_metrics().records if r.get("source") == "orchestrator" and r.get("event") == "start")
    assert start["servers"] == ["server0", "server1"]
    servers_log = (store.logs_dir / "servers.log").read_text()
    assert "server0 INFO serving on" in servers_log and "server1 INFO serving on" in servers_log


def test_two_trainer_nodes_give_the_weights_of_two_ranks_on_one_node(four_nodes, two_ranks_one_node) -> None:
    """Deterministic CPU mode: the same seed, rollouts and 2-rank all-reduce, whatever the
    ranks' nodes; the weights published by gathering from ranks on two nodes are bit-identical."""
    store, _ = four_nodes
    assert differing(store, two_ranks_one_node, STEPS) == []
    assert differing(store, two_ranks_one_node, STEPS - 1) == []
    assert differing(store, store, STEPS, STEPS - 1), "the last step changed nothing: the comparison proves nothing"


@pytest.fixture
def drained():
    """Nodes the test drains; every one is resumed afterwards, whatever happened."""
    nodes: list[str] = []
    yield nodes
    for node in nodes:
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], env=slurm_env(), check=False)


def squeue_reason(job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%r"], capture_output=True, text=True,
                          env=slurm_env()).stdout


def test_a_requeue_with_a_node_drained_resumes_on_other_nodes_bit_exactly(slurm_cluster, tmp_path, drained,
                                                                          two_ranks_one_node) -> None:
    """Both servers on one node, the trainer on two: 3 of the 4 nodes. At checkpoint 1 the job
    is suspended (so it cannot finish first), one of its trainer nodes drained and the job
    requeued: the only free nodes are then another set, and rank 1 (or 0) reads the shard that a
    rank on the drained node wrote. The result must be the uninterrupted run's, bit for bit."""
    store = RunStore(tmp_path, "tiny", 1)
    t0 = time.monotonic()
    try:
        out = submit(tmp_path, "--executor", "slurm", "slurm.inference.nodes=1", "slurm.inference.gpus_per_node=2",
                     "slurm.trainer.nodes=2", "slurm.trainer.gpus_per_node=1")
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        (job,) = submitted_jobs(store)
        wait_until(lambda: store.is_stable("checkpoints", 1), 300, "checkpoint 1", poll=0.5)
        subprocess.run(["scontrol", "suspend", job], env=slurm_env(), check=True)
        first = component_nodes(job)
        written_by = shard_nodes(store, 1)
        victim = first[1][1]
        drained.append(victim)
        subprocess.run(["scontrol", "update", f"nodename={victim}", "state=drain", "reason=test"], env=slurm_env(),
                       check=True)
        subprocess.run(["scontrol", "requeue", job], env=slurm_env(), check=True)
        # A job requeued while suspended comes back held (JobHeldAdmin) on Slurm 22.05.
        wait_until(lambda: "JobHeldAdmin" in squeue_reason(job), 60, f"job {job} to be requeued", poll=0.5)
        subprocess.run(["scontrol", "release", job], env=slurm_env(), check=True)
        wait_until(lambda: [r for r in sacct_rows(job) if r["id"] == f"{job}+1" and r["state"] == "COMPLETED"],
                   420, f"job {job} to complete after the requeue", poll=3)
    finally:
        cancel_jobs(store)
    print(f"3-node job with a requeue: {time.monotonic() - t0:.0f} s")
    # sacct -D keeps the first attempt's rows: two node sets, the drained node only in the first.
    rows = [r for r in sacct_rows(job, duplicates=True) if re.fullmatch(rf"{job}\+\d", r["id"])]
    sets = {}
    for r in rows:
        sets.setdefault(r["start"], set()).update(hostnames(r["nodes"]))
    assert len(sets) == 2, rows
    before, after = (sets[k] for k in sorted(sets))
    assert before == set(first[0] + first[1]) and victim in before and victim not in after, (before, after)
    assert before != after and len(after) == 3
    assert set(written_by.values()) == set(first[1])
    # The second attempt resumed from checkpoint 1 (not a fresh start, not the end), on other nodes.
    starts = [r for r in store.read_metrics().records if r.get("source") == "trainer" and r.get("event") == "start"]
    assert [s["resumed_from"] for s in starts] == [None, 1], starts
    assert set(shard_nodes(store, STEPS).values()) == set(component_nodes(job)[1]) != set(first[1])
    assert differing(store, two_ranks_one_node, STEPS) == []


# --------------------------------------------------------------------------- shared GPUs

# slurm.layout=shared pools both components' GPUs: here 1 + 1 fake GPUs, so 2 GPUs, each
# running one server and one trainer rank: the reference's 2 servers and 2 ranks.
SHARED = ["slurm.layout=shared", "slurm.inference.gpus_per_node=1", "slurm.trainer.gpus_per_node=1"]


@pytest.fixture(scope="module")
def shared_one_node(slurm_cluster, tmp_path_factory):
    """Stage 1's default layout: one node whose 2 GPUs each hold a server and a trainer rank."""
    yield from completed_job(tmp_path_factory.mktemp("shared-one-node"), "shared layout, one node", *SHARED)


def server_gpus(store: RunStore) -> dict[str, str]:
    """server name -> the GPUs it logs when ready (a shared step's servers)."""
    text = (store.logs_dir / "shared.log").read_text().rsplit("=== ", 1)[-1]
    return dict(re.findall(r"(server\d+) INFO engine ready .*GPUs (\S+)\)", text))


def test_shared_layout_runs_a_server_and_a_trainer_rank_on_each_gpu_of_one_node(shared_one_node,
                                                                                  two_ranks_one_node) -> None:
    store, job = shared_one_node
    rows = sacct_rows(job)
    assert len({n for r in rows if r["nodes"] for n in hostnames(r["nodes"])}) == 1, rows
    # One step of 4 tasks, a CPU each (Slurm divides the node's CPUs between the servers and the
    # ranks), and the orchestrator's step beside it.
    assert step_cpus(job) == {"deepscaler.slurm.shared_task": 4, "deepscaler.orchestrator": 1}
    # Each GPU is named by a server and by a trainer rank: rank r and server r share GPU r.
    ranks = rank_details(store, "shared")
    servers = server_gpus(store)
    assert sorted(ranks) == [0, 1] and sorted(servers) == ["server0", "server1"], (ranks, servers)
    assert {ranks[r][2] for r in (0, 1)} == {"0", "1"}, ranks
    assert [servers[f"server{r}"] for r in (0, 1)] == [ranks[r][2] for r in (0, 1)], (servers, ranks)
    # Start order: every rank started after both servers were ready (vLLM sizes its KV cache
    # from the memory free when it starts).
    log = (store.logs_dir / "shared.log").read_text().rsplit("=== ", 1)[-1]
    assert max(log.index(f"server{i} INFO serving on") for i in (0, 1)) < min(
        log.index(f"trainer rank {r} of 2") for r in (0, 1)), log[-3000:]
    # The servers stopped by themselves once the trainer had finished: the step ended well.
    assert "stopping (the trainer has finished)" in log and "CANCELLED" not in log
    assert differing(store, two_ranks_one_node, STEPS) == []
    assert differing(store, store, STEPS, STEPS - 1), "the last step changed nothing: the comparison proves nothing"


def test_shared_layout_over_two_nodes_matches_the_split_layout(slurm_cluster, tmp_path, two_ranks_one_node) -> None:
    """Stage 2 and 3's shared shape: nodes of one GPU each (slurm.gpus_per_node_max=1), so the
    pool is 2 nodes, each GPU a server and a rank; ranks meet across nodes over gloo."""
    with contextlib.closing(completed_job(tmp_path, "shared layout, two nodes", *SHARED,
                                          "slurm.gpus_per_node_max=1")) as jobs:  # closing: the job is cancelled
        store, job = next(jobs)
        nodes = hostnames(sacct_rows(job)[0]["nodes"])
        assert len(nodes) == 2, nodes
        ranks = rank_details(store, "shared")
        assert [ranks[r][1] for r in (0, 1)] == nodes and {ranks[r][0] for r in (0, 1)} == {0}, (ranks, nodes)
        assert {ranks[r][2] for r in (0, 1)} == {"0"} and set(server_gpus(store).values()) == {"0"}
        assert differing(store, two_ranks_one_node, STEPS) == []
