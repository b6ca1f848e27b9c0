"""One step's rollout batch: the orchestrator writes it, every trainer rank reads it.

Why a flat layout: a step holds up to 128 x 16 sequences of up to ~25k tokens, so per-sequence
Python objects would cost seconds and gigabytes; concatenated tensors plus offsets load in one
safetensors read and slice for free. ``rollouts/step_N/`` holds::

    rollout.safetensors
      input_ids           int32   [total_tokens]   prompt + response of every sequence, concatenated
      seq_offsets         int64   [num_seqs + 1]   sequence i is input_ids[off[i]:off[i+1]]
      prompt_lengths      int32   [num_seqs]       1 <= prompt_len <= seq_len (empty response allowed)
      behaviour_logprobs  float32 [total_tokens]   sampler log-prob of token t; 0.0 at prompt positions
      advantages          float32 [num_seqs]
      rewards             float32 [num_seqs]
      truncated           uint8   [num_seqs]       1 if the response hit the length limit
    meta.json             {step, weight_step, group_size, num_prompts, problem_ids, extra, format_version}

Sequences are prompt-major: prompt g owns sequences ``g*group_size .. (g+1)*group_size - 1``.
Every rank reads the whole file (one file per step, not per-rank shards): the split across
ranks is computed deterministically from the lengths by ``trainer.packing.plan_step``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from deepscaler.errors import is_int
from deepscaler.safetensors_io import load_tensors, save_tensors
from deepscaler.store import RunStore, StoreError, atomic_write_json, read_json

TENSOR_FILE = "rollout.safetensors"
META_FILE = "meta.json"
FORMAT_VERSION = 1

# name -> dtype; "tokens" tensors are [total_tokens], "seqs" tensors [num_seqs].
_TOKEN_TENSORS = {"input_ids": torch.int32, "behaviour_logprobs": torch.float32}
_SEQ_TENSORS = {
    "prompt_lengths": torch.int32,
    "advantages": torch.float32,
    "rewards": torch.float32,
    "truncated": torch.uint8,
}
TENSOR_DTYPES = {**_TOKEN_TENSORS, "seq_offsets": torch.int64, **_SEQ_TENSORS}
META_KEYS = ("step", "weight_step", "group_size", "num_prompts", "problem_ids")


class RolloutError(StoreError, ValueError):
    """A rollout batch that breaks the format. The message is one line: ``<file>: <problem>``."""


@dataclass(eq=False)  # tensors have no single truth value: compare fields explicitly
class Rollout:
    """One step's batch in memory, as flat tensors exactly as stored (see the module doc)."""

    step: int
    weight_step: int
    group_size: int
    problem_ids: list
    input_ids: Tensor
    seq_offsets: Tensor
    prompt_lengths: Tensor
    behaviour_logprobs: Tensor
    advantages: Tensor
    rewards: Tensor
    truncated: Tensor
    extra: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ accessors

    @property
    def num_prompts(self) -> int:
        return len(self.problem_ids)

    @property
    def num_seqs(self) -> int:
        return int(self.seq_offsets.numel()) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def seq_lengths(self) -> list[int]:
        """Prompt + response tokens per sequence (what packing balances)."""
        return torch.diff(self.seq_offsets).tolist()

    @property
    def response_lengths(self) -> list[int]:
        """Tokens the loss trains on per sequence (sum over a mini-batch = its loss denominator)."""
        return (torch.diff(self.seq_offsets) - self.prompt_lengths.long()).tolist()

    def sequence(self, i: int) -> tuple[Tensor, int, Tensor]:
        """(token ids, prompt length, behaviour log-probs) of sequence ``i`` (views, no copy)."""
        if not 0 <= i < self.num_seqs:
            raise IndexError(f"sequence {i} out of range for {self.num_seqs} sequences")
        start, end = int(self.seq_offsets[i]), int(self.seq_offsets[i + 1])
        return self.input_ids[start:end], int(self.prompt_lengths[i]), self.behaviour_logprobs[start:end]

    def group(self, g: int) -> range:
        """Sequence indices sampled from prompt ``g``."""
        if not 0 <= g < self.num_prompts:
            raise IndexError(f"prompt {g} out of range for {self.num_prompts} prompts")
        return range(g * self.group_size, (g + 1) * self.group_size)

    def tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in TENSOR_DTYPES}

    def meta(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "step": self.step,
            "weight_step": self.weight_step,
            "group_size": self.group_size,
            "num_prompts": self.num_prompts,
            "problem_ids": list(self.problem_ids),
            "extra": dict(self.extra),
        }

    def validate(self, where: str = "rollout") -> "Rollout":
        """Raise :class:`RolloutError` if this batch would not pass :func:`read_rollout`."""
        meta = _check_meta(self.meta(), where)
        _check_tensors(self.tensors(), meta, where)
        return self

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_sequences(
        cls,
        *,
        step: int,
        weight_step: int,
        group_size: int,
        problem_ids: Sequence,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        response_logprobs: Sequence[Sequence[float]],
        rewards: Sequence[float],
        advantages: Sequence[float],
        truncated: Sequence[bool],
        extra: dict | None = None,
    ) -> "Rollout":
        """Build (and validate) a batch from the orchestrator's per-sequence lists, prompt-major.

        ``prompt_ids[i]`` is sequence i's prompt (repeated within a group); ``response_logprobs[i]``
        has one sampler log-prob per response token.
        """
        n = len(prompt_ids)
        per_seq = {"response_ids": response_ids, "response_logprobs": response_logprobs, "rewards": rewards,
                   "advantages": advantages, "truncated": truncated}
        for name, values in per_seq.items():
            if len(values) != n:
                raise RolloutError(f"rollout: {name} has {len(values)} entries, prompt_ids has {n}")
        ids: list[int] = []
        logps: list[float] = []
        offsets = [0]
        for i in range(n):
            prompt, resp, lp = prompt_ids[i], response_ids[i], response_logprobs[i]
            if len(lp) != len(resp):
                raise RolloutError(f"rollout: sequence {i} has {len(resp)} response tokens but {len(lp)} log-probs")
            ids.extend(prompt)
            ids.extend(resp)
            logps.extend([0.0] * len(prompt))
            logps.extend(lp)
            offsets.append(len(ids))
        rollout = cls(
            step=step,
            weight_step=weight_step,
            group_size=group_size,
            problem_ids=list(problem_ids),
            input_ids=torch.tensor(ids, dtype=torch.int32),
            seq_offsets=torch.tensor(offsets, dtype=torch.int64),
            prompt_lengths=torch.tensor([len(p) for p in prompt_ids], dtype=torch.int32),
            behaviour_logprobs=torch.tensor(logps, dtype=torch.float32),
            advantages=torch.tensor(list(advantages), dtype=torch.float32),
            rewards=torch.tensor(list(rewards), dtype=torch.float32),
            truncated=torch.tensor([bool(t) for t in truncated], dtype=torch.uint8),
            extra=dict(extra or {}),
        )
        return rollout.validate()


# --------------------------------------------------------------------------- validation


def _check_meta(meta: Any, where: str) -> dict:
    """Checked meta.json content; one-line RolloutError naming ``where`` otherwise."""
    if not isinstance(meta, dict):
        raise RolloutError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise RolloutError(f"{where}: missing key(s) {', '.join(missing)}")
    version = meta.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise RolloutError(f"{where}: format_version {version!r} is not supported (this reader knows {FORMAT_VERSION})")
    for key in ("step", "weight_step", "num_prompts"):
        if not is_int(meta[key]) or meta[key] < 0:
            raise RolloutError(f"{where}: {key} must be an int >= 0, got {meta[key]!r}")
    if not is_int(meta["group_size"]) or meta["group_size"] < 1:
        raise RolloutError(f"{where}: group_size must be an int >= 1, got {meta['group_size']!r}")
    if meta["weight_step"] > meta["step"]:
        raise RolloutError(f"{where}: weight_step {meta['weight_step']} is newer than step {meta['step']}")
    pids = meta["problem_ids"]
    if not isinstance(pids, list) or not all(isinstance(p, str) or is_int(p) for p in pids):
        raise RolloutError(f"{where}: problem_ids must be a list of str or int")
    if len(pids) != meta["num_prompts"]:
        raise RolloutError(f"{where}: {len(pids)} problem_ids but num_prompts is {meta['num_prompts']}")
    if not isinstance(meta.get("extra", {}), dict):
        raise RolloutError(f"{where}: extra must be a JSON object, got {type(meta['extra']).__name__}")
    return meta


def _check_tensors(tensors: dict[str, Tensor], meta: dict, where: str) -> None:
    """Dtypes, shapes, offsets, prompt lengths and finiteness; one-line RolloutError otherwise."""
    missing = [k for k in TENSOR_DTYPES if k not in tensors]
    if missing:
        raise RolloutError(f"{where}: missing tensor(s) {', '.join(missing)}")
    for name, dtype in TENSOR_DTYPES.items():
        t = tensors[name]
        if t.dtype != dtype:
            raise RolloutError(f"{where}: {name} has dtype {str(t.dtype).removeprefix('torch.')}, "
                               f"expected {str(dtype).removeprefix('torch.')}")
        if t.dim() != 1:
            raise RolloutError(f"{where}: {name} must be 1-D, got shape {list(t.shape)}")
    num_seqs = meta["num_prompts"] * meta["group_size"]
    total = tensors["input_ids"].numel()
    _check_shape(tensors, "seq_offsets", num_seqs + 1, f"num_prompts*group_size+1 = {num_seqs + 1}", where)
    for name in _SEQ_TENSORS:
        _check_shape(tensors, name, num_seqs, f"num_prompts*group_size = {num_seqs}", where)
    _check_shape(tensors, "behaviour_logprobs", total, f"input_ids length {total}", where)
    offsets = tensors["seq_offsets"]
    lengths = torch.diff(offsets)
    if int(offsets[0]) != 0 or int(offsets[-1]) != total:
        raise RolloutError(f"{where}: seq_offsets must run from 0 to input_ids length {total}, "
                           f"got {int(offsets[0])}..{int(offsets[-1])}")
    if (lengths < 1).any():
        i = int(torch.nonzero(lengths < 1)[0])
        raise RolloutError(f"{where}: seq_offsets not strictly increasing at sequence {i} "
                           f"({int(offsets[i])} -> {int(offsets[i + 1])})")
    prompt = tensors["prompt_lengths"].long()
    bad = (prompt < 1) | (prompt > lengths)
    if bad.any():
        i = int(torch.nonzero(bad)[0])
        raise RolloutError(f"{where}: sequence {i} has prompt length {int(prompt[i])}, "
                           f"expected 1..{int(lengths[i])} (its length)")
    if (tensors["input_ids"] < 0).any():
        raise RolloutError(f"{where}: input_ids has negative token ids")
    if ((tensors["truncated"] != 0) & (tensors["truncated"] != 1)).any():
        raise RolloutError(f"{where}: truncated must hold only 0 and 1")
    for name in ("advantages", "rewards"):
        if not torch.isfinite(tensors[name]).all():
            i = int(torch.nonzero(~torch.isfinite(tensors[name]))[0])
            raise RolloutError(f"{where}: {name} is not finite at sequence {i}")
    _check_logprobs(tensors["behaviour_logprobs"], offsets, prompt, where)


def _check_shape(tensors: dict[str, Tensor], name: str, expected: int, why: str, where: str) -> None:
    got = tensors[name].numel()
    if got != expected:
        raise RolloutError(f"{where}: {name} has length {got}, expected {why}")


def _check_logprobs(logp: Tensor, offsets: Tensor, prompt: Tensor, where: str) -> None:
    """A NaN/inf behaviour log-prob on a trained token would poison the importance ratio."""
    bad = ~torch.isfinite(logp)
    if not bad.any():
        return
    lengths = torch.diff(offsets)
    seq = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    pos = torch.arange(logp.numel()) - offsets[seq]
    bad &= pos >= prompt[seq]
    if bad.any():
        t = int(torch.nonzero(bad)[0])
        raise RolloutError(f"{where}: behaviour_logprobs has {int(bad.sum())} non-finite value(s) at response "
                           f"positions (first: sequence {int(seq[t])}, token {int(pos[t])}: {float(logp[t])})")


# --------------------------------------------------------------------------- IO


def write_rollout(store: RunStore, step: int, rollout: Rollout) -> Path:
    """Validate, then publish ``rollouts/step_N`` atomically (it appears only with STABLE)."""
    if rollout.step != step:
        raise RolloutError(f"rollout for step {rollout.step} cannot be published as step {step}")
    rollout.validate(f"rollout for step {step}")
    with store.write_step("rollouts", step) as tmp:
        save_tensors(tmp / TENSOR_FILE, rollout.tensors())
        atomic_write_json(tmp / META_FILE, rollout.meta())
    return store.step_path("rollouts", step)


def read_rollout(source: RunStore | str | os.PathLike, step: int | None = None) -> Rollout:
    """Load and validate a batch: ``read_rollout(store, step)`` or ``read_rollout(step_dir)``.

    Through a store, the step must be STABLE and match its manifest (partial copies are caught).
    A bare path is read as is, for tools and tests. Every problem is a one-line
    :class:`RolloutError` (or a store error) naming the file.
    """
    if isinstance(source, RunStore):
        if step is None:
            raise TypeError("read_rollout(store, step): step is required with a RunStore")
        source.verify_step("rollouts", step)
        path = source.step_dir("rollouts", step)
    else:
        path = Path(source)
    meta_path, tensor_path = path / META_FILE, path / TENSOR_FILE
    for p in (meta_path, tensor_path):
        if not p.is_file():
            raise RolloutError(f"{p}: missing")
    meta = _check_meta(read_json(meta_path), str(meta_path))
    if step is not None and meta["step"] != step:
        raise RolloutError(f"{meta_path}: step is {meta['step']}, expected {step}")
    tensors = load_tensors(tensor_path)
    _check_tensors(tensors, meta, str(tensor_path))
    return Rollout(
        step=meta["step"],
        weight_step=meta["weight_step"],
        group_size=meta["group_size"],
        problem_ids=list(meta["problem_ids"]),
        extra=dict(meta.get("extra", {})),
        **{name: tensors[name] for name in TENSOR_DTYPES},
    )


# --------------------------------------------------------------------------- mini-batches


def mini_batches(rollout: Rollout, n: int) -> list[list[int]]:
    """Sequence indices of ``n`` mini-batches, split by prompt so every group stays whole.

    Whole groups matter because the advantages were normalised within a group; the first
    ``num_prompts / n`` prompts go to the first mini-batch (no shuffling: the orchestrator
    already drew prompts in a seeded random order).
    """
    if not is_int(n) or n < 1:
        raise ValueError(f"number of mini-batches must be an int >= 1, got {n!r}")
    if rollout.num_prompts % n:
        raise ValueError(f"{rollout.num_prompts} prompts do not split into {n} equal mini-batches")
    per = (rollout.num_prompts // n) * rollout.group_size
    return [list(range(k * per, (k + 1) * per)) for k in range(n)]
