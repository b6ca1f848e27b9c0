"""Loading the policy with transformers, from wherever ``model.name`` points: a Hugging Face
id (its prefetched snapshot), a local folder, or the tiny preset.

Every process (trainer, inference server, eval) resolves ``model.name`` through here, so
they all load the same weights and tokenizer. Loading only loads: what it reads is prepared
before the processes start (``deepscaler.prefetch``: a Hub snapshot fetched, the tiny model
built by ``prepare_model``).
"""

from __future__ import annotations

from deepscaler.config import Config

DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def model_source(cfg: Config) -> str:
    """A path that ``from_pretrained`` (and vLLM) can load for ``cfg.model``. A Hub id becomes
    its snapshot folder in the cache (``data.cache_dir``, prefetched), the tiny preset its built folder
    there, so every process reads the same files; a missing one is a one-line CacheError naming
    it and the command that makes it."""
    from deepscaler.prefetch import hub_model, model_snapshot, tiny_model

    if cfg.model.name == "tiny":
        return str(tiny_model(cfg))
    repo = hub_model(cfg)
    return cfg.model.name if repo is None else str(model_snapshot(cfg, repo))


# config.json of the recipe's model on the Hub (the fields that set its shape and numerics),
# so the planner and deepscaler/gpu_check.py know it without the Hub or the weights.
KNOWN_CONFIGS = {
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 1536, "num_hidden_layers": 28,
        "num_attention_heads": 12, "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": 151936,
        "max_position_embeddings": 131072, "rope_theta": 10000, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "bos_token_id": 151646, "eos_token_id": 151643, "torch_dtype": "bfloat16",
    },
}


def model_config(cfg: Config):
    """The transformers config of ``cfg.model`` without loading weights: the tiny preset's
    shape, a local folder's or the prefetched cache's config.json, else the copy above.
    ConfigError when none is at hand."""
    from transformers import AutoConfig

    from deepscaler.config import ConfigError

    if cfg.model.name == "tiny":
        from deepscaler.tiny import model_config as tiny_config

        return tiny_config(cfg.model.tiny)
    try:
        return AutoConfig.from_pretrained(model_source(cfg), revision=cfg.model.revision)
    except Exception:  # not prefetched, no network: the recorded shape, if known
        known = KNOWN_CONFIGS.get(cfg.model.name)
        if known is None:
            raise ConfigError(f"key 'model.name': no config.json for {cfg.model.name!r} here; fetch it with "
                              f"python -m deepscaler.prefetch") from None
        known = dict(known)
        return AutoConfig.for_model(known.pop("model_type"), **known)


def load_tokenizer(source: str, revision: str | None = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, revision=revision)


def load_causal_lm(source: str, dtype: str, revision: str | None = None, attn_implementation: str | None = None):
    """The model in ``dtype`` on CPU; the caller moves it (DeepSpeed does for the trainer).
    ``attn_implementation``: transformers' name (``trainer/attention.py`` resolves the
    trainer's); None: transformers' default (sdpa)."""
    import torch
    from transformers import AutoModelForCausalLM

    # use_safetensors: never unpickle a *.bin from the shared filesystem.
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=getattr(torch, DTYPES[dtype]),
                                                use_safetensors=True, **extra)
