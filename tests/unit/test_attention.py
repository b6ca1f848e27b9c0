"""Attention over packed rows (deepscaler/trainer/attention.py).

Every kernel that runs on CPU must give a packed row the log-probs each of its sequences gets
alone. Two boundaries cannot be reached here (no GPU) and are simulated, each named where it
is: the CUDA device and flash-attn's presence (for what ``auto`` picks), and PyTorch's CUDA
varlen kernel (replaced by a reference of its documented contract, to test our glue).
"""

from __future__ import annotations

import functools
import sys

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

    calls = []

    @functools.wraps(_reference_varlen_attn)  # its signature, which the glue reads
    def counted(*args, **kwargs):
        calls.append(1)
        return _reference_varlen_attn(*args, **kwargs)

    monkeypatch.setattr(varlen, "varlen_attn", counted)
    model = tiny_model(seed=0).eval()  # 4 query heads, 2 key/value heads: grouped
    source = Sequences(LENGTHS)
    cpu_path = _log_probs(model, "varlen", pack(source, range(len(LENGTHS))))
    monkeypatch.setattr(attention, "_on_cuda", lambda t: True)
    # The model is fp32, where the real kernel would not run: the simulated GPU takes it.
    monkeypatch.setattr(attention, "flash_problem", lambda device, dtype: None)
    cuda_path = _log_probs(model, "varlen", pack(source, range(len(LENGTHS))))
    torch.testing.assert_close(cuda_path, cpu_path, atol=1e-6, rtol=0)
    assert calls  # the CUDA kernel's path was taken


def test_boundaries_come_from_restarting_positions_when_not_given():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert attention.sequence_boundaries(pos, 1, 6, "cpu").tolist() == [0, 3, 5, 6]
    assert attention.sequence_boundaries(None, 2, 3, "cpu").tolist() == [0, 3, 6]


# --------------------------------------------------------------------------- which kernel may run on which GPU

_SIMULATED = {"capability": (9, 0)}


@functools.wraps(_reference_varlen_attn)  # its signature, which the glue reads
def _flash_only_varlen_attn(q, k, v, *args, **kw):
    """Simulated boundary: torch's CUDA ``varlen_attn``, which in torch 2.13/2.14 always runs
    FlashAttention-2: it fails, as the real one does, for fp32 or a GPU below sm80 (the simulated
    capability), and otherwise computes its documented contract."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
    if _SIMULATED["capability"] < (8, 0):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")
    return _reference_varlen_attn(q, k, v, *args, **kw)


def _simulate_gpu(monkeypatch, capability, flash_attn=False):
    """Simulated boundary: a CUDA GPU of compute capability ``capability`` (the tensors stay on
    the CPU; ``_on_cuda`` and ``device_capability`` answer as that GPU would), torch's
    FlashAttention-only varlen kernel, and flash-attn's presence."""
    from torch.nn.attention import varlen

    _SIMULATED["capability"] = capability
    monkeypatch.setattr(varlen, "varlen_attn", _flash_only_varlen_attn)
    monkeypatch.setattr(attention, "_on_cuda", lambda t: True)
    monkeypatch.setattr(attention, "device_capability", lambda device: capability)
    monkeypatch.setattr(attention, "torch_varlen_available", lambda: True)
    monkeypatch.setattr(attention, "flash_attn_available", lambda: flash_attn)


@pytest.mark.parametrize("capability", [(9, 0), (7, 0)], ids=["fp32-on-sm90", "fp32-on-sm70"])
def test_fp32_or_a_pre_ampere_gpu_never_gets_a_flash_kernel_and_stays_exact_on_packed_rows(monkeypatch, capability):
    """``--preset tiny`` (precision fp32) on any GPU, and any preset on a GPU below sm80: the
    varlen kernel runs SDPA per sequence there, and a packed row still gives each sequence its
    unpacked log-probs. Simulated boundary: see ``_simulate_gpu``."""
    _simulate_gpu(monkeypatch, capability, flash_attn=True)
    cuda = torch.device("cuda", 0)
    assert attention.resolve("auto", cuda, torch.float32) == attention.VARLEN
    model = tiny_model(seed=0).eval()  # fp32
    source = Sequences(LENGTHS)
    packed_lp, packed_ent = _log_probs(model, "varlen", pack(source, range(len(LENGTHS))))
    alone = [_log_probs(model, "varlen", pack(source, [i])) for i in range(len(LENGTHS))]
    torch.testing.assert_close(packed_lp, torch.cat([a[0] for a in alone]), atol=1e-5, rtol=0)
    torch.testing.assert_close(packed_ent, torch.cat([a[1] for a in alone]), atol=1e-5, rtol=0)


def test_bf16_follows_the_gpu_generation(monkeypatch):
    """sm80+ in bf16 keeps the flash kernels (flash-attn's when it works, else torch's varlen);
    sm75 in bf16 gets neither. Simulated boundary: see ``_simulate_gpu``."""
    cuda = torch.device("cuda", 0)
    _simulate_gpu(monkeypatch, (8, 0), flash_attn=True)
    assert attention.resolve("auto", cuda, torch.bfloat16) == "flash_attention_2"
    assert attention.resolve("flash_attention_2", cuda, "bfloat16") == "flash_attention_2"
    assert attention.flash_problem(cuda, torch.bfloat16) is None
    _simulate_gpu(monkeypatch, (8, 0), flash_attn=False)
    assert attention.resolve("auto", cuda, torch.bfloat16) == attention.VARLEN
    _simulate_gpu(monkeypatch, (7, 5), flash_attn=True)
    assert attention.resolve("auto", cuda, torch.bfloat16) == attention.VARLEN
    assert "sm75" in attention.flash_problem(cuda, torch.bfloat16)


def test_the_flash_kernels_run_where_they_can(monkeypatch):
    """The other side of the fallback: bf16 on sm90 goes through torch's varlen kernel (the
    simulated FlashAttention-only one), not SDPA per sequence."""
    _simulate_gpu(monkeypatch, (9, 0))
    calls = []
    monkeypatch.setattr(attention, "_sdpa_per_sequence", lambda *a: calls.append("sdpa"))
    q = torch.randn(1, 4, 10, 8, dtype=torch.bfloat16)
    kv = torch.randn(1, 2, 10, 8, dtype=torch.bfloat16)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    out, _ = attention.varlen_attention_forward(None, q, kv, kv, None, position_ids=positions)
    assert out.shape == (1, 10, 4, 8) and not calls


@pytest.mark.parametrize("dtype, capability, words",
                         [(torch.float32, (9, 0), "float32"), (torch.bfloat16, (7, 0), "sm70")])
def test_flash_attention_2_asked_for_where_it_cannot_run_is_a_one_line_error(monkeypatch, dtype, capability, words):
    _simulate_gpu(monkeypatch, capability, flash_attn=True)
    with pytest.raises(attention.AttentionError) as err:
        attention.resolve("flash_attention_2", torch.device("cuda", 0), dtype)
    assert "\n" not in str(err.value) and words in str(err.value) and "trainer.attn_implementation" in str(err.value)


def test_the_choice_is_logged_once_with_its_reason(monkeypatch, caplog):
    _simulate_gpu(monkeypatch, (9, 0), flash_attn=True)
    attention._logged.clear()
    cuda = torch.device("cuda", 0)
    with caplog.at_level("INFO", logger="deepscaler.trainer.attention"):
        for _ in range(3):
            attention.resolve("auto", cuda, torch.float32)
    lines = [r.getMessage() for r in caplog.records if r.name == "deepscaler.trainer.attention"]
    assert len(lines) == 1, lines
    assert attention.VARLEN in lines[0] and "SDPA" in lines[0] and "float32" in lines[0]


# --------------------------------------------------------------------------- flash-attn: installed is not usable

def _plant_flash_attn(tmp_path, monkeypatch, init: str, extension: str | None) -> None:
    """Simulated boundary: a flash-attn install, planted on sys.path. ``flash_attn_2_cuda`` (the
    compiled extension of a real wheel) is a Python module here; ``extension=None`` leaves it out."""
    pkg = tmp_path / "flash_attn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(init)
    meta = tmp_path / "flash_attn-2.8.3.dist-info"  # as pip leaves it (transformers reads the version there)
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: flash_attn\nVersion: 2.8.3\n")
    if extension is not None:
        (tmp_path / "flash_attn_2_cuda.py").write_text(extension)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("flash_attn", "flash_attn_2_cuda"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    attention.flash_attn_problem.cache_clear()


@pytest.fixture
def fresh_flash_attn_probe():
    attention.flash_attn_problem.cache_clear()
    attention._logged.clear()
    yield
    for name in ("flash_attn", "flash_attn_2_cuda"):
        sys.modules.pop(name, None)
    attention.flash_attn_problem.cache_clear()


UNDEFINED = ("raise ImportError('/x/flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so: undefined symbol: "
             "_ZN3c104cuda9SetDeviceEi')\n")


@pytest.mark.parametrize("init, extension", [
    (UNDEFINED, None),  # the wheel's __init__ imports its extension, which was built for another torch
    ("def flash_attn_varlen_func(*a, **k): pass\n", UNDEFINED),  # the extension, imported on its own
    ("def flash_attn_varlen_func(*a, **k): pass\n", None),  # no extension at all
], ids=["package-import-fails", "extension-import-fails", "extension-missing"])
def test_a_flash_attn_that_does_not_import_against_this_torch_is_not_chosen(tmp_path, monkeypatch, caplog,
                                                                         fresh_flash_attn_probe, init, extension):
    """Simulated boundary: a flash-attn wheel planted on sys.path (``_plant_flash_attn``), broken
    as a wheel built against another torch is, plus a CUDA device for ``auto``."""
    _plant_flash_attn(tmp_path, monkeypatch, init, extension)
    with caplog.at_level("INFO", logger="deepscaler.trainer.attention"):
        assert not attention.flash_attn_available()
        monkeypatch.setattr(attention, "device_capability", lambda device: (9, 0))
        monkeypatch.setattr(attention, "torch_varlen_available", lambda: True)
        assert attention.resolve("auto", torch.device("cuda", 0), torch.bfloat16) == attention.VARLEN
        with pytest.raises(attention.AttentionError) as err:
            attention.resolve("flash_attention_2", torch.device("cuda", 0), torch.bfloat16)
    assert "flash_attn" in str(err.value) and "\n" not in str(err.value)
    reasons = [r.getMessage() for r in caplog.records if "flash-attn is installed but not usable" in r.getMessage()]
    assert len(reasons) == 1 and "flash_attn" in reasons[0] and attention.VARLEN in reasons[0], caplog.text


def test_a_flash_attn_that_imports_and_passes_the_probe_is_available(tmp_path, monkeypatch, fresh_flash_attn_probe):
    """The good side. Simulated boundary: a planted flash-attn whose compiled extension is a
    Python module that imports (``_plant_flash_attn``), plus a CUDA device for ``auto``."""
    init = "import flash_attn_2_cuda\ndef flash_attn_varlen_func(*a, **k): pass\n"
    _plant_flash_attn(tmp_path, monkeypatch, init, "")
    assert attention.flash_attn_available()
    monkeypatch.setattr(attention, "device_capability", lambda device: (9, 0))
    assert attention.resolve("auto", torch.device("cuda", 0), torch.bfloat16) == "flash_attention_2"
