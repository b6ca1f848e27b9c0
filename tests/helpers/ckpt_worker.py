"""A tiny DeepSpeed trainer for the checkpoint tests, in-process or as one rank of several.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... python tests/helpers/ckpt_worker.py train|resume STAGE OUT

``train``: 3 steps, checkpoint at step 3 (into OUT/run), 3 more steps; rank 0 writes the weights
at step 3 and at step 6 to OUT. ``resume``: a differently initialised engine loads the checkpoint
and runs the same 3 steps (OUT/resumed.safetensors), then another loads the weights only
(OUT/weights_only.safetensors). Last, every rank loads a copy whose rank_1 file is truncated:
each must raise (no rank may hang in a collective), and writes the error to OUT/error_<rank>.txt.
The tests compare the files.
Data comes from the global RNGs (python, numpy, torch), so only a restored RNG reproduces it.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=256)


def ds_config(stage: int, bf16: bool = False) -> dict:
    """The trainer's settings, fp32. The buckets are shrunk from 5e8 elements to 1e6 (still more
    than the model, so gradients group as before): under deterministic mode torch NaN-fills every
    ``torch.empty``, and ZeRO-1/2 allocate a fresh 2 GB bucket per micro-step (~0.8 s on CPU)."""
    buckets = {"reduce_bucket_size": 10**6, "allgather_bucket_size": 10**6} if stage in (1, 2) else {}
    if stage == 3:
        buckets = {"reduce_bucket_size": 10**6, "stage3_prefetch_bucket_size": 10**6}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, **buckets},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
    }


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def tiny_model(seed: int, **overrides):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**{**MODEL, **overrides})).float()


def warmup(update: int) -> float:
    """A schedule that changes over the test's steps, so the scheduler state matters."""
    return min(1.0, (update + 1) / 5)


def make_engine(stage: int, seed: int, *, bf16: bool = False, **overrides):
    """A fresh engine; ``seed`` sets the initial weights (tests pick a different one to resume).
    ``bf16``: bf16 weights with fp32 masters in the optimizer, as on GPU."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # else a 27 s g++ build
    model = tiny_model(seed, **overrides)
    if bf16:
        model = model.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config(stage, bf16))
    return engine


def train(engine, steps: int) -> None:
    """``steps`` updates on random tokens drawn from all three global RNGs."""
    vocab = engine.module.config.vocab_size
    for _ in range(steps):
        length = random.randint(6, 12)
        x = (torch.randint(0, vocab, (1, length)) + int(np.random.randint(0, vocab))) % vocab
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()


def full_params(engine) -> dict[str, torch.Tensor]:
    """The module's parameters, gathered under ZeRO-3 (a no-op for other stages)."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def main(mode: str, stage: int, out: str) -> None:
    import deepspeed

    from deepscaler.safetensors_io import save_tensors
    from deepscaler.store import RunStore
    from deepscaler.trainer.checkpoint import load_checkpoint, save_checkpoint
    from deepscaler.trainer.engine import close_distributed

    torch.use_deterministic_algorithms(True)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    rank = int(os.environ["RANK"])
    out_dir = Path(out)
    store = RunStore(out_dir, "run", 1)
    if mode == "train":
        seed_all(100 + rank)  # different data per rank: each rank's RNG must come back
        engine = make_engine(stage, seed=0)
        train(engine, 3)
        at3 = full_params(engine)
        save_checkpoint(store, 3, engine, scheduler=engine.lr_scheduler, progress={"cursor": 3})
        train(engine, 3)
        if rank == 0:
            save_tensors(out_dir / "at3.safetensors", at3)
            save_tensors(out_dir / "ref.safetensors", full_params(engine))
    elif mode == "resume":
        seed_all(7)
        path = store.step_dir("checkpoints", 3)
        engine = make_engine(stage, seed=1)
        state = load_checkpoint(path, engine, scheduler=engine.lr_scheduler)
        assert state["progress"] == {"cursor": 3}, state
        train(engine, 3)
        resumed = full_params(engine)
        weights_only = make_engine(stage, seed=2)
        load_checkpoint(path, weights_only, load_optimizer=False, restore_rng=False)
        loaded = full_params(weights_only)
        if rank == 0:
            save_tensors(out_dir / "resumed.safetensors", resumed)
            save_tensors(out_dir / "weights_only.safetensors", loaded)
            broken = out_dir / "broken"
            shutil.copytree(path, broken)
            victim = broken / "rank_1.safetensors"
            victim.write_bytes(victim.read_bytes()[:100])
        torch.distributed.barrier()
        try:
            load_checkpoint(out_dir / "broken", engine)
        except Exception as err:  # noqa: BLE001 - the test checks type and message
            (out_dir / f"error_{rank}.txt").write_text(f"{type(err).__name__}: {err}")
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    torch.distributed.barrier()
    close_distributed()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
