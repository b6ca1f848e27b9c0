"""Does the whole GRPO loop learn? A toy task with verifiable answers, end to end on CPU.

    .venv/bin/python -m benchmarks.toy_learning [--dir DIR] [--steps 60] [--lr 3e-4] [--keep]

What it measures: the reward curve of a real stage (``python -m deepscaler.submit --stage 1
--preset tiny-random --executor local``: hf inference server, DeepSpeed trainer, orchestrator, as
separate processes talking through HTTP and the run directory) on a task where a tiny model
can visibly get better within minutes.

How:

1. Task: ``--problems`` (4000) seeded additions "What is A + B?" with A, B in [0, 99] and
   the answer "A+B", written as a JSON Lines data file (``{"problem", "answer"}`` records).
   A separate seeded set of 256 problems measures the warm-start accuracy.
2. Model: a tiny Qwen2 built with ``deepscaler.tiny`` (the project's tokenizer and chat
   template), shape hidden 64, 2 layers, 2 heads of size 32 (1 KV head), MLP 256,
   vocab 4096 (about 0.65 M parameters; smaller than the preset's default so the warm-start
   and the trainer are about twice as fast).
3. Warm-start: supervised, plain torch on one CPU thread, AdamW lr 3e-3, batches of 64:
   teacher-forced ``deepscaler.data.format_prompt(problem)`` + ``</think>\\n\\n\\boxed{A+B}``
   + eos, loss on the completion only, with label smoothing 0.1 (``--warm-label-smoothing``).
   From update 300 on, every 25 updates the sampled accuracy on the held-out set (the RL
   run's temperature 1.0, one sample per problem, scored with
   ``deepscaler.reward.compute_score``) is measured; it stops at the first check >= 0.2
   (``--warm-target``). The model learns the format first and the carry arithmetic late and
   abruptly; label smoothing leaves ~10% of every token's mass spread over the vocabulary,
   so at temperature 1 a sample often goes off the rails although greedy decoding is mostly
   right. Measured: 725 updates (~90-95 s), 23% sampled, 82% greedy. Both are room for RL:
   sharpening (putting the mass where greedy already is) and the arithmetic itself. Without
   label smoothing the warm-start stops at 25% sampled / 54% greedy and 40-60 GRPO steps
   gain only +0.1 (lr 1e-4..3e-4), or collapse (lr 1e-3..3e-3: the first Adam steps on a
   16-prompt batch knock a half-trained model over). Saved as a Hugging Face folder (config,
   safetensors, tokenizer).
4. GRPO: the real stage from that folder (``model.name=<folder> data.train=<jsonl>``), with
   16 prompts x 8 samples per step, temperature 1.0, responses up to 16 tokens, lr 3e-4,
   no KL and no entropy bonus (a toy: the point is to see the reward move), two mini-batch
   updates per step (the recipe), async level 0, no checkpoint but the last, 60 steps.
   ``inference.max_model_len=160``: prompt + response would be 80, less than the
   weight-sync probe (up to 128 tokens), which the server then refuses.
5. The reward per step comes from the run's ``metrics.jsonl`` (orchestrator records).
   ``reward_first`` / ``reward_last`` are the means over the first / last ``--window`` (5)
   steps. The run passes when ``reward_last - reward_first >= 0.2``. Measured (default
   seed): 0.28 -> 0.57 (+0.29); the reward climbs for ~25 steps, then holds at 0.5-0.65.
   About 7 minutes in all (90 s warm-start, 320 s GRPO) at load average ~2-3.5.

Everything is seeded (data, model init, warm-start batches, sampling seeds, trainer): two
runs with the defaults gave the same rewards step for step (the trainer's thread count
could in principle change float summation order; it did not here). The load average is
printed before and after: the shared 2-core machine's load changes the wall time, not the
curve.

The last line is one JSON object:
    {"reward_first", "reward_last", "reward_gain", "steps", "warmstart_accuracy",
     "warmstart_greedy_accuracy", "warmstart_updates", "warmstart_s", "grpo_s", "wall_s",
     "rewards", "passed", ...}
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import _toy
from benchmarks.harness import record
from deepscaler.config import TinyModelConfig
from deepscaler.warm_start import sft_batch, sft_loss

SHAPE = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=256,
                        vocab_size=4096, max_position_embeddings=512)


def warm_start(tokenizer, model, problems, held_out, args) -> dict:
    """Supervised updates until the sampled accuracy on ``held_out`` reaches the target."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 0.65 M-parameter model: one thread is faster on a shared 2-core box
    prompts = _toy.prompt_ids(tokenizer, problems)
    opt = torch.optim.AdamW(model.parameters(), lr=args.warm_lr, weight_decay=0.0)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    acc, updates = 0.0, 0
    history = []
    while updates < args.warm_max_updates:
        model.train()
        idx = [rng.randrange(len(problems)) for _ in range(args.warm_batch)]
        ids, mask, labels = sft_batch(tokenizer, [prompts[i] for i in idx], [problems[i]["answer"] for i in idx])
        loss = sft_loss(model, ids, mask, labels, args.warm_label_smoothing)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        updates += 1
        loss = loss.item()
        if updates >= args.warm_min_updates and updates % args.warm_check == 0:
            acc = _toy.accuracy(model, tokenizer, held_out, args.temperature, args.max_tokens, seed=args.seed)
            history.append((updates, round(loss, 4), acc))
            print(f"  warm-start update {updates:4d}: loss {loss:.3f}  sampled accuracy {acc:.3f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            if acc >= args.warm_target:
                break
    greedy = _toy.accuracy(model, tokenizer, held_out, 0.0, args.max_tokens, seed=args.seed)
    torch.set_num_threads(threads)
    return {"warmstart_accuracy": acc, "warmstart_greedy_accuracy": greedy, "warmstart_updates": updates,
            "warmstart_s": time.perf_counter() - t0, "warmstart_history": history}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", help="work folder (default: a temporary one, removed unless --keep)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--problems", type=int, default=4000)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--window", type=int, default=5, help="steps averaged for reward_first / reward_last")
    p.add_argument("--prompts", type=int, default=16, help="orchestrator.prompts_per_step")
    p.add_argument("--samples", type=int, default=8, help="sampling.samples_per_prompt")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=16, help="sampling.max_response_tokens")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--kl", type=float, default=0.0, help="trainer.loss.kl_coef")
    p.add_argument("--entropy", type=float, default=0.0, help="trainer.loss.entropy_coef")
    p.add_argument("--warm-lr", type=float, default=3e-3)
    p.add_argument("--warm-batch", type=int, default=64)
    p.add_argument("--warm-check", type=int, default=25)
    p.add_argument("--warm-target", type=float, default=0.2)
    p.add_argument("--warm-max-updates", type=int, default=2000)
    p.add_argument("--warm-min-updates", type=int, default=300, help="no accuracy checks before (saves time)")
    p.add_argument("--warm-label-smoothing", type=float, default=0.1)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="more stage overrides")
    args = p.parse_args()

    t_all = time.perf_counter()
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="toy_learning-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = _toy.load_average()
    print(f"work folder {work}; load average before: {load_before}", flush=True)

    # ------------------------------------------------------------------ task + warm-start
    problems = _toy.make_problems(args.problems, seed=args.seed)
    held_out = _toy.make_problems(256, seed=args.seed + 12345)
    data = _toy.write_jsonl(problems, work / "additions.jsonl")
    tokenizer, model = _toy.build(SHAPE, seed=args.seed)
    torch.manual_seed(args.seed)
    print(f"warm-start of a {sum(x.numel() for x in model.parameters()) / 1e6:.2f} M-parameter tiny Qwen2 "
          f"until sampled accuracy >= {args.warm_target} (T={args.temperature})", flush=True)
    warm = warm_start(tokenizer, model, problems, held_out, args)
    print(f"warm-start: {warm['warmstart_updates']} updates in {warm['warmstart_s']:.0f} s, accuracy "
          f"{warm['warmstart_accuracy']:.3f} sampled, {warm['warmstart_greedy_accuracy']:.3f} greedy", flush=True)
    folder = _toy.save_hf(model, tokenizer, work / "warm_model")

    # ------------------------------------------------------------------ GRPO through the real processes
    overrides = [
        f"model.name={folder}", f"data.train={data}", "data.max_prompt_tokens=64",
        # Not prompt + response (80): the weight-sync probe is up to 128 tokens (module doc, 4.)
        "inference.max_model_len=160",
        f"run.seed={args.seed}",
        f"sampling.samples_per_prompt={args.samples}", f"sampling.max_response_tokens={args.max_tokens}",
        f"sampling.temperature={args.temperature}",
        f"orchestrator.prompts_per_step={args.prompts}", "orchestrator.async_level=0",
        "orchestrator.reward.workers=1",
        f"trainer.optimizer.lr={args.lr}", f"trainer.loss.kl_coef={args.kl}",
        f"trainer.loss.entropy_coef={args.entropy}", "trainer.mini_batches_per_step=2",
        "checkpoint.interval=100000",
        *args.overrides,
    ]
    print(f"GRPO: {args.steps} steps of {args.prompts}x{args.samples}, lr {args.lr}, kl {args.kl}", flush=True)
    records, grpo_s, stage_dir = _toy.run_stage(work / "runs", args.steps, overrides, name="toy")
    orch = _toy.per_step(records, "orchestrator")
    trainer = _toy.per_step(records, "trainer")
    steps = sorted(orch)
    rewards = [orch[s]["reward_mean"] for s in steps]
    print(f"GRPO stage: {grpo_s:.0f} s wall ({len(steps)} steps), metrics {stage_dir / 'metrics.jsonl'}")
    print(f"{'step':>4} {'reward':>7} {'all ok':>6} {'none ok':>7} {'len':>5} {'pg_loss':>8} {'entropy':>7} {'s':>5}")
    for s in steps:
        o, t = orch[s], trainer.get(s + 1, {})
        print(f"{s:4d} {o['reward_mean']:7.3f} {o['solve_all']:6.2f} {o['solve_none']:7.2f} "
              f"{o['response_length_mean']:5.1f} {t.get('pg_loss', float('nan')):+8.4f} "
              f"{t.get('entropy', float('nan')):7.3f} {o['time_step_s']:5.1f}")
    w = max(1, min(args.window, len(rewards) // 2))
    first = sum(rewards[:w]) / w if rewards else 0.0
    last = sum(rewards[-w:]) / w if rewards else 0.0
    load_after = _toy.load_average()
    wall = time.perf_counter() - t_all
    print(f"reward {first:.3f} (first {w} steps) -> {last:.3f} (last {w}), gain {last - first:+.3f}; "
          f"total wall {wall:.0f} s; load average before {load_before}, after {load_after}")
    if not args.keep and not args.dir:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "reward_first": round(first, 4), "reward_last": round(last, 4), "reward_gain": round(last - first, 4),
        "steps": len(steps), "window": w,
        "warmstart_accuracy": round(warm["warmstart_accuracy"], 4),
        "warmstart_greedy_accuracy": round(warm["warmstart_greedy_accuracy"], 4),
        "warmstart_updates": warm["warmstart_updates"], "warmstart_s": round(warm["warmstart_s"], 1),
        "grpo_s": round(grpo_s, 1), "wall_s": round(wall, 1),
        "rewards": [round(r, 4) for r in rewards],
        "recipe": {"prompts_per_step": args.prompts, "samples_per_prompt": args.samples, "lr": args.lr,
                   "temperature": args.temperature, "kl_coef": args.kl, "entropy_coef": args.entropy,
                   "max_response_tokens": args.max_tokens},
        "load_before": load_before, "load_after": load_after,
        "passed": bool(last - first >= 0.2),
    }
    record("toy_learning", vars(args), result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
