"""The trainer's publisher (deepscaler.trainer.publisher): weights/step_N folders that reload to
the exact tensors written, with a probe.json that is what a fresh consumer computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deepscaler.safetensors_io import read_safetensors_header
from deepscaler.store import STABLE, RunStore
from deepscaler.trainer import publisher as P
from deepscaler.trainer.publisher import publish_weights
from deepscaler.weights_format import probe_logprobs, probe_token_ids, read_probe, verify_weights_dir
from tests.helpers.weights import reload, tiny_model

SAMPLES = [
    "What is $\\frac{1}{2} + \\frac{1}{3}$? Let's think step by step.",
    "<｜User｜>2+2?<｜Assistant｜><think>\nfour\n</think>\n\n$\\boxed{4}$<｜end▁of▁sentence｜>",
    "  spaces\tand\nnewlines 12345 ünïcödé",
]


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return RunStore(tmp_path / "out", "run", 1)


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
    probe = read_probe(path)
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
    assert read_probe(path)["logprobs"] == probe_logprobs(reloaded, probe_token_ids(tiny_tokenizer))


def test_state_dict_provider(store, tiny_tokenizer, vocab):
    """A ZeRO-3 caller passes gathered weights; the model only lends class and config."""
    model = tiny_model(vocab, seed=0)
    other = tiny_model(vocab, seed=1)
    gathered = {k: v.clone() for k, v in other.state_dict().items()}
    path = publish_weights(store, 5, model, tiny_tokenizer, state_dict=lambda: gathered)
    reloaded = reload(path)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in gathered.items())
    ids = probe_token_ids(tiny_tokenizer)
    assert read_probe(path)["logprobs"] == probe_logprobs(other, ids) != probe_logprobs(model, ids)

    custom = [3, 10, 20, 30, 40]  # a caller-chosen probe travels as given
    path = publish_weights(store, 6, model, tiny_tokenizer, state_dict=gathered, probe_ids=custom)
    probe = read_probe(path)
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
    probe = read_probe(path)
    assert probe["dtype"] == "bfloat16"
    assert probe["logprobs"] == probe_logprobs(reloaded, probe["token_ids"])
    assert probe["logprobs"] != probe_logprobs(model, probe["token_ids"])


def test_publish_refuses_a_stable_step(store, tiny_tokenizer, vocab):
    from deepscaler.store import StepExists

    model = tiny_model(vocab)
    publish_weights(store, 1, model, tiny_tokenizer)
    with pytest.raises(StepExists):
        publish_weights(store, 1, model, tiny_tokenizer)


def test_probe_beside_the_writes(store, tiny_tokenizer, vocab, monkeypatch):
    """The accelerator path (probe forward in a thread during the writes), forced on CPU.
    Simulated boundary: the GPU (``_overlap_probe`` says whether the device is one); and a
    probe whose forward fails, as it does there (out of memory), injected by hand."""
    monkeypatch.setattr(P, "_overlap_probe", lambda device: True)
    model = tiny_model(vocab)
    path = publish_weights(store, 1, model, tiny_tokenizer)
    probe = read_probe(path)
    assert probe["logprobs"] == probe_logprobs(reload(path), probe["token_ids"])

    def broken(*a, **k):
        raise RuntimeError("probe failed")

    monkeypatch.setattr(P, "probe_logprobs", broken)
    with pytest.raises(RuntimeError, match="probe failed"):
        publish_weights(store, 2, model, tiny_tokenizer)
    assert store.stable_steps("weights") == [1]
    assert sorted(p.name for p in store.weights_dir.iterdir()) == ["step_1"]
