"""Attention over packed rows (deepscaler/trainer/attention.py).

Every kernel that runs on CPU must give a packed row the log-probs each of its sequences gets
alone. Two boundaries cannot be reached here (no GPU) and are simulated, each named where it
is: the CUDA device and flash-attn's presence (for what ``auto`` picks), and PyTorch's CUDA
varlen kernel (replaced by a reference of its documented contract, to test our glue).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepscaler.trainer import attention
from deepscaler.trainer.engine import packed_log_probs
from deepscaler.trainer.packing import pack
from tests.helpers.ckpt_worker import tiny_model

LENGTHS = [37, 5, 64, 18]  # a packed row of four sequences, one of them very short


class Sequences:
    """Four sequences with the flat tensors ``pack`` reads (prompt of 4, the rest response)."""

    def __init__(self, lengths):
        g = torch.Generator().manual_seed(0)
        self.input_ids = torch.randint(0, 256, (sum(lengths),), generator=g)
        self.seq_offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        self.prompt_lengths = [4] * len(lengths)
        self.behaviour_logprobs = torch.zeros(sum(lengths))
        self.advantages = torch.ones(len(lengths))


def _log_probs(model, impl, batch, chunk_tokens=4096):
    model.config._attn_implementation = attention.resolve(impl, torch.device("cpu"))
    with torch.no_grad():
        logp, ent = packed_log_probs(model, batch, 1.0, entropy=True, chunk_tokens=chunk_tokens)
    return logp[batch.loss_mask], ent[batch.loss_mask]


@pytest.mark.parametrize("impl", ["sdpa", "eager", "varlen", "auto"])
def test_a_packed_row_gives_each_sequence_its_unpacked_log_probs(impl):
    model = tiny_model(seed=0).eval()
    source = Sequences(LENGTHS)
    packed_lp, packed_ent = _log_probs(model, impl, pack(source, range(len(LENGTHS))))
    alone = [_log_probs(model, impl, pack(source, [i])) for i in range(len(LENGTHS))]
    torch.testing.assert_close(packed_lp, torch.cat([a[0] for a in alone]), atol=1e-5, rtol=0)
    torch.testing.assert_close(packed_ent, torch.cat([a[1] for a in alone]), atol=1e-5, rtol=0)


def test_the_logits_chunk_size_does_not_change_the_result():
    model = tiny_model(seed=0).eval()
    batch = pack(Sequences(LENGTHS), range(len(LENGTHS)))
    whole = _log_probs(model, "varlen", batch, chunk_tokens=4096)
    chunked = _log_probs(model, "varlen", batch, chunk_tokens=7)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)


def test_auto_on_cpu_is_the_per_sequence_kernel():
    assert attention.resolve("auto", torch.device("cpu")) == attention.VARLEN


def test_auto_on_cuda_picks_a_varlen_kernel(monkeypatch):
    """Simulated boundary: a CUDA device and flash-attn's presence (neither exists here)."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(attention, "torch_varlen_available", lambda: True)
    monkeypatch.setattr(attention, "flash_attn_available", lambda: False)
    assert attention.resolve("auto", cuda) == attention.VARLEN
    monkeypatch.setattr(attention, "flash_attn_available", lambda: True)
    assert attention.resolve("auto", cuda) == "flash_attention_2"
    # What auto never picks: the dense-mask kernels.
    assert attention.resolve("auto", cuda) not in ("sdpa", "eager", "flex_attention")


def test_kernels_that_cannot_run_here_are_one_line_errors(monkeypatch):
    # Simulated boundary: flash-attn, a GPU-only package (absent here anyway; pinned so a
    # machine that has it still tests the refusal).
    monkeypatch.setattr(attention, "flash_attn_available", lambda: False)
    for impl, words in (("flash_attention_2", "flash-attn"), ("flex_attention", "CPU")):
        with pytest.raises(attention.AttentionError) as err:
            attention.resolve(impl, torch.device("cpu"))
        assert "\n" not in str(err.value) and words in str(err.value) and "trainer.attn_implementation" in str(err.value)


def _reference_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                           enable_gqa=False, **_):
    """The documented contract of torch.nn.attention.varlen.varlen_attn (q, k, v [T, H, D];
    cu_seq int32 [N + 1]; window (-1, 0) = causal), computed with SDPA on the CPU."""
    assert q.dim() == 3 and cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k)
    assert max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
    causal = window_size == (-1, 0)
    out = []
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qi, ki, vi = (x[s:e].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        out.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=causal, scale=scale,
                                                  enable_gqa=enable_gqa)[0].transpose(0, 1))
    return torch.cat(out)


def test_the_cuda_kernel_gets_the_boundaries_causal_flag_and_grouped_heads(monkeypatch):
    """Simulated boundary: PyTorch's CUDA varlen kernel (no GPU here) is replaced by a
    reference of its documented contract; what is tested is our call of it."""
    from torch.nn.attention import varlen

    monkeypatch.setattr(varlen, "varlen_attn", _reference_varlen_attn)
    model = tiny_model(seed=0).eval()  # 4 query heads, 2 key/value heads: grouped
    source = Sequences(LENGTHS)
    cpu_path = _log_probs(model, "varlen", pack(source, range(len(LENGTHS))))
    monkeypatch.setattr(attention, "_on_cuda", lambda t: True)
    cuda_path = _log_probs(model, "varlen", pack(source, range(len(LENGTHS))))
    torch.testing.assert_close(cuda_path, cpu_path, atol=1e-6, rtol=0)


def test_boundaries_come_from_restarting_positions_when_not_given():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert attention.sequence_boundaries(pos, 1, 6, "cpu").tolist() == [0, 3, 5, 6]
    assert attention.sequence_boundaries(None, 2, 3, "cpu").tolist() == [0, 3, 6]
