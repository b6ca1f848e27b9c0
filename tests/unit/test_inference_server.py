"""The request rules both inference backends share: validation, per-sample seeds, eos ids,
and the sampling distribution whose log-probs the server reports."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from deepscaler.inference.contract import GenerateRequest, eos_token_ids, sample_seed
from deepscaler.inference.hf import sampling_logprobs
from deepscaler.inference.server import RequestError, parse_generate, parse_probe, parse_update
from deepscaler.trainer.loss import token_log_probs

GOOD = {"prompts": [[3, 4, 5], [6]], "n": 2, "max_tokens": 8, "temperature": 0.6, "top_p": 1.0, "seed": 0}


def bad(**changes) -> dict:
    body = {**GOOD, **changes}
    return {k: v for k, v in body.items() if v is not ...}


def test_a_good_request_parses():
    req = parse_generate(GOOD, max_model_len=16, vocab_size=10)
    assert req == GenerateRequest([[3, 4, 5], [6]], 2, 8, 0.6, 1.0, 0)
    assert parse_generate(bad(seed=...), 16, 10).seed is None  # seed is optional


@pytest.mark.parametrize("body,message", [
    ([], "the request body must be a JSON object, got list"),
    (bad(top_p=...), "missing field 'top_p'"),
    (bad(temprature=1.0), "unknown field 'temprature'"),
    (bad(prompts=[]), "prompts must be a non-empty list"),
    (bad(prompts="3 4 5"), "prompts must be a non-empty list"),
    (bad(prompts=[[3], "x"]), "prompts[1] must be a list of token ids, got str"),
    (bad(prompts=[[3], []]), "prompts[1] has 0 tokens; it needs at least 1"),
    (bad(prompts=[[3], [1] * 16]), "prompts[1] has 16 tokens; the server's max model length is 16"),
    (bad(prompts=[[3, 10]]), "prompts[0][1] must be a token id in [0, 10), got 10"),
    (bad(prompts=[[3, True]]), "prompts[0][1] must be a token id in [0, 10), got True"),
    (bad(prompts=[[3, 4.0]]), "prompts[0][1] must be a token id in [0, 10), got 4.0"),
    (bad(n=0), "n must be an integer in [1, 1024], got 0"),
    (bad(max_tokens=0), "max_tokens must be an integer >= 1, got 0"),
    (bad(temperature=-0.1), "temperature must be a number >= 0, got -0.1"),
    (bad(temperature=float("nan")), "temperature must be a number >= 0, got nan"),
    (bad(top_p=0), "top_p must be a number in (0, 1], got 0"),
    (bad(seed="1"), "seed must be an integer or null, got '1'"),
])
def test_bad_generate_requests_name_the_field(body, message):
    with pytest.raises(RequestError) as e:
        parse_generate(body, max_model_len=16, vocab_size=10)
    assert str(e.value).startswith(message) and e.value.status == 400


def test_probe_and_update_requests():
    assert parse_probe({"token_ids": [1, 2]}, 16, 10) == [1, 2]
    with pytest.raises(RequestError, match="token_ids has 1 tokens; it needs at least 2"):
        parse_probe({"token_ids": [1]}, 16, 10)
    assert parse_update({"step": 3, "path": "/x/weights/step_3"}) == (3, "/x/weights/step_3")
    with pytest.raises(RequestError, match="step must be an integer >= 0, got -1"):
        parse_update({"step": -1, "path": "/x"})
    with pytest.raises(RequestError, match="missing field 'path'"):
        parse_update({"step": 1})


def test_sample_seeds_depend_on_seed_prompt_and_sample_only():
    seeds = {sample_seed(s, p, k) for s in range(4) for p in range(8) for k in range(8)}
    assert len(seeds) == 4 * 8 * 8  # distinct streams
    assert sample_seed(7, 2, 3) == sample_seed(7, 2, 3)
    assert all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(1, 23, 4) != sample_seed(12, 3, 4)  # no ambiguity from concatenation


def test_eos_ids_merge_tokenizer_and_generation_config():
    tok = SimpleNamespace(eos_token_id=151643)
    assert eos_token_ids(tok) == [151643]
    assert eos_token_ids(tok, SimpleNamespace(eos_token_id=[151643, 151645])) == [151643, 151645]
    assert eos_token_ids(SimpleNamespace(eos_token_id=None), SimpleNamespace(eos_token_id=2)) == [2]
    with pytest.raises(ValueError, match="no eos token id"):
        eos_token_ids(SimpleNamespace(eos_token_id=None))


def test_sampling_logprobs_are_the_trainers_log_probs_at_top_p_1():
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(5, 50, generator=g)
    tokens = torch.randint(0, 50, (5,), generator=g)
    for t in (0.6, 1.0):
        ours = sampling_logprobs(logits, t, 1.0).gather(-1, tokens[:, None])[:, 0]
        assert torch.equal(ours, token_log_probs(logits, tokens, t))
    # Greedy reports the untempered distribution (vLLM's processed log-probs for greedy requests).
    assert torch.equal(sampling_logprobs(logits, 0.0, 1.0), torch.log_softmax(logits, -1))


def test_top_p_keeps_the_smallest_nucleus_and_renormalises():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = sampling_logprobs(logits, 1.0, 0.8).exp()[0]
    # vLLM's rule: drop tokens whose ascending cumulative mass is <= 1 - top_p (0.05, 0.2 here).
    assert torch.allclose(kept, torch.tensor([0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]))
    top1 = sampling_logprobs(logits, 1.0, 1e-6).exp()[0]  # always at least the most likely token
    assert torch.allclose(top1, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert math.isclose(float(sampling_logprobs(logits, 1.0, 0.81).exp()[0].sum()), 1.0, rel_tol=1e-6)
