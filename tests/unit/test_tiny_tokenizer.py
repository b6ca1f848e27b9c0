"""The tiny preset's tokenizer: deterministic, real special-token names, identical after reload."""

import json

import pytest

from deepscaler import tiny
from deepscaler.data import load_benchmark


@pytest.fixture(scope="module")
def fresh():
    """A second build, in memory and never saved: compared with the session fixture."""
    return tiny.build_tokenizer()


def _texts():
    """Bundled problems (LaTeX, digits, unicode) plus the shapes the reward depends on."""
    problems = [p.problem for name in ("math500", "olympiad_bench") for p in load_benchmark(name)[:40]]
    return problems + [
        "Okay, so 12345678 * 9 = 111111102.\n\n</think>\n\nThe answer is $\\boxed{\\frac{1}{2}}$.",
        "  leading spaces\r\n\ttabs, café (NFC: cafe\u0301), Ｆｕｌｌ width ｜▁, emoji 🙂, 中文",
        tiny.BOS + tiny.USER + "x" + tiny.ASSISTANT + tiny.THINK + "\n" + tiny.END_THINK + tiny.EOS,
    ]


def test_same_corpus_gives_same_vocab_and_merges(fresh, tiny_tokenizer):
    ours = json.loads(fresh.backend_tokenizer.to_str())["model"]
    other = json.loads(tiny_tokenizer.backend_tokenizer.to_str())["model"]
    assert ours["vocab"] == other["vocab"]
    assert ours["merges"] == other["merges"]


def test_vocab_fits_the_tiny_model(fresh, tiny_tokenizer):
    assert len(fresh) == len(tiny_tokenizer) == 4096


def test_special_tokens_are_single_ids_with_the_real_roles(tiny_tokenizer):
    ids = [tiny_tokenizer.encode(t, add_special_tokens=False) for t in tiny.SPECIAL_TOKENS]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == len(tiny.SPECIAL_TOKENS)
    assert tiny_tokenizer.eos_token == tiny_tokenizer.pad_token == "<｜end▁of▁sentence｜>"
    assert tiny_tokenizer.bos_token == "<｜begin▁of▁sentence｜>"
    assert tiny_tokenizer.eos_token_id == tiny_tokenizer.pad_token_id
    assert tiny_tokenizer.padding_side == "left"


def test_reload_with_qwen2_config_tokenizes_identically(fresh, tiny_tokenizer):
    # The pitfall is reproduced only if the reload really went through Qwen2's class.
    assert type(tiny_tokenizer).__name__ == "Qwen2Tokenizer"
    for text in _texts():
        assert tiny_tokenizer.encode(text, add_special_tokens=False) == fresh.encode(text, add_special_tokens=False)
        assert tiny_tokenizer.encode(text) == fresh.encode(text)


def test_think_and_boxed_survive_encode_decode(tiny_tokenizer):
    text = "Hmm, 2+2.\n</think>\n\nSo $\\boxed{4}$."
    ids = tiny_tokenizer.encode(text + tiny.EOS, add_special_tokens=False)
    assert tiny_tokenizer.convert_tokens_to_ids(tiny.END_THINK) in ids
    assert tiny_tokenizer.decode(ids) == text + tiny.EOS
    # Inference servers decode with skip_special_tokens: only bos/eos go, </think> stays.
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_template_has_the_deepseek_r1_shape(tiny_tokenizer):
    render = tiny_tokenizer.apply_chat_template
    user = [{"role": "user", "content": "Q"}]
    assert render(user, tokenize=False, add_generation_prompt=True) == (
        "<｜begin▁of▁sentence｜><｜User｜>Q<｜Assistant｜><think>\n"
    )
    turns = [{"role": "system", "content": "S"}, *user, {"role": "assistant", "content": "reason</think>A"}]
    assert render(turns, tokenize=False) == (
        "<｜begin▁of▁sentence｜>S<｜User｜>Q<｜Assistant｜>A<｜end▁of▁sentence｜>"
    )
