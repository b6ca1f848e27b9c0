"""The tiny preset's warm start: what the README's first run starts from (deepscaler/warm_start.py)."""

from __future__ import annotations

from dataclasses import replace

import torch
from safetensors.torch import load_file

from deepscaler.config import TinyModelConfig, stage_config
from deepscaler.tiny import build_tokenizer, ensure_tiny_model
from deepscaler.warm_start import sft_batch, sft_loss

SHAPE = TinyModelConfig(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=128,
                        vocab_size=512, max_position_embeddings=256)


def test_the_readme_preset_learns_a_toy_task_from_a_warm_start_and_the_tests_preset_does_not():
    tiny, random = stage_config(1, "tiny"), stage_config(1, "tiny-random")
    assert tiny.data.train == "bundled:additions" and tiny.model.tiny.warm_start_updates > 0
    assert random.data.train == "bundled:math,aime" and random.model.tiny.warm_start_updates == 0
    assert (tiny.run.name, tiny.model.name, tiny.inference.backend) == ("tiny", "tiny", "hf")


def test_the_loss_falls_on_the_completion_and_eos_only():
    tok = build_tokenizer(vocab_size=512)
    ids, mask, labels = sft_batch(tok, [[7, 8, 9], [7]], ["12", "3"])
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 2
    assert (labels[0, :3] == -100).all() and (labels[1, :1] == -100).all()  # no loss on the prompt
    for row in range(2):
        target = labels[row][labels[row] != -100].tolist()
        assert target[-1] == tok.eos_token_id
        assert tok.decode(target[:-1]).endswith("\\boxed{" + ("12" if row == 0 else "3") + "}")
    assert mask[1].sum() == 1 + len(labels[1][labels[1] != -100])  # padding is masked out


def toy_loss(model_dir) -> float:
    """The warm start's own loss over the whole toy task (bundled:additions), no smoothing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deepscaler.data import format_prompt, load_problems

    model, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    problems, _ = load_problems("bundled:additions")
    prompts = tok([format_prompt(p.problem, tok) for p in problems], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return sft_loss(model.eval(), *sft_batch(tok, prompts, [p.answer for p in problems]), 0.0).item()


def test_a_warm_started_model_is_cached_apart_seeded_and_changed(tmp_path):
    plain = ensure_tiny_model(tmp_path, SHAPE)
    lines = []
    warm = ensure_tiny_model(tmp_path, replace(SHAPE, warm_start_updates=3), log=lines.append)
    again = ensure_tiny_model(tmp_path / "other", replace(SHAPE, warm_start_updates=3), log=lines.append)
    assert warm != plain and warm.name == again.name  # the update count is part of the cache key
    assert "3 supervised warm-start updates on bundled:additions" in lines[0]
    a, b, c = (load_file(d / "model.safetensors") for d in (plain, warm, again))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert toy_loss(warm) < toy_loss(plain)  # it trained: on the toy task, not just somewhere
    assert all(torch.equal(b[k], c[k]) for k in b)  # and is the same for the same seed
    assert ensure_tiny_model(tmp_path, replace(SHAPE, warm_start_updates=3), log=lines.append) == warm
    assert len([x for x in lines if "supervised" in x]) == 2  # built once per cache
