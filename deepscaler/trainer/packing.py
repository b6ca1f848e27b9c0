"""Sequence packing for the trainer: which sequences each rank and micro-batch gets, and the
packed row they become. Pure and deterministic: every rank computes the same plan from the
same lengths, so no plan is ever communicated.

Why packing: response lengths in one step range from ~100 to 24k tokens; padding to the
longest would waste most of the compute. A packed row concatenates sequences into one
``[1, T]`` row whose ``position_ids`` restart at 0 per sequence. transformers'
``find_packed_sequence_indices`` (masking_utils) turns those restarts into a block-diagonal
causal mask for sdpa/eager, so sequences never attend to each other; varlen kernels
(``trainer/attention.py``) take the boundaries as ``cu_seq_lens`` instead and build no mask.
The detection only runs when ``attention_mask is None`` AND ``past_key_values is None``: the
model must be called with ``use_cache=False`` (see :meth:`PackedBatch.model_inputs`),
otherwise the default ``config.use_cache=True`` makes the model create a DynamicCache, the
detection is skipped and the row is attended as ONE sequence.
"""

from __future__ import annotations

import dataclasses
import heapq
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor


def _indices(lengths: Sequence[int], indices: Sequence[int] | None) -> list[int]:
    return list(range(len(lengths))) if indices is None else [int(i) for i in indices]


def _longest_first(indices: Sequence[int], lengths: Sequence[int]) -> list[int]:
    """Longest first, ties by index: a total order, so the plan does not depend on input order."""
    return sorted(indices, key=lambda i: (-int(lengths[i]), i))


def split_across_ranks(
    lengths: Sequence[int], world_size: int, indices: Sequence[int] | None = None
) -> list[list[int]]:
    """Balance tokens across data-parallel ranks at sequence granularity.

    Greedy longest-first to the least-loaded rank (ties: lowest rank), within 4/3 of optimal;
    a step waits for its slowest rank, so balance is throughput. ``lengths`` is indexed by
    sequence index; ``indices`` picks the sequences to place (default: all). Each rank's
    indices come back ascending.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    heap = [(0, rank) for rank in range(world_size)]
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    for i in _longest_first(_indices(lengths, indices), lengths):
        load, rank = heapq.heappop(heap)
        ranks[rank].append(i)
        heapq.heappush(heap, (load + int(lengths[i]), rank))
    return [sorted(r) for r in ranks]


def pack_micro_batches(indices: Sequence[int], lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of sequences into rows of at most ``token_budget`` tokens.

    A sequence longer than the budget gets a micro-batch of its own (it cannot be split: the
    caller should warn, see :func:`oversized`). Bins come in creation order, indices ascending
    inside each.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in _longest_first(indices, lengths):
        n = int(lengths[i])
        for b, load in enumerate(loads):
            if load + n <= token_budget:
                bins[b].append(i)
                loads[b] += n
                break
        else:
            bins.append([i])
            loads.append(n)
    return [sorted(b) for b in bins]


def oversized(lengths: Sequence[int], token_budget: int, indices: Sequence[int] | None = None) -> list[int]:
    """Sequences longer than the budget (each runs alone, over budget: worth a warning)."""
    return [i for i in _indices(lengths, indices) if int(lengths[i]) > token_budget]


def plan_step(
    lengths: Sequence[int], world_size: int, token_budget: int, indices: Sequence[int] | None = None
) -> list[list[list[int]]]:
    """rank -> micro-batches -> sequence indices, with the SAME number of micro-batches per rank.

    ZeRO reduces gradients collectively inside backward, so every rank must run the same number
    of backward passes; ranks with fewer micro-batches get empty ones (``[]``) at the end, which
    :func:`pack` turns into a zero-loss dummy row. Call it once per mini-batch with that
    mini-batch's ``indices``.
    """
    per_rank = [pack_micro_batches(r, lengths, token_budget) for r in split_across_ranks(lengths, world_size, indices)]
    count = max(1, max(len(mbs) for mbs in per_rank))
    return [mbs + [[] for _ in range(count - len(mbs))] for mbs in per_rank]


@dataclass(eq=False)
class PackedBatch:
    """One packed row ``[1, T]`` and its per-token loss inputs, aligned with ``targets``.

    ``targets[t]`` is the token after position t within its sequence (0 at a sequence's last
    position, which has none). ``loss_mask[t]`` is True where that target is a response token,
    so each sequence contributes exactly its response length. ``behaviour_logp`` and
    ``advantages`` are 0 where the mask is False.
    """

    input_ids: Tensor  # int64 [1, T]
    position_ids: Tensor  # int64 [1, T], restarting at 0 per sequence
    targets: Tensor  # int64 [1, T]
    loss_mask: Tensor  # bool [1, T]
    behaviour_logp: Tensor  # float32 [1, T]
    advantages: Tensor  # float32 [1, T]
    cu_seqlens: Tensor  # int32 [num_seqs + 1], sequence boundaries in the row (flash-attn varlen style)
    segments: Tensor  # int32 [1, T], the position in the row of each token's sequence
    seq_indices: list[int] = field(default_factory=list)
    num_tokens: int = 0  # real tokens packed; 0 for the dummy row of an empty micro-batch
    max_seqlen: int = 1  # the longest sequence in the row (varlen kernels size their grid with it)
    # Set once per step, before the first update (trainer.engine.prepare), float32 [1, T]:
    ref_logp: Tensor | None = None  # the reference model's log-probs (the KL term)
    old_logp: Tensor | None = None  # the policy's own, before the step's first update (the ratio's base)
    tis_weight: Tensor | None = None  # truncated importance weights (trainer.loss.tis_cap)

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments for ``model(...)`` / ``model.model(...)``.

        ``use_cache=False`` is required (module doc): with a cache transformers skips the
        packed-sequence detection and sequences attend across boundaries. No attention_mask,
        for the same reason. The ``cu_seq_lens``/``max_length`` keywords are transformers'
        varlen arguments (flash_attention_2 and ``trainer/attention.py`` read them; sdpa and
        eager ignore them).
        """
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "use_cache": False,
                "cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens,
                "max_length_q": self.max_seqlen, "max_length_k": self.max_seqlen}

    def to(self, device: torch.device | str) -> "PackedBatch":
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        moved = {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in moved.items()}
        return PackedBatch(**{**moved, "seq_indices": list(self.seq_indices)})


def _dummy() -> PackedBatch:
    """A one-token row with nothing to learn: an empty micro-batch still runs forward/backward."""
    z = torch.zeros(1, 1, dtype=torch.long)
    return PackedBatch(z, z.clone(), z.clone(), torch.zeros(1, 1, dtype=torch.bool),
                       torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([0, 1], dtype=torch.int32),
                       torch.zeros(1, 1, dtype=torch.int32))


def pack(source: Any, indices: Sequence[int]) -> PackedBatch:
    """Pack sequences ``indices`` of a Rollout (or any object with its flat tensors ``input_ids``,
    ``seq_offsets``, ``prompt_lengths``, ``behaviour_logprobs``, ``advantages``) into one row."""
    indices = [int(i) for i in indices]
    if not indices:
        return _dummy()
    offsets = source.seq_offsets
    ids, pos, tgt, mask, blp, adv = [], [], [], [], [], []
    for i in indices:
        start, end = int(offsets[i]), int(offsets[i + 1])
        p, n = int(source.prompt_lengths[i]), end - start
        seq = source.input_ids[start:end].long()
        t = torch.arange(n)
        m = (t >= p - 1) & (t < n - 1)  # target t+1 is a response token
        ids.append(seq)
        pos.append(t)
        tgt.append(torch.cat([seq[1:], seq.new_zeros(1)]))
        mask.append(m)
        lp = torch.cat([source.behaviour_logprobs[start + 1:end].float(), torch.zeros(1)])
        blp.append(torch.where(m, lp, torch.zeros_like(lp)))
        adv.append(torch.where(m, source.advantages[i].float(), torch.zeros(())).expand(n))
    lengths = torch.tensor([0] + [x.numel() for x in ids])
    row = lambda parts: torch.cat(parts).unsqueeze(0)  # noqa: E731
    return PackedBatch(
        input_ids=row(ids),
        position_ids=row(pos),
        targets=row(tgt),
        loss_mask=row(mask),
        behaviour_logp=row(blp),
        advantages=row(adv),
        cu_seqlens=torch.cumsum(lengths, 0).to(torch.int32),
        segments=torch.repeat_interleave(torch.arange(len(ids), dtype=torch.int32), lengths[1:]).unsqueeze(0),
        seq_indices=indices,
        num_tokens=int(lengths.sum()),
        max_seqlen=int(lengths.max()),
    )
