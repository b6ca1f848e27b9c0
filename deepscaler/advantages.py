"""The GRPO group advantage: each sample's reward against the other samples of its prompt.

The orchestrator computes it when it builds a rollout batch (``rollouts/step_N`` carries the
advantages); the trainer's loss (``deepscaler.trainer.loss``) only reads them. It lives
outside the trainer so that the orchestrator does not import trainer code.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """(r - group mean) / (unbiased group std + eps), same shape as ``rewards``.

    ``rewards`` is ``[num_groups * group_size]`` (groups contiguous) or ``[num_groups, group_size]``.
    A group whose rewards are all equal carries no learning signal and gets exactly 0 (not a
    rounding residue divided by eps); a group of size 1 has no baseline and also gets 0
    (verl would give it the raw reward; the recipe never samples n=1).
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    shape = rewards.shape
    if rewards.dim() == 1:
        if shape[0] % group_size:
            raise ValueError(f"{shape[0]} rewards do not split into groups of {group_size}")
        grouped = rewards.reshape(-1, group_size)
    elif rewards.dim() == 2:
        if shape[1] != group_size:
            raise ValueError(f"rewards of shape {tuple(shape)} do not have groups of {group_size}")
        grouped = rewards
    else:
        raise ValueError(f"rewards must be 1-D or 2-D, got shape {tuple(shape)}")
    grouped = grouped if grouped.is_floating_point() else grouped.float()
    if group_size == 1:
        return torch.zeros_like(grouped).reshape(shape)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)  # unbiased, as torch.std / verl
    adv = (grouped - mean) / (std + eps)
    constant = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    adv = torch.where(constant, torch.zeros_like(adv), adv)
    return adv.reshape(shape)
