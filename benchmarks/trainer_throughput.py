"""Tokens/s, peak memory and MFU of the trainer's update for a model shape and packed length.

    python benchmarks/trainer_throughput.py                               # CPU: small shape, harness check
    python benchmarks/trainer_throughput.py --shape real --tokens 8192,16384,24576   # one GPU

It runs the trainer's own code path (``deepscaler.trainer.engine``: DeepSpeed ZeRO from the
config, activation checkpointing, the chunked log-prob head, the GRPO loss with a frozen
reference model, the old log-probs) on one packed micro-batch per update: a random Qwen2 of the given shape, one
packed row of ``--tokens`` tokens made of sequences of ``--seq`` tokens (the last one
shorter), a prompt of 256 tokens each. Steps: ``--warmup`` untimed, then ``--steps`` timed.

MFU = model FLOPs per second / peak (``deepscaler.plan.model_flops``: 6 N T for the policy's forward and
backward, 2 N T for each pass without grad (the reference model's and the old log-probs'), plus
causal attention). Activation
checkpointing recomputes a forward but is not counted (as in the MFU convention of PaLM). Peak: ``--peak-tflops`` (default 989, an H100 SXM's dense bf16;
on CPU pass the machine's figure or read MFU as meaningless).

Ends with one JSON line per token count: {"shape", "tokens", "tokens_per_s", "step_s",
"peak_mem_gib" (GPU allocator peak; on CPU the process's peak RSS), "mfu", "device", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from deepscaler.hf_loading import KNOWN_CONFIGS  # noqa: E402
from deepscaler.plan import model_flops  # noqa: E402

SHAPES = {
    "real": {k: v for k, v in KNOWN_CONFIGS["deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"].items()
             if k not in ("model_type", "architectures", "tie_word_embeddings")},
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=1024, vocab_size=32768, max_position_embeddings=32768),
}


def packed_rollout(tokens: int, seq: int, vocab: int, prompt: int = 256):
    """A rollout batch whose sequences fill one packed row of ``tokens`` tokens."""
    from deepscaler.rollouts import Rollout

    lengths = [seq] * (tokens // seq) + ([tokens % seq] if tokens % seq > prompt else [])
    g = torch.Generator().manual_seed(0)
    prompts, responses, logps = [], [], []
    for n in lengths:
        p = min(prompt, n - 1)
        ids = torch.randint(10, vocab, (n,), generator=g).tolist()
        prompts.append(ids[:p])
        responses.append(ids[p:])
        logps.append([-10.0] * (n - p))
    k = len(lengths)
    rewards = [float(i % 2) for i in range(k)]
    return Rollout.from_sequences(step=0, weight_step=0, group_size=k, problem_ids=["p"], prompt_ids=prompts,
                                  response_ids=responses, response_logprobs=logps, rewards=rewards,
                                  advantages=[r - 0.5 for r in rewards], truncated=[0] * k)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: real on GPU, small on CPU")
    ap.add_argument("--tokens", default=None, help="packed tokens per update, comma list (default: 8192 on GPU)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the packed length)")
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--attention", default="auto", help="trainer.attn_implementation (auto, varlen, sdpa, eager, ...)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    args = ap.parse_args()

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from deepscaler.config import TrainerConfig
    from deepscaler.trainer import attention
    from deepscaler.trainer.engine import build_engine, init_distributed, prepare, update
    from deepscaler.trainer.packing import pack

    gpu = torch.cuda.is_available()
    shape = args.shape or ("real" if gpu else "small")
    token_counts = [int(t) for t in (args.tokens or ("8192" if gpu else "2048")).split(",")]
    init_distributed()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32

    tc = TrainerConfig()
    tc.precision = "bf16" if gpu else "fp32"
    tc.deepspeed.zero_stage = args.zero_stage
    tc.deepspeed.activation_checkpointing = not args.no_checkpointing
    tc.micro_batch_tokens = max(token_counts)

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(**SHAPES[shape], tie_word_embeddings=False)).to(dtype)
    ref = Qwen2ForCausalLM(Qwen2Config(**SHAPES[shape], tie_word_embeddings=False)).to(device=device, dtype=dtype)
    ref.load_state_dict(model.state_dict())
    ref.eval().requires_grad_(False)
    tc.attn_implementation = args.attention
    for m in (model, ref):
        m.set_attn_implementation(attention.resolve(tc.attn_implementation, device))
    engine = build_engine(model, tc, total_updates=10**6)
    params = sum(p.numel() for p in model.parameters())
    print(f"{shape} shape: {params / 1e9:.3f} B parameters, {device}, {dtype}, ZeRO-{args.zero_stage}, "
          f"attention {model.config._attn_implementation}, "
          f"activation checkpointing {'on' if tc.deepspeed.activation_checkpointing else 'off'}", flush=True)

    for tokens in token_counts:
        seq = args.seq or tokens
        rollout = packed_rollout(tokens, seq, SHAPES[shape]["vocab_size"])
        batch = pack(rollout, list(range(rollout.num_seqs))).to(device)
        loss_tokens = sum(rollout.response_lengths)
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(args.warmup + args.steps):
            if gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            prepare(engine, ref, [batch], tc, 0.6, tis_cap=None)  # the step's reference and old-log-prob passes
            update(engine, [batch], loss_tokens, tc, temperature=0.6, world_size=1)
            if gpu:
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        step_s = statistics.median(times)
        flops = model_flops(engine.module.config, list(rollout.seq_lengths), forwards=2)
        # GPU: the allocator's peak; CPU: the process's peak resident memory (KiB on Linux).
        peak_gib = (torch.cuda.max_memory_allocated() if gpu
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
        result = {
            "shape": shape, "params": params, "tokens": tokens, "seq": seq, "zero_stage": args.zero_stage,
            "attention": model.config._attn_implementation,
            "activation_checkpointing": tc.deepspeed.activation_checkpointing,
            "step_s": round(step_s, 4), "tokens_per_s": round(tokens / step_s, 1),
            "tflops": round(flops / step_s / 1e12, 2), "mfu": round(flops / step_s / (args.peak_tflops * 1e12), 4),
            "peak_mem_gib": round(peak_gib, 2),
            "device": torch.cuda.get_device_name() if gpu else f"cpu ({os.cpu_count()} cores)",
            "steps_timed": len(times),
        }
        print(f"{tokens} tokens: {result['tokens_per_s']} tok/s, {step_s:.3f} s/update, "
              f"{result['tflops']} TFLOP/s, MFU {result['mfu']:.1%} of {args.peak_tflops:g}, "
              f"peak {result['peak_mem_gib']} GiB", flush=True)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
