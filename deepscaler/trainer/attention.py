"""Attention over packed rows: which kernel the trainer uses, and the ``varlen`` kernel.

A packed row (``trainer/packing.py``) holds several sequences back to back; attention must
stay inside each one. The choices (``trainer.attn_implementation``):

- ``flash_attention_2``: flash-attn's varlen kernel through transformers, with the row's
  sequence boundaries passed as ``cu_seq_lens_q/k``. Needs the flash-attn package, which has
  no wheel for most torch builds (compiling it takes hours), so it is used when it imports.
- ``varlen`` (registered here): on CUDA, PyTorch's own varlen flash kernel
  (``torch.nn.attention.varlen.varlen_attn``, torch 2.10 and later), with the same
  boundaries: causal inside each sequence, nothing across, no mask tensor, no compilation,
  and no package beyond torch. Elsewhere, SDPA with ``is_causal`` per sequence: exact, and
  its cost grows with the sum of the squared sequence lengths, not the row's.
- ``sdpa``, ``eager``: transformers turns the restarting ``position_ids`` into a dense
  ``[1, 1, T, T]`` block-diagonal mask. Correct, but O(T^2) in memory and compute with no
  causal skipping: about 1 GiB of mask at T = 32768 and roughly 10x the attention FLOPs of a
  varlen kernel for stage 1's rows.
- ``flex_attention``: a document-masked BlockMask. Wrong on CPU with torch 2.13 (NaN logits
  on packed rows; checked), untested on GPU, so ``auto`` never picks it and the CPU refuses it.

``auto``: on CUDA, ``flash_attention_2`` when flash-attn imports, else ``varlen``; on CPU,
``varlen`` (the fastest measured there; ``benchmarks/trainer_throughput.py --attention``).
"""

from __future__ import annotations

import importlib.util
import inspect

import torch
import torch.nn.functional as F

from deepscaler.config import ConfigError

# The key under which transformers finds our kernel (config.attn_implementation).
VARLEN = "deepscaler_varlen"
# trainer.attn_implementation -> transformers' name.
IMPLEMENTATIONS = {"varlen": VARLEN, "flash_attention_2": "flash_attention_2", "sdpa": "sdpa", "eager": "eager",
                   "flex_attention": "flex_attention"}


class AttentionError(ConfigError):
    """An attention implementation that cannot run here. The message is one line (the trainer
    prints it as a config error and exits 2)."""


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def torch_varlen_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def resolve(requested: str, device: torch.device) -> str:
    """transformers' attention name for ``trainer.attn_implementation`` on ``device``."""
    cuda = device.type == "cuda"
    if requested == "auto":
        if cuda and flash_attn_available():
            return "flash_attention_2"
        requested = "varlen"
    if requested == "flash_attention_2" and not (cuda and flash_attn_available()):
        raise AttentionError("trainer.attn_implementation 'flash_attention_2' needs CUDA and the flash-attn package "
                             "(pip install flash-attn); 'auto' uses PyTorch's varlen kernel instead")
    if requested == "varlen" and cuda and not torch_varlen_available():
        raise AttentionError(f"trainer.attn_implementation 'varlen' needs torch >= 2.10 on CUDA (this is "
                             f"{torch.__version__}); use flash_attention_2 or sdpa")
    if requested == "flex_attention" and not cuda:
        raise AttentionError("trainer.attn_implementation 'flex_attention' gives wrong results on CPU (NaN on packed "
                             "rows); use auto")
    if requested == "varlen":
        register()
    return IMPLEMENTATIONS[requested]


def register() -> None:
    """Make ``VARLEN`` known to transformers. Idempotent. transformers builds no mask for a
    name it has no mask function for, which is what a varlen kernel wants."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)


def sequence_boundaries(position_ids: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """cu_seqlens (int32) of the flattened ``[batch * length]`` tokens: a sequence starts
    wherever the position restarts at 0, and at every row start."""
    starts = torch.zeros(batch, length, dtype=torch.bool, device=device)
    starts[:, 0] = True
    if position_ids is not None:
        starts |= position_ids.expand(batch, length) == 0
    idx = torch.nonzero(starts.reshape(-1)).reshape(-1)
    end = torch.tensor([batch * length], device=device)
    return torch.cat([idx, end]).to(torch.int32)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, sliding_window=None, *, cu_seq_lens_q=None,
                             max_length_q=None, position_ids=None, **kwargs):
    """transformers' attention signature: ``query`` ``[B, Hq, T, D]``, ``key``/``value``
    ``[B, Hkv, T, D]``; returns ``([B, T, Hq, D], None)``. Causal inside each sequence of
    ``cu_seq_lens_q`` (else derived from ``position_ids``), nothing across."""
    if attention_mask is not None or sliding_window is not None or dropout:
        raise AttentionError("the varlen attention takes no mask, sliding window or dropout; use sdpa for this model")
    b, hq, t, d = query.shape
    if key.shape[2] != t:
        raise AttentionError("the varlen attention is for training (no KV cache); use sdpa to generate")
    q, k, v = (x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (query, key, value))
    cu = cu_seq_lens_q if cu_seq_lens_q is not None else sequence_boundaries(position_ids, b, t, query.device)
    if _on_cuda(query):
        longest = int(max_length_q) if max_length_q is not None else int((cu[1:] - cu[:-1]).max())
        out = _torch_varlen(q, k, v, cu.to(torch.int32), longest, scaling)
    else:
        out = _sdpa_per_sequence(q, k, v, cu.tolist(), scaling)
    return out.reshape(b, t, hq, d), None


def _on_cuda(t: torch.Tensor) -> bool:
    """The CUDA kernel's path: on CUDA, and on the meta device, where ``deepscaler.plan``
    traces the GPU's memory without one."""
    return t.is_cuda or t.is_meta


def _sdpa_per_sequence(q, k, v, cu: list[int], scaling):
    """Exact causal attention of each ``[start, end)`` slice ([tokens, heads, dim] layout)."""
    parts = []
    for start, end in zip(cu[:-1], cu[1:]):
        qi, ki, vi = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        parts.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scaling,
                                                    enable_gqa=qi.shape[1] != ki.shape[1])[0].transpose(0, 1))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _torch_varlen(q, k, v, cu, longest: int, scaling):
    """PyTorch's varlen flash kernel. Its keywords changed across releases: causal masking is
    ``window_size=(-1, 0)`` (torch 2.13) or ``is_causal=True`` (earlier)."""
    from torch.nn.attention import varlen

    params = inspect.signature(varlen.varlen_attn).parameters
    kw = {"scale": scaling}
    kw.update({"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True})
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return varlen.varlen_attn(q, k, v, cu, cu, longest, longest, **kw)
