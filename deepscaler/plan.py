"""``python -m deepscaler.plan``: whether a stage fits its GPUs, and what it costs, before it
holds them.

    python -m deepscaler.plan --stage 1 [--preset P] [--json] [--gpu-tflops 989 --mfu 0.35 ...] [key=value ...]

Trainer memory per GPU is not a hand formula that drifts from the code: one micro-batch of the
trainer's own code (the step's reference and old-log-prob passes, the packed log-probs with
the configured attention kernel, checkpointing and logits chunks, the GRPO loss, backward)
runs on the meta device at
the configured model shape, and a dispatch mode adds up the bytes of every tensor alive at
each moment (:class:`PeakMemory`). Gradients are dropped as they land, as ZeRO reduces them
into partitions. The model states ZeRO partitions over the trainer's ranks are added by the
ZeRO paper's accounting: bf16 weights and gradients, fp32 master weights and Adam moments
(12 bytes per parameter), each divided by the ranks at the configured stage, plus
DeepSpeed's gradient bucket.

Inference memory is vLLM's: weights, then the KV cache in what ``gpu_memory_utilization``
leaves, as a count of sequences of ``max_model_len`` at once. Time is FLOPs and decode tokens
over stated, overridable assumptions. ``submit`` runs the plan and refuses a stage that does
not fit (``--force`` overrides). The last line of ``--json`` is one JSON object.

Layouts: the plan also compares every way the jobs can use the stage's GPUs (``shared``: each
GPU serves then trains; ``split S+T``), with each one's step time, busy fraction, GPU-hours and
whether it fits, and names the one with the fewest GPU-hours (``chosen``). ``submit`` runs
``slurm.layout`` as :func:`resolve_layout` resolves it (``auto``: the chosen one).
``--write-docs`` regenerates the table of the default stages in docs/cluster.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from deepscaler.config import (Config, ConfigError, parse_command_line, refuse_repeated_keys, shared_shape,
                               stage_config, stage_layout, trainer_ranks, validate)

GIB = 2**30
ADAM_BYTES = 12  # fp32 master weights and two fp32 Adam moments, per parameter
VLLM_OVERHEAD_GIB = 2.0  # vLLM's activations, CUDA graphs and allocator slack besides weights and KV


class PlanError(ConfigError):
    """A stage that does not fit. The message is one line and names the key to change."""


@dataclass
class Assumptions:
    """What the time estimate takes as given; each is a command-line flag."""

    gpu_tflops: float = 989.0  # dense bf16 peak of one GPU (H100/H200 SXM)
    mfu: float = 0.35  # the trainer's share of that peak (deepscaler/gpu_check.py measures it)
    decode_tok_s: float = 6000.0  # tokens/s one GPU generates with vLLM at this model and batch
    fs_gb_s: float = 1.0  # shared filesystem bandwidth for one weights step, write then read
    response_frac: float = 0.6  # mean response length as a fraction of sampling.max_response_tokens


# --------------------------------------------------------------------------- the trace


class PeakMemory(TorchDispatchMode):
    """Bytes of every tensor storage alive, and their peak, over the ops run inside it (on any
    device, the meta device included). Storages made before it started count once
    :meth:`track` sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.sizes:
            return
        self.sizes[key] = storage.nbytes()
        self.live += self.sizes[key]
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


class SyntheticRollout:
    """The flat tensors ``trainer.packing.pack`` reads: sequences of ``lengths`` tokens, each a
    prompt of ``prompt`` tokens and a response. Random tokens: a trace needs shapes only."""

    def __init__(self, lengths: list[int], vocab: int, prompt: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(0, vocab, (sum(lengths),), generator=g)
        self.seq_offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        self.prompt_lengths = [min(prompt, n - 1) for n in lengths]
        self.behaviour_logprobs = -torch.rand(sum(lengths), generator=g)
        self.advantages = torch.randn(len(lengths), generator=g)


def row_lengths(cfg: Config) -> list[int]:
    """The worst micro-batch: ``micro_batch_tokens`` filled with the stage's longest sequences
    (prompt + response), the last one shorter."""
    longest = cfg.data.max_prompt_tokens + cfg.sampling.max_response_tokens
    budget = max(cfg.trainer.micro_batch_tokens, longest)
    lengths = [longest] * (budget // longest)
    rest = budget - sum(lengths)
    return lengths + ([rest] if rest > cfg.data.max_prompt_tokens else [])


def build_model(config, dtype: torch.dtype, device: str, attn: str):
    from transformers import AutoModelForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    finally:
        torch.set_default_dtype(previous)


def trace_micro_batch(cfg: Config, config, lengths: list[int], *, device: str = "meta",
                      dtype: torch.dtype = torch.bfloat16, attn: str | None = None) -> dict[str, int]:
    """Bytes of one micro-batch of the trainer's update on ``device``: ``weights`` (the policy
    and the frozen reference model) and ``peak`` (everything alive at the worst moment, weights
    included). The step's passes without grad run first (``trainer.engine.prepare``), then the
    policy's forward, loss and backward.
    ``attn``: transformers' kernel name; default the one the trainer would pick on CUDA (on the
    meta device the varlen kernel's CUDA path is traced)."""
    from deepscaler.config import tis_cap
    from deepscaler.trainer import attention
    from deepscaler.trainer.engine import micro_batch_loss, packed_log_probs, prepare
    from deepscaler.trainer.packing import pack

    tc = cfg.trainer
    attn = attn or (attention.VARLEN if tc.attn_implementation in ("auto", "varlen", "flash_attention_2")
                    else attention.resolve(tc.attn_implementation, torch.device("cuda")))
    if attn == attention.VARLEN:
        attention.register()
    batch = pack(SyntheticRollout(lengths, config.vocab_size, cfg.data.max_prompt_tokens), range(len(lengths)))
    batch = batch.to(device)
    policy = build_model(config, dtype, device, attn)
    reference = build_model(config, dtype, device, attn).eval().requires_grad_(False)
    if tc.deepspeed.activation_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    for p in policy.parameters():  # ZeRO reduces each gradient into its partition as it lands
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    forward = functools.partial(packed_log_probs, policy)
    memory = PeakMemory()
    with memory:
        for t in [*policy.parameters(), *reference.parameters(), *policy.buffers(), *reference.buffers()]:
            memory.track(t)
        weights = memory.live
        prepare(forward, reference, [batch], tc, cfg.sampling.temperature, tis_cap(cfg))
        loss, _ = micro_batch_loss(forward, batch, tc, cfg.sampling.temperature, max(sum(lengths), 1))
        loss.backward()
        del loss
    return {"weights": weights, "peak": memory.peak}


# --------------------------------------------------------------------------- the plan




def zero_states(cfg: Config, n_params: int, ranks: int | None = None) -> dict[str, float]:
    """GiB per rank of what ZeRO partitions, besides the bf16 weights the trace holds: bf16
    gradients (partitioned from stage 2), fp32 master weights and Adam moments (partitioned
    from stage 1; in CPU memory with ``offload_optimizer``), DeepSpeed's gradient bucket.
    ``ranks``: the trainer's ranks (default the configured ones; a layout may have others)."""
    from deepscaler.trainer.engine import BUCKET_ELEMENTS

    ds, ranks = cfg.trainer.deepspeed, ranks or trainer_ranks(cfg)
    grads = 2 * n_params / (ranks if ds.zero_stage >= 2 else 1)
    optimizer = 0 if ds.offload_optimizer else ADAM_BYTES * n_params / (ranks if ds.zero_stage >= 1 else 1)
    bucket = 2 * min(BUCKET_ELEMENTS, n_params) if ds.zero_stage in (1, 2) else 0
    return {"gradients_gib": grads / GIB, "optimizer_gib": optimizer / GIB, "bucket_gib": bucket / GIB}


def model_flops(config, seq_lengths: list[int], forwards: int = 2) -> float:
    """Model FLOPs of one step's training over sequences of ``seq_lengths`` tokens: 6 per
    matmul parameter per token for the policy's forward and backward (N: every projection and
    the output layer; embedding lookups are free), and causal attention, whose forward costs
    2 L d T^2 per sequence (QK^T and AV over half the square), 3x that with the backward; plus
    ``forwards`` passes without grad (the reference model's, and the policy's old log-probs:
    :func:`step_forwards`). Recompute is not counted."""
    h, layers = config.hidden_size, config.num_hidden_layers
    kv = h // config.num_attention_heads * config.num_key_value_heads
    n = layers * (2 * h * h + 2 * h * kv + 3 * h * config.intermediate_size) + h * config.vocab_size
    tokens = sum(seq_lengths)
    attention_forward = 2.0 * layers * h * sum(t * t for t in seq_lengths)
    forward = 2.0 * n * tokens + attention_forward
    return 3 * forward + forwards * forward


def step_forwards(cfg: Config) -> int:
    """The passes without grad of each step (``trainer.engine.prepare``): the reference model's
    when the KL term is on, the policy's own when the ratio or TIS needs its old log-probs."""
    from deepscaler.config import tis_cap

    lc = cfg.trainer.loss
    return int(lc.kl_type != "none" and lc.kl_coef != 0.0) + int(lc.old_logprobs == "trainer" or
                                                               tis_cap(cfg) is not None)


def kv_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype_bytes


_TRACES: dict[tuple, dict[str, int]] = {}


def cached_trace(cfg: Config, config, lengths: list[int]) -> dict[str, int]:
    """:func:`trace_micro_batch` on the meta device, once per process for what it reads (the
    trainer's settings, the sampling temperature, the TIS cap, the prompt length, the model's
    shape and the row): plans that differ only in GPUs, steps or sampling counts share it."""
    from deepscaler.config import tis_cap

    key = (repr(cfg.trainer), cfg.sampling.temperature, tis_cap(cfg), cfg.data.max_prompt_tokens,
           config.to_json_string(), tuple(lengths))
    if key not in _TRACES:
        _TRACES[key] = trace_micro_batch(cfg, config, lengths)
    return dict(_TRACES[key])


def plan(cfg: Config, assume: Assumptions | None = None) -> dict[str, Any]:
    """Everything the planner says about a stage, as plain data (the JSON line)."""
    from deepscaler.hf_loading import model_config
    from deepscaler.inference.contract import max_model_len

    assume = assume or Assumptions()
    config = model_config(cfg)
    lengths = row_lengths(cfg)
    traced = cached_trace(cfg, config, lengths)
    n_params = sum(p.numel() for p in build_model(config, torch.bfloat16, "meta", "sdpa").parameters())
    states = zero_states(cfg, n_params)
    trainer = {"weights_gib": traced["weights"] / GIB,
               "activations_gib": (traced["peak"] - traced["weights"]) / GIB, **states}
    trainer_peak = traced["peak"] / GIB + sum(states.values())
    gpu_gib = cfg.slurm.gpu_memory_gib

    inf = cfg.inference
    weights_gib = 2 * n_params / GIB * 1 / inf.tensor_parallel
    seq_len = max_model_len(cfg)

    o, s = cfg.orchestrator, cfg.sampling
    samples = o.prompts_per_step * s.samples_per_prompt
    response = assume.response_frac * s.max_response_tokens
    prompt = cfg.data.max_prompt_tokens / 2
    seqs = [int(prompt + response)] * samples
    train_flops = (model_flops(config, seqs, 0) * cfg.trainer.ppo_epochs
                   + model_flops(config, seqs, step_forwards(cfg)) - model_flops(config, seqs, 0))
    inf_gpus, tr_gpus = split_gpus(cfg)
    pool, shared_why = pool_of(cfg)
    cost = StepCost(
        gpus=inf_gpus + tr_gpus, split=(inf_gpus, tr_gpus), pool=pool, shared_why=shared_why,
        configured=layout_name(cfg), tensor_parallel=inf.tensor_parallel, async_level=o.async_level,
        sample_gpu_s=samples * response / assume.decode_tok_s,
        train_gpu_s=train_flops / (assume.gpu_tflops * 1e12 * assume.mfu),
        sync_s=2 * 2 * n_params / (assume.fs_gb_s * 1e9),  # write bf16 weights, servers read them
        steps=cfg.run.max_steps or 0, gpu_gib=gpu_gib, samples=samples, seq_tokens=seq_len,
        kv_bytes_per_token=kv_bytes_per_token(config), server_weights_gib=weights_gib,
        trainer_gib=lambda ranks: traced["peak"] / GIB + sum(zero_states(cfg, n_params, ranks).values()))
    lays = layouts(cost)
    chosen, choice = choose(lays)
    mine = next(lay for lay in lays if lay["configured"])
    # a shared stage's servers run at the utilization resolve_layout gives them, not the yaml's
    util = mine["gpu_memory_utilization"] if mine["name"] == "shared" else inf.gpu_memory_utilization
    kv_gib = max(0.0, gpu_gib * util - weights_gib - VLLM_OVERHEAD_GIB)
    concurrent = int(kv_gib * GIB * inf.tensor_parallel // (kv_bytes_per_token(config) * seq_len))
    return {
        "stage": cfg.run.stage, "model": cfg.model.name, "params": n_params, "gpu_memory_gib": gpu_gib,
        "micro_batch": lengths, "trainer_ranks": trainer_ranks(cfg), "zero_stage": cfg.trainer.deepspeed.zero_stage,
        "activation_checkpointing": cfg.trainer.deepspeed.activation_checkpointing,
        "trainer": {k: round(v, 2) for k, v in trainer.items()}, "trainer_peak_gib": round(trainer_peak, 2),
        "inference": {"weights_gib": round(weights_gib, 2), "kv_cache_gib": round(kv_gib, 2),
                      "max_model_len": seq_len, "concurrent_sequences": concurrent},
        "time": {"sample_s": mine["sample_s"], "train_s": mine["train_s"], "weights_sync_s": round(cost.sync_s, 1),
                 "step_s": mine["step_s"], "steps": cost.steps, "hours": round(cost.steps * mine["step_s"] / 3600, 1),
                 "gpu_hours": mine["gpu_hours"], "gpus": mine["gpus"]},
        "assumptions": dataclasses.asdict(assume),
        "fits": mine["fits"],
        "async_level": o.async_level,
        "pool": pool,
        "layouts": lays,
        "configured": mine["name"],
        "components_split": split_name(inf_gpus, tr_gpus),
        "chosen": chosen,
        "choice": choice,
    }


# --------------------------------------------------------------------------- layouts

# The layouts a stage's GPUs can take. ``shared``: every GPU runs one server and one trainer
# rank, which take turns on-policy (sample, then train), as the paper's verl run did. Not called
# "colocated": that already names one node holding the servers and the trainer on disjoint GPUs
# (deepscaler/slurm/stage_job.py::layout). ``split S+T``: S GPUs serve and T train. Only layouts
# the jobs can run are listed; ``slurm.layout: auto`` runs the chosen one (resolve_layout, at submit).
SHARED_MARGIN_GIB = 4.0  # per shared GPU: a second CUDA context, and both processes' allocator slack
BUSY_WARNING = 0.70  # submit warns below this busy fraction


@dataclass
class StepCost:
    """One step of a stage, as the layouts' time and memory are computed from it."""

    gpus: int  # the stage's GPUs: inference + trainer
    split: tuple[int, int]  # (inference GPUs, trainer GPUs) of the components
    pool: tuple[int, int] | None  # (nodes, GPUs per node) the layouts share out; None: only the components' split
    shared_why: str | None  # why the shared layout cannot run on these components; None: it can
    configured: str  # the name of the configured layout
    tensor_parallel: int
    async_level: int
    sample_gpu_s: float  # GPU-seconds of one step's sampling (it scales with the serving GPUs)
    train_gpu_s: float  # GPU-seconds of one step's training (with the trainer's ranks)
    sync_s: float  # the weights hand-over, on no GPU's clock
    steps: int
    gpu_gib: float  # slurm.gpu_memory_gib
    samples: int  # sequences per step
    seq_tokens: int  # the longest a sequence can be (max_model_len)
    kv_bytes_per_token: int
    server_weights_gib: float  # per GPU
    trainer_gib: Callable[[int], float]  # a trainer rank's peak at this many ranks (ZeRO partitions)


def split_gpus(cfg: Config) -> tuple[int, int]:
    """(inference GPUs, trainer GPUs) of the components; a CPU component counts as one."""
    inf, tr = cfg.slurm.inference, cfg.slurm.trainer
    return max(1, inf.nodes * inf.gpus_per_node), tr.nodes * max(1, tr.gpus_per_node)


def split_name(serve: int, train: int) -> str:
    return f"split {serve}+{train}"


def layout_name(cfg: Config) -> str:
    """The plan's name of the layout a config runs: ``shared``, or its components' split."""
    return "shared" if stage_layout(cfg) == "shared" else split_name(*split_gpus(cfg))


def pool_of(cfg: Config) -> tuple[tuple[int, int] | None, str | None]:
    """The (nodes, GPUs per node) a stage's layouts share out (``config.shared_shape``), None
    when the components do not pool (only their own split can run); and why the shared layout
    cannot run on them, None when it can."""
    inf, tr, tp = cfg.slurm.inference, cfg.slurm.trainer, cfg.inference.tensor_parallel
    if not (inf.gpus_per_node and tr.gpus_per_node):
        return None, "shared: a component runs on CPU (slurm.inference.gpus_per_node or slurm.trainer.gpus_per_node 0)"
    try:
        pool = shared_shape(cfg)
    except ConfigError as e:
        return None, f"shared: {e}"
    if pool[1] % tp:
        return pool, (f"shared: inference.tensor_parallel ({tp}) must divide the GPUs per node of the shared "
                      f"stage ({pool[1]})")
    return pool, None


def _layout(c: StepCost, name: str, sample_s: float, train_s: float, step_s: float, busy: dict[str, float],
            fits: bool, why: str | None, **extra: Any) -> dict[str, Any]:
    busy_fraction = (c.sample_gpu_s + c.train_gpu_s) / (c.gpus * step_s)  # GPU-seconds busy / held
    return {"name": name, "gpus": c.gpus, "sample_s": round(sample_s, 1), "train_s": round(train_s, 1),
            "step_s": round(step_s, 1), "busy_fraction": round(busy_fraction, 3),
            "busy": {k: round(v, 3) for k, v in busy.items()},
            "gpu_hours": round(c.steps * step_s / 3600 * c.gpus, 1), "fits": fits, "why": why, **extra}


def split_layout(c: StepCost, serve: int, train: int) -> dict[str, Any]:
    """S GPUs serve, T train: synchronous (async_level 0) a step is sampling then training; from
    async_level 1 the two overlap, and the longer one sets the pace."""
    sample_s, train_s = c.sample_gpu_s / serve, c.train_gpu_s / train
    step_s = (sample_s + train_s if c.async_level == 0 else max(sample_s, train_s)) + c.sync_s
    trainer = c.trainer_gib(train)
    fits = trainer <= c.gpu_gib
    name = split_name(serve, train)
    why = None if fits else (
        f"{name}: a trainer rank of {train} needs {trainer:.1f} GiB, more than slurm.gpu_memory_gib "
        f"({c.gpu_gib:g}): give the trainer more GPUs (slurm.trainer.gpus_per_node, .nodes), set "
        "trainer.deepspeed.activation_checkpointing=true or lower trainer.micro_batch_tokens")
    return _layout(c, name, sample_s, train_s, step_s, {"inference": sample_s / step_s, "trainer": train_s / step_s},
                   fits, why, inference_gpus=serve, trainer_gpus=train, trainer_gib=round(trainer, 2))


def shared_layout(c: StepCost) -> dict[str, Any]:
    """Every GPU serves its share of the step's sequences, then trains as one of ``gpus`` ranks.
    Per GPU it holds the trainer rank's peak, the server's weights, the KV cache of all its
    sequences at full length at once, vLLM's overhead and :data:`SHARED_MARGIN_GIB`; the server's
    ``gpu_memory_utilization`` is its part (weights, KV cache, overhead) of the GPU. Components
    that do not pool (:func:`pool_of`) are listed as not fitting, with the reason."""
    tp, n = c.tensor_parallel, c.gpus
    per_server = -(-c.samples // max(1, n // tp))
    kv = per_server * c.seq_tokens * c.kv_bytes_per_token / tp / GIB
    trainer = c.trainer_gib(n)
    server = c.server_weights_gib + kv + VLLM_OVERHEAD_GIB
    total = trainer + server + SHARED_MARGIN_GIB
    fits = c.shared_why is None and total <= c.gpu_gib
    memory = {"trainer": trainer, "server_weights": c.server_weights_gib, "kv_cache": kv,
              "overhead": VLLM_OVERHEAD_GIB, "margin": SHARED_MARGIN_GIB, "total": total}
    why = c.shared_why or (None if fits else (
        f"shared: a GPU needs {total:.1f} GiB (trainer rank {trainer:.1f} + server weights {c.server_weights_gib:.1f} "
        f"+ KV cache {kv:.1f} for {per_server} sequences of {c.seq_tokens} tokens + vLLM {VLLM_OVERHEAD_GIB:g} + margin "
        f"{SHARED_MARGIN_GIB:g}), more than slurm.gpu_memory_gib ({c.gpu_gib:g}): lower orchestrator.prompts_per_step, "
        "sampling.samples_per_prompt, sampling.max_response_tokens or trainer.micro_batch_tokens, set "
        "trainer.deepspeed.activation_checkpointing=true, or add GPUs (slurm.inference.gpus_per_node, "
        "slurm.trainer.gpus_per_node, .nodes)"))
    sample_s, train_s = c.sample_gpu_s / n, c.train_gpu_s / n
    step_s = sample_s + train_s + c.sync_s  # the two phases take turns on every GPU, at any async_level
    return _layout(c, "shared", sample_s, train_s, step_s, {"all": (sample_s + train_s) / step_s}, fits, why,
                   inference_gpus=n, trainer_gpus=n,
                   gpu_memory_utilization=min(1.0, -(-round(server / c.gpu_gib * 1e4) // 100) / 100),
                   memory_gib={**{k: round(v, 2) for k, v in memory.items()}, "sequences_per_server": per_server})


def split_sizes(c: StepCost) -> list[int]:
    """The serving GPUs of each split the jobs can run: any number on one node (servers whole,
    ``tensor_parallel`` GPUs each); whole nodes per side on several, as a heterogeneous job's
    components never share a node; only the components' own when they do not pool."""
    if c.pool is None:
        return [c.split[0]]
    nodes, per_node = c.pool
    unit = 1 if nodes == 1 else per_node
    return [s for s in range(unit, c.gpus, unit) if s % c.tensor_parallel == 0]


def layouts(c: StepCost) -> list[dict[str, Any]]:
    """The shared layout, then every split the jobs can run (:func:`split_sizes`), the
    configured one marked."""
    out = [shared_layout(c), *(split_layout(c, s, c.gpus - s) for s in split_sizes(c))]
    for lay in out:
        lay["configured"] = lay["name"] == c.configured
    return out


def describe(lay: dict[str, Any]) -> str:
    if lay["name"] == "shared":
        what = f"{lay['gpus']} GPUs each serve then train"
    else:
        what = f"{lay['inference_gpus']} GPUs serve, {lay['trainer_gpus']} train"
    return f"{lay['name']}: {what}, {lay['gpu_hours']:.0f} GPU-hours (busy {lay['busy_fraction']:.0%})"


def choose(lays: list[dict[str, Any]]) -> tuple[str | None, str]:
    """The layout the plan recommends: the fitting one with the fewest GPU-hours (ties: the
    configured one), and one line that says why. ``slurm.layout: auto`` runs it
    (:func:`resolve_layout`)."""
    configured = next(lay for lay in lays if lay["configured"])
    fitting = [lay for lay in lays if lay["fits"]]
    if not fitting:
        return None, f"best layout: none fits; {configured['why']}"
    best = min(fitting, key=lambda lay: (lay["gpu_hours"], not lay["configured"]))
    if best is configured:
        return best["name"], (f"best layout: the configured {describe(best)}, the fewest of the {len(fitting)} "
                               "layouts that fit")
    return best["name"], (f"best layout: {describe(best)}, vs the configured {describe(configured)}"
                          + ("" if configured["fits"] else ", which does not fit"))


def named(p: dict[str, Any], name: str) -> dict[str, Any]:
    return next(lay for lay in p["layouts"] if lay["name"] == name)


def refusal(p: dict[str, Any], name: str | None = None) -> str | None:
    """Why the layout ``name`` (default the configured one) does not fit, in one line naming
    the keys to change; None when it fits."""
    lay = named(p, name or p["configured"])
    return None if lay["fits"] else f"stage {p['stage']}: {lay['why']}; --force submits anyway"


def resolve_layout(cfg: Config, p: dict[str, Any] | None = None) -> tuple[Config, str]:
    """The config a stage's jobs run, and one line saying which layout and why (submit prints
    it and writes the config to run.yaml). ``auto`` becomes the plan's chosen layout: ``shared``,
    or ``split`` with the components reshaped to its S + T GPUs (one node: S and T GPUs; several:
    S/G and T/G nodes of G), or the components' own split when none fits (submit refuses it).
    A shared stage's servers get the plan's ``gpu_memory_utilization``: at the yaml's, vLLM would
    take the memory of the trainer rank beside it. A CPU stage has no GPUs to share: unchanged.
    ``p``: the plan of ``cfg``, when the caller has it."""
    k, setting = cfg.run.stage, cfg.slurm.layout
    if not (cfg.slurm.inference.gpus_per_node or cfg.slurm.trainer.gpus_per_node):
        return cfg, f"stage {k}: split (no GPUs to share)"
    p = p or plan(cfg)
    if setting == "auto" and p["chosen"]:
        name = p["chosen"]
        why = f"slurm.layout auto: the fewest GPU-hours of the {sum(lay['fits'] for lay in p['layouts'])} that fit"
    else:
        name = p["configured"]
        why = f"slurm.layout {setting}" + (": none fits, so the components' own" if setting == "auto" else "")
    lay, source = named(p, name), f"stage {k} as {name}, by {why}"
    slurm, inference = cfg.slurm, cfg.inference
    if name == "shared":
        inference = dataclasses.replace(inference, gpu_memory_utilization=lay["gpu_memory_utilization"])
        slurm = dataclasses.replace(slurm, layout="shared")
        why += (f"; inference.gpu_memory_utilization {lay['gpu_memory_utilization']:.2f}: the server's weights, KV "
                "cache and vLLM's overhead, the rest of the GPU the trainer rank's")
    elif setting == "auto":
        inf, tr = slurm.inference, slurm.trainer
        if p["pool"]:
            nodes, per_node = p["pool"]
            shape = [(1, lay["inference_gpus"]), (1, lay["trainer_gpus"])] if nodes == 1 else [
                (lay["inference_gpus"] // per_node, per_node), (lay["trainer_gpus"] // per_node, per_node)]
            inf, tr = (dataclasses.replace(r, nodes=n, gpus_per_node=g) for r, (n, g) in zip((inf, tr), shape))
        slurm = dataclasses.replace(slurm, layout="split", inference=inf, trainer=tr)
    resolved = cfg
    if (slurm, inference) != (cfg.slurm, cfg.inference):
        resolved = dataclasses.replace(cfg, slurm=slurm, inference=inference)
        validate(resolved, source)
    line = f"stage {k}: {describe(lay)}, by {why}" + ("" if lay["fits"] else f"; DOES NOT FIT: {lay['why']}")
    return resolved, line


def busy_warning(p: dict[str, Any], name: str) -> str | None:
    """One line when the layout ``name`` would keep its GPUs busy less than
    :data:`BUSY_WARNING` of the time, naming a better layout and the key that runs it; None
    otherwise."""
    lay = named(p, name)
    if lay["busy_fraction"] >= BUSY_WARNING:
        return None
    text = f"stage {p['stage']}: {describe(lay)}: its GPUs would idle {1 - lay['busy_fraction']:.0%} of the time"
    best = p["chosen"]
    if best is None or best == name:
        return f"{text}; no layout that fits does better"
    key = "slurm.layout=shared (or auto)" if best == "shared" else "slurm.layout=auto"
    return f"{text}; {describe(named(p, best))} with {key}"


def table(p: dict[str, Any]) -> str:
    """The plan as a short table."""
    t, i, tm, a = p["trainer"], p["inference"], p["time"], p["assumptions"]
    row = "+".join(map(str, sorted(set(p["micro_batch"]), reverse=True)))
    lines = [
        f"# plan of stage {p['stage']}: {p['model']} ({p['params'] / 1e9:.2f} B parameters)",
        f"trainer, per GPU ({p['trainer_ranks']} rank(s), ZeRO-{p['zero_stage']}, activation checkpointing "
        f"{'on' if p['activation_checkpointing'] else 'off'}), one micro-batch of {sum(p['micro_batch'])} tokens "
        f"({len(p['micro_batch'])} sequence(s), {row}) traced on the meta device:",
        f"  weights (policy + reference, bf16) {t['weights_gib']:7.2f} GiB",
        f"  activations and transients         {t['activations_gib']:7.2f} GiB",
        f"  gradients (ZeRO share)             {t['gradients_gib']:7.2f} GiB",
        f"  optimizer (fp32 master + Adam)     {t['optimizer_gib']:7.2f} GiB",
        f"  gradient bucket                    {t['bucket_gib']:7.2f} GiB",
        f"  peak                               {p['trainer_peak_gib']:7.2f} GiB of {p['gpu_memory_gib']:g} "
        f"(slurm.gpu_memory_gib): {'fits' if p['trainer_peak_gib'] <= p['gpu_memory_gib'] else 'DOES NOT FIT'}",
        f"inference, per server: weights {i['weights_gib']:.2f} GiB, KV cache {i['kv_cache_gib']:.1f} GiB: "
        f"{i['concurrent_sequences']} sequences of max_model_len {i['max_model_len']} at once",
        f"time per step ({p['configured']}): sampling {tm['sample_s']:.0f} s + training {tm['train_s']:.0f} s "
        f"+ weights {tm['weights_sync_s']:.0f} s = {tm['step_s']:.0f} s; {tm['steps']} steps: {tm['hours']:.1f} h, "
        f"{tm['gpu_hours']:.0f} GPU-hours on {tm['gpus']} GPUs",
        f"assuming: {a['gpu_tflops']:g} TFLOP/s peak, MFU {a['mfu']:g}, {a['decode_tok_s']:g} decode tok/s per GPU, "
        f"{a['fs_gb_s']:g} GB/s filesystem, responses {a['response_frac']:g} x max_response_tokens on average",
        *layout_lines(p),
    ]
    return "\n".join(lines)


def shown_layouts(p: dict[str, Any], most: int = 8) -> list[dict[str, Any]]:
    """All layouts when they are few; else the shared one, the chosen, the best split, the
    configured one and the components' split (``--json`` has them all)."""
    lays = p["layouts"]
    if len(lays) <= most:
        return lays
    splits = [lay for lay in lays if lay["name"] != "shared" and lay["fits"]]
    best_split = min(splits, key=lambda lay: lay["gpu_hours"])["name"] if splits else None
    keep = {"shared", p["chosen"], p["configured"], best_split, p["components_split"]}
    return [lay for lay in lays if lay["name"] in keep]


def layout_lines(p: dict[str, Any]) -> list[str]:
    lays, shown = p["layouts"], shown_layouts(p)
    lines = [f"layouts of the {p['time']['gpus']} GPUs (orchestrator.async_level {p['async_level']}; "
             "busy: GPU-seconds at work over GPU-seconds held):",
             f"  {'layout':24} {'step':>7} {'busy':>5} {'GPU-hours':>10}  memory"]
    for lay in shown:
        name = lay["name"] + (" (configured)" if lay["configured"] else "")
        if lay["name"] == "shared":
            m = lay["memory_gib"]
            memory = (f"{m['total']:.1f} GiB per GPU: trainer {m['trainer']:.1f} + server {m['server_weights']:.1f} "
                      f"+ KV {m['kv_cache']:.1f} ({m['sequences_per_server']} sequences) + {m['overhead']:g} + margin "
                      f"{m['margin']:g}; gpu_memory_utilization {lay['gpu_memory_utilization']:.2f}")
        else:
            memory = (f"trainer {lay['trainer_gib']:.1f} GiB; busy serving {lay['busy']['inference']:.0%}, "
                      f"training {lay['busy']['trainer']:.0%}")
        lines.append(f"  {name:24} {lay['step_s']:5.0f} s {lay['busy_fraction']:5.0%} {lay['gpu_hours']:10.0f}  "
                     f"{memory}{'' if lay['fits'] else ': DOES NOT FIT'}")
    if len(shown) < len(lays):
        lines.append(f"  ({len(lays) - len(shown)} more splits in --json)")
    return lines + [p["choice"]]


# --------------------------------------------------------------------------- the generated table of docs/cluster.md

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "cluster.md"
DOC_REGENERATE = "python -m deepscaler.plan --write-docs"
DOC_BEGIN = f"<!-- BEGIN generated by `{DOC_REGENERATE}`; do not edit by hand. -->"
DOC_END = "<!-- END generated layout table -->"


def layouts_doc(stages: tuple[int, ...] = (1, 2, 3)) -> str:
    """The layouts of the default stages under the default assumptions, as Markdown between
    :data:`DOC_BEGIN` and :data:`DOC_END`."""
    lines = [DOC_BEGIN, "", "| stage | GPUs | layout | step | busy | GPU-hours | memory per GPU | fits |",
             "|---|---|---|---|---|---|---|---|"]
    choices = []
    for stage in stages:
        p = plan(stage_config(stage))
        for lay in shown_layouts(p, most=0):
            marks = [m for m, on in (("configured", lay["configured"]), ("chosen", lay["name"] == p["chosen"])) if on]
            name = f"{lay['name']}" + (f" ({', '.join(marks)})" if marks else "")
            memory = (f"{lay['memory_gib']['total']:.1f} GiB, `gpu_memory_utilization` {lay['gpu_memory_utilization']:.2f}"
                      if lay["name"] == "shared" else f"trainer {lay['trainer_gib']:.1f} GiB")
            lines.append(f"| {stage} | {lay['gpus']} | {name} | {lay['step_s']:.0f} s | {lay['busy_fraction']:.0%} | "
                         f"{lay['gpu_hours']:.0f} | {memory} | {'yes' if lay['fits'] else 'no'} |")
        choices.append(f"- stage {stage}: {p['choice']}")
    return "\n".join([*lines, "", *choices, "", DOC_END])


def write_layouts_doc(path: Path = DOC_PATH) -> None:
    """Replace the generated section of docs/cluster.md, atomically."""
    import os

    text = path.read_text(encoding="utf-8")
    begin, end = text.index(DOC_BEGIN), text.index(DOC_END) + len(DOC_END)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text[:begin] + layouts_doc() + text[end:], encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepscaler.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", type=int, default=1)
    parser.add_argument("--preset", action="append", metavar="NAME|FILE",
                        help="a preset laid over the stage file; several stack in order (as submit's)")
    parser.add_argument("--json", action="store_true", help="end with the plan as one JSON line")
    for field in dataclasses.fields(Assumptions):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=float, default=field.default)
    parser.add_argument("--write-docs", action="store_true",
                        help="rewrite the layout table of docs/cluster.md (the default stages and assumptions)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parse_command_line(parser, argv)
    if args.write_docs:
        write_layouts_doc()
        print(f"wrote the layout table of {DOC_PATH}")
        return 0
    try:
        cfg = stage_config(args.stage, args.preset, refuse_repeated_keys(args.overrides))
        p = plan(cfg, Assumptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Assumptions)}))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(p))
    if args.json:
        print(json.dumps(p))
    return 0 if p["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
