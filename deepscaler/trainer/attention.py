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
``varlen`` (the fastest measured there; ``python -m deepscaler.gpu_check --device cpu --attention``).

Both flash kernels (flash-attn's, and torch's ``varlen_attn``, which in torch 2.13/2.14 always
runs FlashAttention-2) need fp16/bf16 and a GPU of compute capability 8.0 or more. In fp32 (the
tiny presets) or on an older GPU, ``auto`` never picks flash-attn and ``varlen`` runs SDPA per
sequence, as on the CPU; asking for ``flash_attention_2`` there is a one-line error. The choice
is logged once, with its reason.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import logging

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


log = logging.getLogger(__name__)
_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.info("%s", message)


@functools.lru_cache(maxsize=None)
def flash_attn_problem() -> str | None:
    """Why flash-attn cannot run here (None: it can). Installed is not enough: a wheel built
    against another torch is found, then fails at its first import with undefined symbols. So
    it is imported, with its compiled extension; ``resolve`` logs the reason with its choice."""
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed (pip install flash-attn)"
    try:
        module = importlib.import_module("flash_attn")
        importlib.import_module("flash_attn_2_cuda")  # the kernels; flash_attn may import it lazily
        if not hasattr(module, "flash_attn_varlen_func"):
            raise ImportError("flash_attn has no flash_attn_varlen_func (not flash-attn 2)")
    except Exception as e:  # noqa: BLE001 (a broken wheel raises ImportError, OSError, RuntimeError, ...)
        return (f"flash-attn is installed but not usable with torch {torch.__version__} "
                f"({type(e).__name__}: {' '.join(str(e).split())})")
    return None


def flash_attn_available() -> bool:
    return flash_attn_problem() is None


@functools.lru_cache(maxsize=None)
def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The GPU's compute capability, (8, 0) for an A100; None where there is none to ask."""
    try:
        return tuple(torch.cuda.get_device_capability(device))
    except (RuntimeError, AssertionError, ValueError):
        return None


def flash_problem(device: torch.device, dtype: torch.dtype | str | None) -> str | None:
    """Why the FlashAttention-only kernels (flash-attn's, torch's ``varlen_attn``) cannot run
    on ``device`` in ``dtype`` (None: they can; a ``dtype`` of None is not checked)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return f"{str(dtype).removeprefix('torch.')} (FlashAttention needs fp16 or bf16)"
    capability = device_capability(device) if device.type == "cuda" else None
    if capability is not None and capability < (8, 0):
        return f"a sm{capability[0]}{capability[1]} GPU (FlashAttention needs sm80+, Ampere or newer)"
    return None


def torch_varlen_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def resolve(requested: str, device: torch.device, dtype: torch.dtype | str | None = None) -> str:
    """transformers' attention name for ``trainer.attn_implementation`` on ``device``, for a
    model in ``dtype`` (None: not checked, the kernel still falls back at its first call)."""
    cuda = device.type == "cuda"
    flash = flash_problem(device, dtype) if cuda and requested in ("auto", "varlen", "flash_attention_2") else None
    asks_flash_attn = cuda and requested in ("auto", "flash_attention_2")
    no_flash_attn = None if not asks_flash_attn or flash_attn_available() else flash_attn_problem()
    why = "as configured"
    if requested == "auto":
        if cuda and flash is None and no_flash_attn is None:
            _log_once(f"attention: flash_attention_2 on {device}: flash-attn imports and this GPU and dtype run it")
            return "flash_attention_2"
        requested, why = "varlen", no_flash_attn
    if requested == "flash_attention_2":
        missing = "no CUDA device" if not cuda else flash or no_flash_attn
        if missing:
            raise AttentionError(f"trainer.attn_implementation 'flash_attention_2' (the flash-attn package's kernel) "
                                 f"cannot run here: {missing}; 'auto' picks a kernel that can")
    if requested == "varlen" and cuda and flash is None and not torch_varlen_available():
        raise AttentionError(f"trainer.attn_implementation 'varlen' needs torch >= 2.10 on CUDA (this is "
                             f"{torch.__version__}); use flash_attention_2 or sdpa")
    if requested == "flex_attention" and not cuda:
        raise AttentionError("trainer.attn_implementation 'flex_attention' gives wrong results on CPU (NaN on packed "
                             "rows); use auto")
    if requested == "varlen":
        register()
        if cuda:
            kernel = "SDPA per sequence" if flash else "torch's varlen flash kernel"
            _log_once(f"attention: {VARLEN} ({kernel}) on {device}: {flash or why}")
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
    if _on_cuda(query) and (query.is_meta or _flash_runs(query)):
        longest = int(max_length_q) if max_length_q is not None else int((cu[1:] - cu[:-1]).max())
        out = _torch_varlen(q, k, v, cu.to(torch.int32), longest, scaling)
    else:
        out = _sdpa_per_sequence(q, k, v, cu.tolist(), scaling)
    return out.reshape(b, t, hq, d), None


def _on_cuda(t: torch.Tensor) -> bool:
    """The CUDA kernel's path: on CUDA, and on the meta device, where ``deepscaler.plan``
    traces the GPU's memory without one."""
    return t.is_cuda or t.is_meta


def _flash_runs(query: torch.Tensor) -> bool:
    """Whether torch's varlen kernel runs for this query; else SDPA per sequence (logged once)."""
    why = flash_problem(query.device, query.dtype)
    if why:
        _log_once(f"attention: {VARLEN} (SDPA per sequence) on {query.device}: {why}")
    return why is None


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
