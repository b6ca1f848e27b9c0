"""The tiny preset: a locally built tokenizer and model with the real model's shape of I/O.

Why: tests and the CPU preset must exercise the same code paths as DeepSeek-R1-Distill-Qwen-1.5B
(chat template, ``<think>``/``</think>``, ``\\boxed{}``, eos/pad) without downloading 3.5 GB.
So the tokenizer uses the real model's special-token names and template shape, and the
pre-tokenizer of Qwen2, because transformers 5 reloads a ``qwen2`` model folder's tokenizer
as ``Qwen2Tokenizer`` and swaps in Qwen2's own pre-tokenizer (docs/platform-notes.md): training
with that exact pipeline makes a reload tokenize identically.

The model is a small ``Qwen2ForCausalLM`` (untied embeddings, like the real one) saved as a
Hugging Face folder with the tokenizer, so every consumer loads it exactly like a real model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# The real model's special tokens (fullwidth ｜ U+FF5C and ▁ U+2581, see docs/platform-notes.md).
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
BOS = "<｜begin▁of▁sentence｜>"
THINK = "<think>"
END_THINK = "</think>"
# In the real tokenizer.json only bos/eos are "special"; User/Assistant/think are added but
# not special, so decode(skip_special_tokens=True) keeps "</think>" for the reward to see.
SPECIAL_TOKENS = (EOS, USER, ASSISTANT, BOS, THINK, END_THINK)
_SKIPPABLE = {EOS, BOS}

# Qwen2's split regex, identical to transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# DeepSeek-R1's (newer) template without the tool-call branches: bos, optional system text,
# user turns, assistant turns keeping only the text after </think>, and "<think>\n" opened
# for generation.
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}"
    "{%- endif %}"
    "{%- endfor -%}"
    "{% if add_generation_prompt %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)

# Reasoning-style filler so the shapes the reward looks for get their own merges.
_FILLER = (
    "Okay, so I need to find the value. Let me think step by step.\n"
    "First, let's compute the sum: 1 + 2 + 3 = 6. Then 6 \\times 7 = 42.\n"
    "Wait, let me check that again. Hmm, that seems right.\n"
    "So the answer is $\\frac{1}{2}$, i.e. 0.5, and $x^2 + y^2 = 25$, $\\sqrt{2}$, $\\pi r^2$.\n"
    "</think>\n\nThe final answer is $\\boxed{42}$.\n"
    "Therefore, the final answer is \\boxed{\\frac{3}{4}}.\n"
    "Let's think step by step and output the final answer within \\boxed{}.\n"
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14 -1 \\left( \\right) \\cdot \\leq \\geq \\neq\n"
)


def default_corpus() -> Iterator[str]:
    """Bundled problem texts (train and test) plus reasoning filler: no download needed."""
    bundled = Path(__file__).resolve().parent / "bundled"
    for path in sorted(bundled.glob("*/*.json")):
        for record in json.loads(path.read_text(encoding="utf-8")):
            if isinstance(record, dict) and isinstance(record.get("problem"), str):
                yield record["problem"]
    for _ in range(50):
        yield _FILLER


def _backend() -> Tokenizer:
    """An empty byte-level BPE with Qwen2Tokenizer's exact normalizer/pre-tokenizer/decoder."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _added_tokens() -> list[AddedToken]:
    """The special tokens as the real tokenizer.json declares them (not normalized)."""
    return [AddedToken(t, special=t in _SKIPPABLE, normalized=False) for t in SPECIAL_TOKENS]


def build_tokenizer(
    corpus: Iterable[str] | None = None, vocab_size: int = 4096, *, padding_side: str = "left"
) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE (about 1.5 s for 4k) and wrap it for transformers.

    ``vocab_size`` includes the six special tokens (ids 0-5), so it can equal the tiny
    model's vocab size. Left padding by default: batched generation needs it.
    """
    tok = _backend()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_added_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(default_corpus() if corpus is None else corpus, trainer=trainer)
    tok.add_tokens(_added_tokens())
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        # Saved as null, as in the real tokenizer_config.json. Left unset, a reload as
        # Qwen2Tokenizer adds "<|endoftext|>" at id vocab_size, past the model's embedding.
        unk_token=None,
        padding_side=padding_side,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tok: PreTrainedTokenizerFast, directory: str | Path) -> Path:
    """Save in the Hugging Face layout that ``AutoTokenizer.from_pretrained`` and vLLM read."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(directory))
    return directory


def model_config(shape):
    """The transformers config of the tiny model of ``shape`` (a ``TinyModelConfig``)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        intermediate_size=shape.intermediate_size,
        vocab_size=shape.vocab_size,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=SPECIAL_TOKENS.index(BOS),
        eos_token_id=SPECIAL_TOKENS.index(EOS),
        pad_token_id=SPECIAL_TOKENS.index(EOS),
    )


def build_model(shape, seed: int = 0):
    """A randomly initialised Qwen2 of ``shape`` (a ``TinyModelConfig``), seeded, float32."""
    import torch
    from transformers import Qwen2ForCausalLM

    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(model_config(shape)).float()


def _save_model(model, directory: Path) -> None:
    """Write the HF folder files directly. Why not ``save_pretrained``: transformers 5 writes
    nothing but the weights on a torch.distributed rank other than 0, so a trainer rank
    building the model would publish a folder with no config.json."""
    from deepscaler.safetensors_io import save_tensors

    model.config.architectures = [type(model).__name__]
    model.config.dtype = "float32"
    model.config.save_pretrained(str(directory))
    model.generation_config.save_pretrained(str(directory))
    # save_tensors: the run's umask applies (safetensors' own save_file creates 0600 files).
    save_tensors(directory / "model.safetensors", model.state_dict(), metadata={"format": "pt"})


def tiny_model_dir(cache_dir: str | Path, shape, seed: int = 0) -> Path:
    """Where the tiny model of ``shape`` and ``seed`` lives under ``cache_dir`` (built or not).
    The name hashes both, so a changed preset never reuses a stale model."""
    from dataclasses import asdict

    key = hashlib.sha256(json.dumps({"shape": asdict(shape), "seed": seed}, sort_keys=True).encode()).hexdigest()
    return Path(cache_dir) / f"tiny-{key[:12]}"


def is_built(folder: Path) -> bool:
    """Whether ``folder`` holds a built model: it appears complete, by a rename (:func:`ensure_tiny_model`)."""
    return (folder / "config.json").is_file()


def ensure_tiny_model(cache_dir: str | Path, shape, seed: int = 0, log=print) -> Path:
    """The tiny model + tokenizer as an HF folder (:func:`tiny_model_dir`), built once (and
    warm-started when ``shape.warm_start_updates`` says so; ``log`` gets its progress).

    It is built in a temporary sibling and renamed, so concurrent callers (several eval tasks
    or launchers starting together) never see half a folder.
    """
    final = tiny_model_dir(cache_dir, shape, seed)
    if is_built(final):
        return final
    tmp = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tokenizer = build_tokenizer(vocab_size=shape.vocab_size)
        save_tokenizer(tokenizer, tmp)
        model = build_model(shape, seed)
        if shape.warm_start_updates:
            from deepscaler.warm_start import TASK, warm_start

            log(f"tiny model: {shape.warm_start_updates} supervised warm-start updates on {TASK}, once "
                f"(cached in {final})")
            warm_start(model, tokenizer, shape.warm_start_updates, seed, log=log)
        _save_model(model, tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process won the race: theirs is as good as ours
            if not is_built(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
