"""A scripted stand-in for the orchestrator: writes seeded synthetic ``rollouts/step_N``.

The real orchestrator samples from inference servers; the trainer's tests only need
well-formed batches that arrive through the filesystem, and the same ones on every run.
"""

from __future__ import annotations

import torch

from deepscaler.advantages import group_advantages
from deepscaler.rollouts import Rollout, write_rollout
from deepscaler.store import RunStore


def scripted_rollout(step: int, *, prompts: int, group_size: int, vocab: int, max_len: int = 24, seed: int = 0) -> Rollout:
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    prompt_ids, response_ids, logprobs = [], [], []
    for p in range(prompts):
        prompt = torch.randint(6, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        for _ in range(group_size):
            n = int(torch.randint(0, max_len, (1,), generator=g))
            prompt_ids.append(prompt)
            response_ids.append(torch.randint(6, vocab, (n,), generator=g).tolist())
            # Near a random model's log-prob (-ln 4096 = -8.3), so ratios stay near 1.
            logprobs.append((-8.3 + 0.05 * torch.randn(n, generator=g)).tolist())
    rewards = (torch.rand(prompts * group_size, generator=g) < 0.4).float()
    return Rollout.from_sequences(
        step=step, weight_step=step, group_size=group_size, problem_ids=[f"p{step}-{i}" for i in range(prompts)],
        prompt_ids=prompt_ids, response_ids=response_ids, response_logprobs=logprobs,
        rewards=rewards.tolist(), advantages=group_advantages(rewards, group_size).tolist(),
        truncated=[0] * len(response_ids), extra={"progress": {"cursor": (step + 1) * prompts}},
    )


def write_scripted_rollouts(store: RunStore, steps, **kwargs) -> None:
    store.ensure_dirs()
    for step in steps:
        if not store.is_stable("rollouts", step):
            write_rollout(store, step, scripted_rollout(step, **kwargs))
