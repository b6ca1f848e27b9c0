"""The DeepSpeed side of training: ranks, the engine, log-probs of packed rows, one update.

Why these pieces live together: they are the only code that knows about devices, ZeRO and
collectives. The loop in ``train.py`` calls them and stays readable; the loss in ``loss.py``
stays pure.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch.utils.checkpoint import checkpoint

from deepscaler.config import TrainerConfig
from deepscaler.process import visible_gpus
from deepscaler.trainer.loss import (grpo_loss, mismatch_metrics, token_log_probs, token_log_probs_and_entropy,
                                     truncated_is_weights)


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int  # the process's index on its node (torchrun's LOCAL_RANK, Slurm's SLURM_LOCALID)
    device: torch.device = torch.device("cpu")
    node: str = ""  # the Slurm node (SLURMD_NODENAME), else the host name

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self, env: dict) -> str:
        """Where this rank runs and whom it meets, one line per rank in the trainer's log: what
        a multi-node run is checked by (rank, local rank and node of every rank)."""
        return (f"trainer rank {self.rank} of {self.world_size}: local rank {self.local_rank} on node {self.node}, "
                f"device {self.device}, GPUs {visible_gpus()}, "
                f"rendezvous {env.get('MASTER_ADDR', '-')}:{env.get('MASTER_PORT', '-')}")


def free_port() -> int:
    """A TCP port free on this host now (a single rank's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cuda_device_index(local_rank: int, visible: int) -> int:
    """The visible GPU a trainer rank computes on.

    Under ``srun --gpus-per-task=1`` Slurm binds one GPU to each task (``--gpu-bind=per_task:1``),
    numbered 0 whatever the task's local rank; under torchrun, or srun with the node's GPUs
    shared by its tasks (what ``deepscaler.slurm.stage_job`` asks for), every rank sees them all and takes
    the one at its local rank. Both work; anything else is a launch error worth one line.
    """
    if visible == 1:
        return 0
    if 0 <= local_rank < visible:
        return local_rank
    raise RuntimeError(f"trainer rank with local rank {local_rank} sees {visible} GPU(s) "
                       f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): give each task "
                       "one GPU, or every task all of the node's GPUs")


def resolve_ranks(env: dict, cuda_devices: int) -> Dist:
    """Rank, world size, local rank and device from torchrun's variables, else Slurm's, else a
    single rank; ``cuda_devices`` is how many GPUs this process sees (0: CPU). Fills in the
    variables torch.distributed and DeepSpeed read. LOCAL_RANK is set to the device index:
    DeepSpeed takes it as one (``set_device(LOCAL_RANK)``, ZeRO-3 partitions on
    ``cuda:$LOCAL_RANK``), so a task bound to one GPU must say 0 there."""
    if "RANK" not in env and "SLURM_PROCID" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env.get("SLURM_NTASKS", "1")
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_RANK", "0")
    if env["WORLD_SIZE"] == "1":
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(env["LOCAL_RANK"])
    device = torch.device("cpu")
    if cuda_devices:
        device = torch.device("cuda", cuda_device_index(local_rank, cuda_devices))
        env["LOCAL_RANK"] = str(device.index)
    return Dist(int(env["RANK"]), int(env["WORLD_SIZE"]), local_rank, device, node_name(env))


def node_name(env=os.environ) -> str:
    """The Slurm node a process runs on (``SLURMD_NODENAME``), else the host's name."""
    return env.get("SLURMD_NODENAME") or socket.gethostname()


def init_distributed() -> Dist:
    """Join the trainer's process group (gloo on CPU, nccl on GPU) on this rank's device.

    The rendezvous address must already be in MASTER_ADDR and MASTER_PORT for multi-rank runs
    (torchrun and the Slurm launcher set them).
    """
    from deepscaler.cuda_preflight import require

    require()  # an old NVIDIA driver makes torch.cuda.is_available() False: refuse, don't go to the CPU
    import deepspeed  # its import asks torch.cuda already

    dist = resolve_ranks(os.environ, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if dist.device.type == "cuda":
        torch.cuda.set_device(dist.device)  # before the group: NCCL binds its communicator to it
    # DeepSpeed otherwise compiles a shared-memory op with g++ on first use (27 s, CPU only).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch_dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if dist.device.type == "cuda" else "gloo")
    return dist


def close_distributed(together: bool = False) -> None:
    """Leave the process group before exit. A group left to the interpreter's shutdown can
    abort the process ("terminate called without an active exception", exit -6), seen once in
    CI at the end of a 2-rank ZeRO-3 run whose work had succeeded. So can a rank that leaves
    while another still works: rank 1 of a 2-node Slurm run aborted so while rank 0 wrote the
    last step's metrics, and ``srun --kill-on-bad-exit`` failed the stage. ``together`` (after
    success only: a failed rank must not wait for ranks that wait for it) first waits for every
    rank, so all leave at once."""
    if torch_dist.is_initialized():
        if together and torch_dist.get_world_size() > 1:
            torch_dist.barrier()
        torch_dist.destroy_process_group()


def use_bf16(tc: TrainerConfig) -> bool:
    """bf16 on GPU, fp32 on CPU (``precision: auto``)."""
    if tc.precision == "auto":
        return torch.cuda.is_available()
    return tc.precision == "bf16"


# DeepSpeed's default ZeRO bucket size, in elements.
BUCKET_ELEMENTS = 500_000_000


def deepspeed_config(tc: TrainerConfig, n_params: int) -> dict:
    """The DeepSpeed JSON. Gradient accumulation is ours: the number of packed micro-batches
    varies per step, so ``step()`` is the boundary (unmanaged accumulation).

    ZeRO's gradient buckets are allocated afresh at every backward pass; a bucket larger than
    the model is never filled, so it is capped at the model's size (the tiny model's step
    otherwise spends 0.4 s allocating two 2-GB buckets)."""
    bucket = min(BUCKET_ELEMENTS, n_params)
    zero: dict = {"stage": tc.deepspeed.zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if tc.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": tc.optimizer.grad_clip,
        "zero_optimization": zero,
        # We pass torch's AdamW: DeepSpeed's own Adam would compile a CPU op (41 s) on CPU.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": use_bf16(tc)},
        "steps_per_print": 2**31 - 1,
    }


def lr_lambda(tc: TrainerConfig, total_steps: int):
    """Multiplier of the base lr per optimizer update: warmup, then constant or cosine."""
    import math

    warmup, kind = tc.optimizer.warmup_steps, tc.optimizer.scheduler

    def fn(update: int) -> float:
        if warmup and update < warmup:
            return (update + 1) / warmup
        if kind == "cosine" and total_steps > warmup:
            progress = min(1.0, (update - warmup) / (total_steps - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return fn


def build_engine(model, tc: TrainerConfig, total_updates: int):
    """Wrap ``model`` with DeepSpeed ZeRO, torch AdamW and the lr schedule."""
    import deepspeed

    if tc.deepspeed.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # transformers checkpoints a layer only in training mode, and from_pretrained returns the
    # model in eval mode: without this, activation checkpointing is silently off.
    model.train()
    # The policy's forward must run through ``engine(...)``: DeepSpeed's forward opens the
    # ZeRO backward bookkeeping (ZeRO-3 otherwise overwrites, instead of accumulating, the
    # gradients of every micro-batch but the last). So the engine's module computes what the
    # loss needs, per-token log-probs of a packed row, instead of [T, V] logits.
    model.forward = functools.partial(packed_log_probs, model)
    opt = tc.optimizer
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc, total_updates))
    config = deepspeed_config(tc, n_params=sum(p.numel() for p in model.parameters()))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine


def apply_optimizer_config(engine, tc: TrainerConfig) -> None:
    """Set the config's optimizer hyperparameters after an optimizer state was loaded from a
    checkpoint. The state brings the moments and the schedule's position, but also the lr, betas,
    eps and weight decay the checkpoint was trained with; run.yaml is what runs (a resume with
    ``--allow-config-change trainer.optimizer.lr=...`` must train with the new lr). Values that
    did not change are set to themselves, computed as the schedule does: a resume stays bit-exact."""
    opt, sched = tc.optimizer, engine.lr_scheduler
    groups = sched.optimizer.param_groups
    sched.base_lrs = [opt.lr] * len(groups)
    lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(groups, lrs):
        group.update(lr=lr, initial_lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay)
    sched._last_lr = lrs  # what get_last_lr() reports until the next update


def packed_log_probs(model, batch, temperature: float, *, entropy: bool, chunk_tokens: int = 2048):
    """Per-token log-probs of ``batch.targets`` (and entropies, if asked) for one packed row.

    The row's sequence boundaries reach the attention kernel as ``cu_seq_lens`` (varlen
    kernels) or as restarting ``position_ids`` (sdpa/eager build a block mask from them); see
    ``trainer/attention.py``. ``use_cache=False`` is required for the latter (packing.py).
    The vocabulary projection runs in checkpointed chunks of ``chunk_tokens``
    (``trainer.logits_chunk_tokens``): a ``[T, V]`` float32 logits tensor for T = 24576 and
    V = 151936 would take 15 GB.
    """
    hidden = model.model(**batch.model_inputs()).last_hidden_state
    head = model.get_output_embeddings()

    def chunk(h, targets):
        if entropy:
            return token_log_probs_and_entropy(head(h), targets, temperature)
        return token_log_probs(head(h), targets, temperature), None

    logps, ents = [], []
    for start in range(0, hidden.shape[1], chunk_tokens):
        h = hidden[:, start : start + chunk_tokens]
        t = batch.targets[:, start : start + chunk_tokens]
        if torch.is_grad_enabled():
            lp, ent = checkpoint(chunk, h, t, use_reentrant=False)
        else:
            lp, ent = chunk(h, t)
        logps.append(lp)
        ents.append(ent)
    logp = torch.cat(logps, dim=1)
    return logp, (torch.cat(ents, dim=1) if entropy else None)


@dataclass
class UpdateStats:
    """Sums over one optimizer update: the loss terms already divided by the mini-batch token
    count, the others weighted by each micro-batch's loss tokens (divide by ``loss_tokens``)."""

    pg_loss: float = 0.0
    kl: float = 0.0
    entropy: float = 0.0
    clip_fraction: float = 0.0  # times loss tokens
    ratio: float = 0.0  # mean ratio times loss tokens
    loss_tokens: int = 0
    tokens: int = 0


def prepare(forward, ref_model, batches, tc: TrainerConfig, temperature: float, tis_cap: float | None) -> dict:
    """What the step's updates need from the policy as it is before the first of them, per
    micro-batch, without grad: the reference model's log-probs (the KL term), the policy's own
    log-probs (the ratio's base with ``trainer.loss.old_logprobs: trainer``, computed in the
    same packed rows as the updates, so the first update's ratio is exactly 1) and the truncated
    importance weights. The step's extra cost is the policy's forward. Returns this rank's sums
    of the mismatch and TIS statistics as 0-dim tensors (weighted by loss tokens;
    ``mismatch_max`` a max), empty when no old log-probs were computed."""
    lc = tc.loss
    need_ref = lc.kl_type != "none" and lc.kl_coef != 0.0
    need_old = lc.old_logprobs == "trainer" or tis_cap is not None
    sums: dict = {}
    with torch.no_grad():
        for b in batches:
            if need_ref:
                b.ref_logp, _ = packed_log_probs(ref_model, b, temperature, entropy=False,
                                                 chunk_tokens=tc.logits_chunk_tokens)
            if not need_old:
                continue
            b.old_logp, _ = forward(b, temperature, entropy=False, chunk_tokens=tc.logits_chunk_tokens)
            n = b.loss_mask.sum().float()
            stats = mismatch_metrics(b.old_logp, b.behaviour_logp, b.loss_mask)
            if tis_cap is not None:
                b.tis_weight, tis = truncated_is_weights(b.old_logp, b.behaviour_logp, b.loss_mask, tis_cap,
                                                         lc.tis_mode, b.segments)
                stats.update(tis)
            sums["loss_tokens"] = sums.get("loss_tokens", 0) + n
            for k, v in stats.items():
                if k == "mismatch_max":
                    sums[k] = torch.maximum(sums[k], v) if k in sums else v
                else:
                    sums[k] = sums.get(k, 0) + v * n
    return sums


def micro_batch_loss(forward, batch, tc: TrainerConfig, temperature: float, denominator: float):
    """The GRPO loss of one packed micro-batch and its metrics, from the policy's log-probs and
    entropies through ``forward`` (the DeepSpeed engine in :func:`update`; ``deepscaler.plan``
    traces the same code with the bare model) and what :func:`prepare` left on the batch.
    The caller runs backward."""
    lc = tc.loss
    logp, ent = forward(batch, temperature, entropy=True, chunk_tokens=tc.logits_chunk_tokens)
    old = batch.old_logp if lc.old_logprobs == "trainer" else batch.behaviour_logp
    return grpo_loss(logp, old, batch.advantages, batch.loss_mask, batch.ref_logp, ent,
                     clip_low=lc.clip_ratio_low, clip_high=lc.clip_ratio_high, clip_ratio_c=lc.clip_ratio_c,
                     weights=batch.tis_weight, kl_coef=lc.kl_coef, kl_type=lc.kl_type,
                     entropy_coef=lc.entropy_coef, denominator=denominator)


def update(engine, batches, total_loss_tokens: int, tc: TrainerConfig, temperature: float, world_size: int):
    """One optimizer update over this rank's packed micro-batches of one mini-batch (after
    :func:`prepare` for the step).

    Every token of the mini-batch (all ranks) weighs 1 / ``total_loss_tokens``: the loss of a
    micro-batch is its token sum divided by that, times the world size because DeepSpeed
    averages gradients over ranks. So micro-batch and rank boundaries do not change the
    gradient: it is the token-mean of the whole mini-batch, as in the recipe.
    """
    denominator = max(total_loss_tokens, 1) / world_size
    stats = UpdateStats()
    for batch in batches:
        loss, m = micro_batch_loss(engine, batch, tc, temperature, denominator)
        engine.backward(loss, scale_wrt_gas=False)
        n = float(m["num_tokens"])
        stats.pg_loss += float(m["pg_loss"])
        stats.kl += float(m["kl"])
        stats.entropy += float(m["entropy"])
        stats.clip_fraction += float(m["clip_fraction"]) * n
        stats.ratio += float(m["ratio_mean"]) * n
        stats.loss_tokens += int(n)
        stats.tokens += int(batch.num_tokens)
    engine.step()
    return stats


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum floats over the trainer ranks (identity on one rank)."""
    return _all_reduce(values, "SUM")


def max_over_ranks(value: float) -> float:
    """The largest of a float over the trainer ranks (itself on one rank)."""
    return _all_reduce([value], "MAX")[0]


def _all_reduce(values: list[float], op: str) -> list[float]:
    if not torch_dist.is_initialized() or torch_dist.get_world_size() == 1:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch_dist.all_reduce(t, op=getattr(torch_dist.ReduceOp, op))
    return t.tolist()
