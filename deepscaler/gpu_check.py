"""GPU acceptance check: run it once on one GPU node before a first stage (about 5 minutes on
one H100/H200; docs/cluster.md).

    python -m deepscaler.gpu_check [--stage 1] [--tokens 9216,17408,25600] [--attention all]
                                    [--inference auto|skip] [--out DIR] [key=value ...]

Trainer side (imports torch and transformers, nothing else): random weights of the stage's
model shape (``deepscaler.hf_loading.model_config``; no Hub needed), in the trainer's dtype, with
the stage's activation checkpointing and logits chunking. For each attention kernel that runs
here and each packed-row length, one micro-batch of the trainer's own code (packed log-probs,
the GRPO loss, backward) is timed after a warm-up. Reported: tokens/s, MFU (model FLOPs as in
deepscaler.plan: the policy forward and backward and the passes without grad; no recompute), and the peak of
``torch.cuda.max_memory_allocated`` (weights, gradients and activations; the optimizer
state, which ZeRO shards across ranks, is not held here).

Probe: the weight-sync probe's log-probs under other kernels and in fp32, against the bf16
tolerances of ``compare_probe``; also with the output layer scaled x20, whose logits reach a
trained model's range (random weights give near-uniform ones).

Inference side, where vLLM imports (a cluster node; skipped elsewhere): publish two weights
steps with the trainer's publisher, start the vLLM backend on the first at the stage's
``max_model_len``, generate, reload the second in place and check the probe.

First, before anything touches the GPU: the driver/CUDA preflight (``deepscaler/cuda_preflight.py``),
its own JSON line and ``cuda_preflight`` in the result. A driver too old for torch's CUDA build
stops the check there (exit 2) with one line naming both versions and the fix.

The last line is one JSON object. On a CPU the same code runs at the tiny shape as a smoke
test (``--device cpu --preset tiny-random``; tests/unit/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from deepscaler import cuda_preflight
from deepscaler.config import stage_config, tis_cap
from deepscaler.hf_loading import model_config
from deepscaler.plan import SyntheticRollout, build_model, model_flops, step_forwards, trace_micro_batch
from deepscaler.trainer import attention
from deepscaler.trainer.engine import micro_batch_loss, packed_log_probs, prepare
from deepscaler.trainer.packing import pack
from deepscaler.weights_format import PROBE_TOLERANCES, compare_probe, probe_logprobs

# Dense bf16 peak of one GPU, TFLOP/s (vendor figures, no sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trainer_side(cfg, config, device, dtype, token_counts, kernels, peak) -> list[dict]:
    """Time one micro-batch of the trainer's code (``prepare``: the reference and old-log-prob
    passes; ``micro_batch_loss`` and backward) per kernel and row length; beside the GPU's peak memory, the
    planner's trace of the same micro-batch. Gradients are dropped as they land, as ZeRO
    reduces them, and as the planner assumes."""
    policy = build_model(config, dtype, device, "sdpa")
    reference = build_model(config, dtype, device, "sdpa").eval().requires_grad_(False)
    if cfg.trainer.deepspeed.activation_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    for p in policy.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    forward = functools.partial(packed_log_probs, policy)
    rows = []
    for kernel in kernels:
        try:
            name = attention.resolve(kernel, device, dtype)
        except attention.AttentionError as e:
            rows.append({"attention": kernel, "error": " ".join(str(e).split())})
            continue
        for model in (policy, reference):
            model.set_attn_implementation(name)
        for tokens in token_counts:
            batch = pack(SyntheticRollout([tokens], config.vocab_size, cfg.data.max_prompt_tokens), [0]).to(device)
            row = {"attention": kernel, "tokens": tokens}

            def step():
                prepare(forward, reference, [batch], cfg.trainer, cfg.sampling.temperature, tis_cap(cfg))
                loss, _ = micro_batch_loss(forward, batch, cfg.trainer, cfg.sampling.temperature, tokens)
                loss.backward()

            try:
                step()  # warm-up (kernel selection, allocator)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                sync(device)
                t0 = time.perf_counter()
                step()
                sync(device)
                seconds = time.perf_counter() - t0
                flops = model_flops(config, [tokens], step_forwards(cfg))
                row.update(seconds=round(seconds, 3), tokens_per_s=round(tokens / seconds, 1),
                           tflops=round(flops / seconds / 1e12, 1))
                if peak:
                    row["mfu"] = round(flops / seconds / (peak * 1e12), 3)
                if device.type == "cuda":
                    row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                    traced = trace_micro_batch(cfg, config, [tokens], dtype=dtype, attn=name)
                    row["planned_gib"] = round(traced["peak"] / 2**30, 2)
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def free(device: torch.device) -> None:
    """Give back what the models of a finished side held (the next side needs the GPU)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def probe_side(config, device, dtype, kernel: str) -> dict:
    """Probe spread across kernels and compute dtypes, against compare_probe's tolerance."""
    model = build_model(config, dtype, device, "sdpa").eval()
    ids = torch.randint(0, config.vocab_size, (80,), generator=torch.Generator().manual_seed(1)).tolist()
    name = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[str(dtype).removeprefix("torch.")]
    out = {"dtype": name, "tolerance": dict(zip(("atol", "rtol", "mean_tol"), PROBE_TOLERANCES[name]))}
    for scale in (1.0, 20.0):
        with torch.no_grad():
            model.lm_head.weight.mul_(scale)
        model.set_attn_implementation("sdpa")
        reference = probe_logprobs(model, ids)  # the publisher's probe: a fresh load's kernel
        cases = {}
        for other in ("eager", kernel):
            model.set_attn_implementation(attention.resolve(other, device, dtype) if other != "eager" else "eager")
            cases[other] = probe_logprobs(model, ids)
        model.set_attn_implementation("sdpa")
        cases["fp32_compute"] = probe_logprobs(model.float(), ids)
        model.to(dtype)
        for case, actual in cases.items():
            ok, worst = compare_probe(reference, actual, dtype)
            mean = sum(abs(a - e) for a, e in zip(actual, reference)) / len(actual)
            out[f"x{scale:g}_{case}"] = {"ok": ok, "max": round(worst, 4), "mean": round(mean, 4)}
        with torch.no_grad():
            model.lm_head.weight.div_(scale)
    print(json.dumps({"probe": out}), flush=True)
    return out


def inference_side(cfg, config, device, dtype, workdir: Path) -> dict:
    """vLLM on the stage's max_model_len: start, generate, reload a second step in place, probe."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vllm does not import here"}
    from deepscaler.inference.contract import GenerateRequest, max_model_len
    from deepscaler.inference.vllm_backend import VllmBackend
    from deepscaler.store import RunStore
    from deepscaler.tiny import build_tokenizer
    from deepscaler.trainer.publisher import publish_weights
    from deepscaler.weights_format import read_probe

    store = RunStore(workdir, "gpu-check", cfg.run.stage)
    store.ensure_dirs()
    tokenizer = build_tokenizer()  # any tokenizer whose ids fit the vocabulary: the Hub is not needed
    t0 = time.perf_counter()
    for step in (1, 2):
        torch.manual_seed(step)
        model = build_model(config, dtype, device, "sdpa")
        publish_weights(store, step, model, tokenizer, dtype=dtype, probe_device=device)
        del model
    publish_s = (time.perf_counter() - t0) / 2
    free(device)
    result = {"max_model_len": max_model_len(cfg), "publish_s": round(publish_s, 2)}
    t0 = time.perf_counter()
    backend = VllmBackend(cfg, str(store.step_path("weights", 1)))
    try:
        result["engine_start_s"] = round(time.perf_counter() - t0, 1)
        req = GenerateRequest(prompts=[list(range(10, 60))] * 8, n=1, max_tokens=256, temperature=0.6, top_p=1.0,
                              seed=0)
        t0 = time.perf_counter()
        out = backend.generate(req)
        generated = sum(len(s["token_ids"]) for samples in out for s in samples)
        result["generate_tok_s"] = round(generated / (time.perf_counter() - t0), 1)
        t0 = time.perf_counter()
        report = backend.update(store.step_path("weights", 2), 2)
        result.update(update_s=round(time.perf_counter() - t0, 2), update=report)
        probe = read_probe(store.step_path("weights", 2))
        ok, worst = compare_probe(probe["logprobs"], backend.probe(probe["token_ids"]), probe["dtype"])
        result.update(probe_ok=ok, probe_max_diff=round(worst, 4))
    finally:
        backend.close()
    print(json.dumps({"inference": result}), flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    preflight = cuda_preflight.preflight().as_dict()  # first: an old driver fails deep inside torch.cuda
    print(json.dumps({"cuda_preflight": preflight}), flush=True)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", type=int, default=1)
    ap.add_argument("--preset", help="e.g. tiny (with --device cpu: the smoke test)")
    ap.add_argument("--tokens", default="9216,17408,25600", help="packed-row lengths to time")
    ap.add_argument("--attention", default="all",
                    help="kernels to time: all (varlen, flash_attention_2, sdpa), or a list such as auto,eager")
    ap.add_argument("--inference", choices=("auto", "skip"), default="auto", help="auto: where vllm imports")
    ap.add_argument("--device", help="cuda or cpu (default: cuda where torch sees a GPU)")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the table")
    ap.add_argument("--out", help="where the inference side publishes (default: a temp dir)")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)

    if not preflight["ok"] and args.device != "cpu":
        print(f"error: {preflight['message']}", file=sys.stderr)
        print(json.dumps({"cuda_preflight": preflight, "error": preflight["message"]}))
        raise SystemExit(2)
    cfg = stage_config(args.stage, args.preset, args.overrides)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = model_config(cfg)
    # all: what a stage may use, and sdpa's dense mask for comparison. eager materialises the
    # [heads, T, T] scores and flex_attention compiles per shape: ask for them by name.
    kernels = ["varlen", "flash_attention_2", "sdpa"] if args.attention == "all" else args.attention.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    peak = peak_tflops(device, args.peak_tflops)
    started = time.perf_counter()
    print(json.dumps({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "torch": torch.__version__, "stage": cfg.run.stage,
                      "checkpointing": cfg.trainer.deepspeed.activation_checkpointing,
                      "auto_attention": attention.resolve("auto", device, dtype), "peak_tflops": peak}), flush=True)
    result = {"cuda_preflight": preflight, "trainer": trainer_side(cfg, config, device, dtype, tokens, kernels, peak)}
    free(device)
    result["probe"] = probe_side(config, device, dtype, cfg.trainer.attn_implementation)
    free(device)
    if args.inference == "auto":
        with tempfile.TemporaryDirectory(dir=args.out) as tmp:
            result["inference"] = inference_side(cfg, config, device, dtype, Path(tmp))
    result["wall_s"] = round(time.perf_counter() - started, 1)
    if not all(math.isfinite(r.get("seconds", 0.0)) for r in result["trainer"]):
        result["error"] = "non-finite timing"
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
