"""A supervised warm start of the tiny model on the bundled toy task, so that the tiny preset's
first run visibly learns.

Why: a randomly initialised model earns no reward, so GRPO has nothing to reinforce and the
README's first run would show ``reward 0.000`` on every step. After a few hundred teacher-forced
updates on ``bundled:additions`` ("What is 3 + 4?" -> ``</think>\\n\\n\\boxed{7}``), greedy
decoding is mostly right but a sample at temperature 1 often is not: label smoothing leaves part
of every token's mass spread over the vocabulary. That gap is what the RL stage then closes, a
real GRPO run through the real processes, in a couple of minutes on a CPU.
"""

from __future__ import annotations

import random
import time

TASK = "bundled:additions"
LABEL_SMOOTHING = 0.1  # keeps sampled accuracy well below greedy: room for RL (module doc)
LR = 3e-3
BATCH = 64


def completion(answer: str) -> str:
    """The target after the prompt's ``<think>\\n`` (eos is appended as a token)."""
    return f"</think>\n\n\\boxed{{{answer}}}"


def sft_batch(tokenizer, prompts: list[list[int]], answers: list[str]):
    """Right-padded (input_ids, attention_mask, labels), loss on the completion and eos only.
    Prompt and completion are encoded apart and joined, as sampling produces them."""
    import torch

    targets = tokenizer([completion(a) for a in answers], add_special_tokens=False)["input_ids"]
    rows = [(p, list(t) + [tokenizer.eos_token_id]) for p, t in zip(prompts, targets)]
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), width), tokenizer.eos_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, t) in enumerate(rows):
        n = len(p) + len(t)
        ids[i, :n] = torch.tensor(p + t)
        mask[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(t)
    return ids, mask, labels


def sft_loss(model, ids, mask, labels, label_smoothing: float):
    """Cross-entropy of a causal LM on the labelled positions of a :func:`sft_batch`; the
    vocabulary head runs only where there is a target."""
    import torch

    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = labels[:, 1:] != -100
    logits = model.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:][keep], label_smoothing=label_smoothing)


def warm_start(model, tokenizer, updates: int, seed: int = 0, log=print) -> float:
    """``updates`` AdamW steps of batch :data:`BATCH` on :data:`TASK`, in place; returns the last
    loss. Seeded: the same shape and seed give the same weights."""
    import torch

    from deepscaler.data import format_prompt, load_problems

    problems, _ = load_problems(TASK)
    prompts = [list(ids) for ids in tokenizer([format_prompt(p.problem, tokenizer) for p in problems],
                                              add_special_tokens=False)["input_ids"]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model of about a million parameters: one thread is fastest on a shared CPU
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    model.train()
    t0, loss = time.perf_counter(), float("nan")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for update in range(1, updates + 1):
                idx = [rng.randrange(len(problems)) for _ in range(BATCH)]
                ids, mask, labels = sft_batch(tokenizer, [prompts[i] for i in idx], [problems[i].answer for i in idx])
                step_loss = sft_loss(model, ids, mask, labels, LABEL_SMOOTHING)
                opt.zero_grad()
                step_loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                loss = step_loss.item()
                if update % 50 == 0 or update == updates:
                    log(f"  warm start {update}/{updates}: loss {loss:.3f} ({time.perf_counter() - t0:.0f} s)")
    finally:
        torch.set_num_threads(threads)
        model.eval()
    return loss
