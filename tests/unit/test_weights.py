"""weights/step_N as consumers check it (deepscaler.weights_format): the weight-sync probe,
verify_weights_dir and the dtype names. Folders come from the publisher (test_publisher.py)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from deepscaler import weights_format as W
from deepscaler.safetensors_io import load_tensors
from deepscaler.store import RunStore
from deepscaler.trainer.publisher import publish_weights
from deepscaler.weights_format import (WeightsDirError, compare_probe, probe_logprobs, probe_token_ids,
                                       verify_weights_dir)
from tests.helpers.weights import reload, tiny_model


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return RunStore(tmp_path / "out", "run", 1)


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


def test_dtype_names():
    assert W.dtype_name("bf16") == W.dtype_name(torch.bfloat16) == "bfloat16"
    assert W.as_dtype("torch.float32") is torch.float32
    with pytest.raises(ValueError):
        W.as_dtype("float8")


# --------------------------------------------------------------------------- a step as consumers load it


def test_a_publish_records_the_checksums_of_the_bytes_it_wrote(published, store):
    """The safetensors CRC32s come from the writer's stream (no re-read) and match the files;
    a changed byte that every header check misses is caught by them."""
    import zlib

    from deepscaler.store import StepCorrupt

    crcs = store.read_manifest("weights", 1)["crc32"]
    assert set(crcs) == set(store.read_manifest("weights", 1)["files"])
    for name, crc in crcs.items():
        assert zlib.crc32((published / name).read_bytes()) == crc, name
    shard = sorted(published.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the last tensor's data
    shard.write_bytes(bytes(data))
    verify_weights_dir(published)  # headers and lengths are fine
    with pytest.raises(StepCorrupt, match=rf"{shard.name} does not match the checksum recorded at save$"):
        W.check_weights_step(store, 1)


def _placeholder_steps(store: RunStore, steps) -> None:
    for step in steps:
        with store.write_step("weights", step) as tmp:
            (tmp / "model.safetensors").write_bytes(bytes(range(64)))


def test_servers_pass_over_a_damaged_newest_step_and_refuse_a_named_one(store, caplog):
    """``--weights-step latest`` (what a restarted stage's servers start from) takes the newest
    step that verifies, warning about the others; ``--weights-step N`` of a damaged step is a
    one-line error naming the file, never a load that fails deep in the backend."""
    from deepscaler.inference.server import BASE_STEP, resolve_start
    from deepscaler.store import StepCorrupt

    _placeholder_steps(store, (1, 2, 3))
    os.truncate(store.step_path("weights", 3) / "model.safetensors", 10)
    (store.step_path("weights", 2) / "model.safetensors").write_bytes(bytes(64))  # same size
    with caplog.at_level("WARNING"):
        assert resolve_start(store, "latest") == 1
    assert "step_3: model.safetensors has 10 bytes, manifest says 64" in caplog.text
    assert "step_2: model.safetensors does not match the checksum" in caplog.text
    with pytest.raises(StepCorrupt) as info:
        resolve_start(store, "3")
    assert "\n" not in str(info.value) and "step_3: model.safetensors has 10 bytes" in str(info.value)
    assert resolve_start(store, "1") == 1
    os.truncate(store.step_path("weights", 1) / "model.safetensors", 0)
    assert resolve_start(store, "latest") == BASE_STEP  # none left: the base model, as in a fresh stage
