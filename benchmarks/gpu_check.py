"""GPU acceptance check: run it once on one GPU node before a first stage (about 5 minutes on
one H100/H200; docs/cluster.md).

    python benchmarks/gpu_check.py [--stage 1] [--tokens 9216,17408,25600] [--attention all]
                                   [--inference auto|skip] [--out DIR] [key=value ...]

Trainer side (imports torch and transformers, nothing else): random weights of the stage's
model shape (``deepscaler.hf_loading.model_config``; no Hub needed), in the trainer's dtype, with
the stage's activation checkpointing and logits chunking. For each attention kernel that runs
here and each packed-row length, one micro-batch of the trainer's own code (packed log-probs,
the GRPO loss, backward) is timed after a warm-up. Reported: tokens/s, MFU (model FLOPs as in
trainer_throughput.py, without the reference forward; no recompute), and the peak of
``torch.cuda.max_memory_allocated`` (weights, gradients and activations; the optimizer
state, which ZeRO shards across ranks, is not held here).

Probe: the weight-sync probe's log-probs under other kernels and in fp32, against the bf16
tolerances of ``compare_probe``; also with the output layer scaled x20, whose logits reach a
trained model's range (random weights give near-uniform ones).

Inference side, where vLLM imports (a cluster node; skipped elsewhere): publish two weights
steps with the trainer's publisher, start the vLLM backend on the first at the stage's
``max_model_len``, generate, reload the second in place and check the probe.

The last line is one JSON object. On a CPU the same code runs at the tiny shape as a smoke
test (``--device cpu --preset tiny``; tests/unit/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from deepscaler.config import stage_config  # noqa: E402
from deepscaler.hf_loading import model_config  # noqa: E402
from deepscaler.trainer import attention  # noqa: E402
from deepscaler.trainer.engine import packed_log_probs  # noqa: E402
from deepscaler.trainer.loss import grpo_loss  # noqa: E402
from deepscaler.trainer.packing import pack  # noqa: E402
from deepscaler.trainer.weights import PROBE_TOLERANCES, compare_probe, probe_logprobs  # noqa: E402
from trainer_throughput import model_flops  # noqa: E402  (benchmarks/, beside this file)

# Dense bf16 peak of one GPU, TFLOP/s (vendor figures, no sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


class Rows:
    """The flat tensors ``pack`` reads: one sequence per row (a prompt, then its response)."""

    def __init__(self, lengths: list[int], vocab: int, prompt: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(0, vocab, (sum(lengths),), generator=g)
        self.seq_offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        self.prompt_lengths = [min(prompt, n - 1) for n in lengths]
        self.behaviour_logprobs = -torch.rand(sum(lengths), generator=g)
        self.advantages = torch.randn(len(lengths), generator=g)


def build_model(config, dtype: torch.dtype, device: torch.device):
    """A random model of ``config`` made on ``device`` directly in ``dtype``."""
    from transformers import AutoModelForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    return model


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


def micro_batch(model, batch, cfg, device) -> None:
    """One micro-batch of the trainer's update: packed log-probs, GRPO loss, backward."""
    tc = cfg.trainer
    logp, ent = packed_log_probs(model, batch, cfg.sampling.temperature, entropy=True,
                                 chunk_tokens=tc.logits_chunk_tokens)
    loss, _ = grpo_loss(logp, batch.behaviour_logp, batch.advantages, batch.loss_mask, logp.detach(), ent,
                        clip_low=tc.loss.clip_ratio_low, clip_high=tc.loss.clip_ratio_high, kl_coef=tc.loss.kl_coef,
                        kl_type=tc.loss.kl_type, entropy_coef=tc.loss.entropy_coef,
                        denominator=max(batch.num_loss_tokens, 1))
    loss.backward()


def trainer_side(cfg, config, device, dtype, token_counts, kernels, peak) -> list[dict]:
    model = build_model(config, dtype, device)
    if cfg.trainer.deepspeed.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    rows = []
    for kernel in kernels:
        try:
            model.set_attn_implementation(attention.resolve(kernel, device))
        except (attention.AttentionError, ValueError, ImportError) as e:
            rows.append({"attention": kernel, "error": " ".join(str(e).split())})
            continue
        for tokens in token_counts:
            batch = pack(Rows([tokens], config.vocab_size, cfg.data.max_prompt_tokens), [0]).to(device)
            row = {"attention": kernel, "tokens": tokens}
            try:
                micro_batch(model, batch, cfg, device)  # warm-up (kernel selection, allocator)
                model.zero_grad(set_to_none=False)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                sync(device)
                t0 = time.perf_counter()
                micro_batch(model, batch, cfg, device)
                sync(device)
                seconds = time.perf_counter() - t0
                flops = model_flops(config, [tokens], reference=False)
                row.update(seconds=round(seconds, 3), tokens_per_s=round(tokens / seconds, 1),
                           tflops=round(flops / seconds / 1e12, 1))
                if peak:
                    row["mfu"] = round(flops / seconds / (peak * 1e12), 3)
                if device.type == "cuda":
                    row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            model.zero_grad(set_to_none=True)
            rows.append(row)
            print(json.dumps(row), flush=True)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def probe_side(config, device, dtype, kernel: str) -> dict:
    """Probe spread across kernels and compute dtypes, against compare_probe's tolerance."""
    model = build_model(config, dtype, device).eval()
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
            model.set_attn_implementation(attention.resolve(other, device) if other != "eager" else "eager")
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
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def inference_side(cfg, config, device, dtype, workdir: Path) -> dict:
    """vLLM on the stage's max_model_len: start, generate, reload a second step in place, probe."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vllm does not import here"}
    from deepscaler.inference.server import GenerateRequest, max_model_len
    from deepscaler.inference.vllm_backend import VllmBackend
    from deepscaler.store import RunStore
    from deepscaler.tiny import build_tokenizer
    from deepscaler.trainer.weights import publish_weights, read_probe

    store = RunStore(workdir, "gpu-check", cfg.run.stage)
    store.ensure_dirs()
    tokenizer = build_tokenizer()  # any tokenizer whose ids fit the vocabulary: the Hub is not needed
    t0 = time.perf_counter()
    for step in (1, 2):
        torch.manual_seed(step)
        model = build_model(config, dtype, device)
        publish_weights(store, step, model, tokenizer, dtype=dtype, probe_device=device)
        del model
    publish_s = (time.perf_counter() - t0) / 2
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", type=int, default=1)
    ap.add_argument("--preset", help="e.g. tiny (with --device cpu: the smoke test)")
    ap.add_argument("--tokens", default="9216,17408,25600", help="packed-row lengths to time")
    ap.add_argument("--attention", default="all",
                    help="kernels to time: all (varlen, flash_attention_2, sdpa), or a list such as auto,eager")
    ap.add_argument("--inference", choices=("auto", "skip"), default="auto", help="auto: where vllm imports")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the table")
    ap.add_argument("--out", help="where the inference side publishes (default: a temp dir)")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)

    cfg = stage_config(args.stage, args.preset, args.overrides)
    device = torch.device(args.device)
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
                      "auto_attention": attention.resolve("auto", device), "peak_tflops": peak}), flush=True)
    result = {"trainer": trainer_side(cfg, config, device, dtype, tokens, kernels, peak),
              "probe": probe_side(config, device, dtype, cfg.trainer.attn_implementation)}
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
