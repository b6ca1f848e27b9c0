"""Pickle-free checkpoints with real DeepSpeed on CPU (gloo): resume must be bit-identical.

Each ZeRO stage trains 3 steps, checkpoints, trains 3 more; a differently initialised engine
with scrambled RNGs loads the checkpoint and must land on exactly the same weights.
"""

from __future__ import annotations

import enum
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from deepscaler.safetensors_io import load_tensors
from deepscaler.store import STABLE, CorruptFileError, RunStore, StepExists
from deepscaler.trainer.checkpoint import (CheckpointError, CheckpointMismatch, _decode_tree, _encode_tree,
                                           load_checkpoint, load_model_weights, save_checkpoint)
from deepscaler.trainer.engine import free_port
from tests.helpers.ckpt_worker import full_params, make_engine, seed_all, tiny_model, train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path):
    return RunStore(tmp_path, "run", 1)


def assert_bit_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{k} differs"


def assert_one_line(err: pytest.ExceptionInfo, *parts: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, msg


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_resume_is_bit_identical(dist, store, stage):
    import deepspeed

    seed_all(0)
    a = make_engine(stage, seed=0)
    train(a, 3)
    at3 = full_params(a)
    path = save_checkpoint(store, 3, a, scheduler=a.lr_scheduler, progress={"epoch": 0, "cursor": 12})
    assert path == store.step_dir("checkpoints", 3)
    assert sorted(os.listdir(path)) == [STABLE, "model.safetensors", "rank_0.json", "rank_0.safetensors",
                                        "trainer_state.json"]
    train(a, 3)
    ref, ref_lr = full_params(a), a.lr_scheduler.get_last_lr()

    seed_all(12345)  # scrambled RNGs: only a restored RNG draws the same data for steps 4-6
    b = make_engine(stage, seed=1)  # and different initial weights
    assert not torch.equal(full_params(b)["lm_head.weight"], at3["lm_head.weight"])
    state = load_checkpoint(path, b, scheduler=b.lr_scheduler)
    assert state["step"] == 3 and state["world_size"] == 1 and state["zero_stage"] == stage
    assert state["progress"] == {"epoch": 0, "cursor": 12}
    assert_bit_equal(full_params(b), at3)
    train(b, 3)
    assert_bit_equal(full_params(b), ref)
    assert b.lr_scheduler.get_last_lr() == ref_lr and b.global_steps == a.global_steps == 6

    # The rank-independent weights: a plain Hugging Face model, no DeepSpeed.
    plain = tiny_model(seed=2)
    load_model_weights(path, plain)
    assert_bit_equal({n: p.detach() for n, p in plain.named_parameters()}, at3)

    # Weights only (stage K+1 init): the fp32 masters are re-derived from the loaded weights.
    c = make_engine(stage, seed=3)
    load_checkpoint(path, c, load_optimizer=False, restore_rng=False)
    assert_bit_equal(full_params(c), at3)
    if stage:
        masters = {n: deepspeed.utils.safe_get_full_fp32_param(p) for n, p in c.module.named_parameters()}
        assert_bit_equal(masters, at3)


def fp32_masters(engine) -> dict:
    """The optimizer's fp32 master weights behind bf16 params (full, per parameter name)."""
    import deepspeed

    names = [n for n, _ in engine.module.named_parameters()]
    if engine.zero_optimization_stage() == 0:  # the unfused bf16 wrapper: masters beside the params
        return {n: m.detach().clone() for n, m in zip(names, engine.optimizer.fp32_groups[0])}
    return {n: deepspeed.utils.safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_bf16_resume_restores_the_fp32_masters(dist, store, stage):
    """The GPU setting: bf16 weights, fp32 masters. model.safetensors holds the masters."""
    seed_all(0)
    a = make_engine(stage, seed=0, bf16=True)
    train(a, 3)
    masters3, weights3 = fp32_masters(a), full_params(a)
    path = save_checkpoint(store, 3, a, scheduler=a.lr_scheduler, progress={})
    saved = load_tensors(path / "model.safetensors")
    assert_bit_equal(saved, masters3)
    assert any(not torch.equal(saved[k], weights3[k].float()) for k in saved)  # more than bf16 precision
    train(a, 3)
    ref, ref_masters = full_params(a), fp32_masters(a)

    seed_all(12345)
    b = make_engine(stage, seed=1, bf16=True)
    load_checkpoint(path, b, scheduler=b.lr_scheduler)
    assert_bit_equal(full_params(b), weights3)
    train(b, 3)
    assert_bit_equal(full_params(b), ref)
    assert_bit_equal(fp32_masters(b), ref_masters)


@pytest.fixture
def stage0_checkpoint(dist, store):
    """A stage-0 checkpoint of the 64-wide model after one step (the cheapest real one)."""
    seed_all(0)
    engine = make_engine(0, seed=0)
    train(engine, 1)
    return save_checkpoint(store, 1, engine, scheduler=engine.lr_scheduler, progress={})


def test_different_model_shape_is_a_one_line_error_naming_file_and_key(stage0_checkpoint):
    narrow = make_engine(0, seed=0, hidden_size=32)
    before = full_params(narrow)
    with pytest.raises(CheckpointMismatch) as err:
        load_checkpoint(stage0_checkpoint, narrow, scheduler=narrow.lr_scheduler)
    assert_one_line(err, "model.safetensors", "model.embed_tokens.weight", "different model shape")
    assert_bit_equal(full_params(narrow), before)  # checked before anything was touched
    with pytest.raises(CheckpointMismatch) as err:
        load_model_weights(stage0_checkpoint, tiny_model(0, hidden_size=32))
    assert_one_line(err, "model.safetensors", "different model shape")


def test_other_zero_stage_needs_load_optimizer_false(stage0_checkpoint):
    engine = make_engine(1, seed=5)
    with pytest.raises(CheckpointMismatch) as err:
        load_checkpoint(stage0_checkpoint, engine)
    assert_one_line(err, "ZeRO stage 0", "ZeRO stage 1", "checkpoint.load_optimizer=false")
    load_checkpoint(stage0_checkpoint, engine, load_optimizer=False, restore_rng=False)
    plain = tiny_model(seed=2)
    load_model_weights(stage0_checkpoint, plain)
    assert_bit_equal(full_params(engine), {n: p.detach() for n, p in plain.named_parameters()})


@pytest.mark.parametrize("name", ["rank_0.safetensors", "model.safetensors"])
def test_truncated_file_is_a_one_line_error_naming_it(stage0_checkpoint, name):
    f = stage0_checkpoint / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    engine = make_engine(0, seed=5)
    before = full_params(engine)
    with pytest.raises(CorruptFileError) as err:
        load_checkpoint(stage0_checkpoint, engine)
    assert_one_line(err, str(f), "truncated")
    assert_bit_equal(full_params(engine), before)


def test_corrupt_file_of_the_right_size_is_a_one_line_error_naming_it(stage0_checkpoint):
    f = stage0_checkpoint / "rank_0.safetensors"
    data = bytearray(f.read_bytes())
    data[:16] = b"\xff" * 16  # a garbage header length: the manifest size still matches
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError) as err:
        load_checkpoint(stage0_checkpoint, make_engine(0, seed=5))
    assert_one_line(err, str(f), "corrupt")


def test_unfinished_checkpoint_is_refused(stage0_checkpoint):
    (stage0_checkpoint / STABLE).unlink()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(stage0_checkpoint, make_engine(0, seed=5))
    assert_one_line(err, "STABLE")


def test_a_published_step_is_not_overwritten(stage0_checkpoint, store):
    with pytest.raises(StepExists):
        save_checkpoint(store, 1, make_engine(0, seed=5), progress={})


def test_works_without_torch_distributed(store, monkeypatch):
    """A lone rank with a plain torch optimizer needs no process group. Simulated: "no process
    group", since other tests of this process may have started one (``dist``)."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)

    def engine(seed):
        model = tiny_model(seed)
        return SimpleNamespace(module=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))

    def step(e):
        x = torch.randint(0, 256, (1, 8))
        e.module(input_ids=x, labels=x).loss.backward()
        e.optimizer.step()
        e.optimizer.zero_grad()

    a = engine(0)
    step(a)
    path = save_checkpoint(store, 1, a, progress={"cursor": 1})
    step(a)
    b = engine(1)
    assert load_checkpoint(path, b)["progress"] == {"cursor": 1}
    step(b)
    assert_bit_equal(dict(b.module.named_parameters()), dict(a.module.named_parameters()))


class Stage(enum.IntEnum):
    TWO = 2


def test_state_tree_round_trip_keeps_types_and_takes_objects_from_the_live_tree(tmp_path):
    scaler = object()
    tree = {"state": {0: {"step": torch.tensor(3.0), "m": torch.ones(4)}}, "groups": [{"betas": (0.9, 0.99)}],
            "stage": Stage.TWO, "loss": math.nan, "none": None, "scaler": scaler, "version": "0.19.8"}
    tensors: dict = {}
    node = _encode_tree(tree, "opt", tensors)
    node = json.loads(json.dumps(node))  # what the file holds
    live = {"scaler": scaler, "state": {}}
    out = _decode_tree(node, live, tensors, tmp_path / "f", "")
    assert out["state"][0]["m"] is tensors["opt/state/0/m"] and list(out["state"]) == [0]
    assert out["groups"][0]["betas"] == (0.9, 0.99) and out["stage"] == 2 and math.isnan(out["loss"])
    assert out["scaler"] is scaler and out["none"] is None and out["version"] == "0.19.8"
    with pytest.raises(CheckpointMismatch) as err:  # a live tensor of another shape
        _decode_tree(node, {"scaler": scaler, "state": {0: {"m": torch.ones(5)}}}, tensors, tmp_path / "f", "")
    assert_one_line(err, str(tmp_path / "f"), "opt/state/0/m", "different model shape")
    with pytest.raises(CheckpointError, match="not stored"):
        _decode_tree(node, {}, tensors, tmp_path / "f", "")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_resume_is_bit_identical(dist, tmp_path, stage):
    """Save at world size 2, resume in fresh processes at world size 2: bit-identical."""

    def launch(mode: str) -> None:
        port = str(free_port())
        procs = []
        for rank in range(2):
            env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": port, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
            procs.append(subprocess.Popen(
                [sys.executable, str(REPO / "tests/helpers/ckpt_worker.py"), mode, str(stage), str(tmp_path)],
                env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs = [p.communicate(timeout=240)[0] for p in procs]
        for p, out in zip(procs, outs):
            assert p.returncode == 0, out[-3000:]

    launch("train")
    launch("resume")
    at3 = load_tensors(tmp_path / "at3.safetensors")
    assert_bit_equal(load_tensors(tmp_path / "resumed.safetensors"), load_tensors(tmp_path / "ref.safetensors"))
    assert_bit_equal(load_tensors(tmp_path / "weights_only.safetensors"), at3)
    for rank in range(2):  # a bad file on rank 1 fails both ranks, with rank 1's one-line message
        error = (tmp_path / f"error_{rank}.txt").read_text()
        assert "rank_1.safetensors" in error and "truncated" in error and "\n" not in error, error

    # Back at world size 1: the partitioned optimizer state does not fit, the weights do.
    path = RunStore(tmp_path, "run", 1).step_dir("checkpoints", 3)
    assert sorted(p.name for p in path.glob("rank_*")) == ["rank_0.json", "rank_0.safetensors",
                                                             "rank_1.json", "rank_1.safetensors"]
    engine = make_engine(stage, seed=4)
    with pytest.raises(CheckpointMismatch) as err:
        load_checkpoint(path, engine)
    assert_one_line(err, "world size 2", "world size 1", "checkpoint.load_optimizer=false")
    load_checkpoint(path, engine, load_optimizer=False)
    assert_bit_equal(full_params(engine), at3)
