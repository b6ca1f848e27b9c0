"""Shared pieces of the toy benchmarks (``toy_learning.py``, ``async_overlap.py``).

A synthetic task with verifiable answers ("What is 23 + 48?" -> "71"), the pieces of a supervised
warm-start of a tiny Qwen2 built with ``deepscaler.tiny`` (the project's tokenizer and chat
template; the batches are ``deepscaler.warm_start``'s, as the tiny preset makes them),
a small sampler that draws the way the hf inference backend does (plain softmax at a
temperature, no top-k), and a runner for a real stage (``python -m deepscaler.submit ...
--executor local``) that returns the run's ``metrics.jsonl`` records.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

from deepscaler.data import format_prompt
from deepscaler.reward import compute_score

REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- the task


def make_problems(count: int, seed: int = 0, low: int = 0, high: int = 99) -> list[dict]:
    """``count`` seeded additions of two integers in [low, high], as data-file records."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a, b = rng.randint(low, high), rng.randint(low, high)
        out.append({"problem": f"What is {a} + {b}?", "answer": str(a + b)})
    return out


def write_jsonl(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- model


def build(shape, seed: int = 0):
    """(tokenizer, model) of the tiny preset: ``deepscaler.tiny``'s tokenizer and Qwen2."""
    from deepscaler.tiny import build_model, build_tokenizer

    return build_tokenizer(vocab_size=shape.vocab_size), build_model(shape, seed)


def save_hf(model, tokenizer, directory: Path) -> Path:
    """A Hugging Face folder (config, safetensors, generation config, tokenizer), not under
    torch.distributed, so ``save_pretrained`` writes everything."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    return directory


def prompt_ids(tokenizer, problems: list[dict]) -> list[list[int]]:
    """Token ids of the rendered prompts, encoded as the orchestrator does (no extra specials)."""
    texts = [format_prompt(p["problem"], tokenizer) for p in problems]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


@torch.no_grad()
def sample(model, prompts: list[list[int]], eos: int, temperature: float, max_new: int, seed: int) -> list[list[int]]:
    """Continuations of left-padded prompts with a KV cache: softmax(logits / T) sampling (greedy
    at T = 0), the hf inference backend's rule at top_p = 1."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    rows, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((rows, width), eos, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    nxt = positions[:, -1:] + 1
    done = torch.zeros(rows, dtype=torch.bool)
    tokens: list[list[int]] = [[] for _ in range(rows)]
    for _ in range(max_new):
        logits = out.logits[:, -1].float()
        if temperature > 0:
            chosen = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)[:, 0]
        else:
            chosen = logits.argmax(-1)
        for i in range(rows):
            if not done[i]:
                tokens[i].append(int(chosen[i]))
        done |= chosen == eos
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones((rows, 1), dtype=torch.long)], dim=1)
        out = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=nxt,
                    past_key_values=out.past_key_values, use_cache=True)
        nxt = nxt + 1
    return tokens


def accuracy(model, tokenizer, problems: list[dict], temperature: float, max_new: int = 16, seed: int = 0,
             batch: int = 128) -> float:
    """Mean of ``deepscaler.reward.compute_score`` over one sample per problem."""
    prompts = prompt_ids(tokenizer, problems)
    scores = []
    for start in range(0, len(problems), batch):
        got = sample(model, prompts[start:start + batch], tokenizer.eos_token_id, temperature, max_new, seed + start)
        texts = tokenizer.batch_decode(got, skip_special_tokens=True)
        scores += [compute_score(t, p["answer"]) for t, p in zip(texts, problems[start:start + batch])]
    return sum(scores) / max(len(scores), 1)


# --------------------------------------------------------------------------- a real stage


def load_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def run_stage(output_dir: Path, steps: int, overrides: list[str], env: dict | None = None, name: str = "toy",
              timeout_s: float = 1800.0) -> tuple[list[dict], float, Path]:
    """Run ``python -m deepscaler.submit --stage 1 --preset tiny-random --executor local`` as a
    subprocess; returns (metrics records, wall seconds, stage dir). Raises on failure with
    the command's output tail."""
    cmd = [sys.executable, "-m", "deepscaler.submit", "--stage", "1", "--preset", "tiny-random", "--executor", "local",
           "--output-dir", str(output_dir), "--max-steps", str(steps), f"run.name={name}", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout_s)
    wall = time.perf_counter() - t0
    stage_dir = output_dir / name / "stage1"
    if proc.returncode != 0:
        raise RuntimeError(f"stage failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-4000:]}")
    return load_metrics(stage_dir / "metrics.jsonl"), wall, stage_dir


def per_step(records: list[dict], source: str) -> dict[int, dict]:
    """step -> the newest step record of one side (``event`` records left out)."""
    return {r["step"]: r for r in records if r.get("source") == source and "event" not in r
            and isinstance(r.get("step"), int)}


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"
