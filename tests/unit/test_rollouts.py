"""The rollout batch format: round trip through the store, validation errors, mini-batches."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import pytest
import torch

from deepscaler.rollouts import META_FILE, TENSOR_FILE, Rollout, RolloutError, mini_batches, read_rollout, write_rollout
from deepscaler.safetensors_io import load_tensors, save_tensors
from deepscaler.store import STABLE, CorruptFileError, RunStore, StepCorrupt, StepNotFound, atomic_write_json, read_json


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return RunStore(tmp_path / "out", "run1", 1)


def make_rollout(step: int = 3, num_prompts: int = 4, group_size: int = 2) -> Rollout:
    """Sequence i: prompt of 2 + (g % 3) tokens, response of i % 4 tokens (so some are empty)."""
    prompts, responses, logps = [], [], []
    for i in range(num_prompts * group_size):
        g = i // group_size
        prompts.append([100 + g] * (2 + g % 3))
        responses.append([i + 1] * (i % 4))
        logps.append([-0.25 * (k + 1) for k in range(i % 4)])
    n = num_prompts * group_size
    return Rollout.from_sequences(
        step=step, weight_step=max(0, step - 1), group_size=group_size,
        problem_ids=[f"prob-{g}" for g in range(num_prompts)],
        prompt_ids=prompts, response_ids=responses, response_logprobs=logps,
        rewards=[float(i % 2) for i in range(n)], advantages=[(-1.0) ** i for i in range(n)],
        truncated=[i % 3 == 0 for i in range(n)], extra={"temperature": 0.6, "sampling_s": 1.5},
    )


# --------------------------------------------------------------------------- round trip


def test_round_trip_through_store(store: RunStore) -> None:
    r = make_rollout()
    path = write_rollout(store, 3, r)
    assert path == store.step_path("rollouts", 3)
    assert (path / STABLE).is_file() and (path / TENSOR_FILE).is_file() and (path / META_FILE).is_file()
    assert store.stable_steps("rollouts") == [3]
    back = read_rollout(store, 3)
    for name, t in r.tensors().items():
        assert torch.equal(getattr(back, name), t), name
        assert getattr(back, name).dtype == t.dtype
    assert (back.step, back.weight_step, back.group_size) == (3, 2, 2)
    assert back.problem_ids == r.problem_ids and back.extra == {"temperature": 0.6, "sampling_s": 1.5}
    assert read_json(path / META_FILE)["num_prompts"] == 4
    assert read_rollout(path).num_seqs == 8  # a bare step dir reads too


def test_accessors() -> None:
    r = make_rollout()
    assert r.num_prompts == 4 and r.num_seqs == 8
    assert r.seq_lengths == [2, 3, 5, 6, 4, 5, 4, 5]
    assert r.response_lengths == [0, 1, 2, 3, 0, 1, 2, 3]
    assert r.num_tokens == sum(r.seq_lengths)
    ids, plen, lp = r.sequence(3)
    assert ids.tolist() == [101, 101, 101, 4, 4, 4] and plen == 3
    assert lp.tolist() == [0.0, 0.0, 0.0, -0.25, -0.5, -0.75]
    assert list(r.group(2)) == [4, 5]
    with pytest.raises(IndexError):
        r.sequence(8)


def test_empty_response_is_allowed(store: RunStore) -> None:
    r = make_rollout()
    ids, plen, _ = r.sequence(0)
    assert plen == ids.numel()  # sequence 0 has no response
    write_rollout(store, 3, r)
    assert read_rollout(store, 3).response_lengths[0] == 0


def test_write_refuses_wrong_step_and_invalid_batch(store: RunStore) -> None:
    with pytest.raises(RolloutError, match="step 3 cannot be published as step 4"):
        write_rollout(store, 4, make_rollout())
    bad = make_rollout()
    bad.advantages[1] = float("nan")
    with pytest.raises(RolloutError, match="advantages is not finite at sequence 1"):
        write_rollout(store, 3, bad)
    assert not store.rollouts_dir.exists() or not any(store.rollouts_dir.iterdir())


def test_read_through_store_requires_stable_and_intact(store: RunStore) -> None:
    with pytest.raises(StepNotFound):
        read_rollout(store, 3)
    path = write_rollout(store, 3, make_rollout())
    with open(path / TENSOR_FILE, "ab") as f:
        f.write(b"\0")
    with pytest.raises(StepCorrupt, match=TENSOR_FILE):
        read_rollout(store, 3)


def test_from_sequences_rejects_mismatched_lists() -> None:
    kwargs = dict(step=0, weight_step=0, group_size=1, problem_ids=["a"], prompt_ids=[[1]], response_ids=[[2, 3]],
                  rewards=[0.0], advantages=[0.0], truncated=[False])
    with pytest.raises(RolloutError, match="sequence 0 has 2 response tokens but 1 log-probs"):
        Rollout.from_sequences(response_logprobs=[[-1.0]], **kwargs)
    with pytest.raises(RolloutError, match="rewards has 2 entries, prompt_ids has 1"):
        Rollout.from_sequences(response_logprobs=[[-1.0, -1.0]], **{**kwargs, "rewards": [0.0, 1.0]})


# --------------------------------------------------------------------------- validation on read


def _set(name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict, dict], None]:
    def edit(tensors: dict, meta: dict) -> None:
        tensors[name] = fn(tensors[name].clone())
    return edit


def _meta(**changes) -> Callable[[dict, dict], None]:
    def edit(tensors: dict, meta: dict) -> None:
        for k, v in changes.items():
            if v is _DROP:
                del meta[k]
            else:
                meta[k] = v
    return edit


def _index_set(t: torch.Tensor, i: int, value) -> torch.Tensor:
    t[i] = value
    return t


_DROP = object()

# (edit, file the error must name, regex of the issue)
CASES = {
    "meta missing key": (_meta(group_size=_DROP), META_FILE, r"missing key\(s\) group_size"),
    "meta bad group_size": (_meta(group_size=0), META_FILE, r"group_size must be an int >= 1"),
    "weight newer than step": (_meta(weight_step=9), META_FILE, r"weight_step 9 is newer than step 3"),
    "problem_ids count": (_meta(num_prompts=5), META_FILE, r"4 problem_ids but num_prompts is 5"),
    "num_seqs vs prompts": (_meta(num_prompts=2, problem_ids=["a", "b"]), TENSOR_FILE,
                            r"seq_offsets has length 9, expected num_prompts\*group_size\+1 = 5"),
    "unknown version": (_meta(format_version=2), META_FILE, r"format_version 2 is not supported"),
    "wrong dtype": (_set("input_ids", lambda t: t.long()), TENSOR_FILE, r"input_ids has dtype int64, expected int32"),
    "2-D tensor": (_set("rewards", lambda t: t[None]), TENSOR_FILE, r"rewards must be 1-D, got shape \[1, 8\]"),
    "missing tensor": (lambda t, m: t.pop("truncated"), TENSOR_FILE, r"missing tensor\(s\) truncated"),
    "logprobs length": (_set("behaviour_logprobs", lambda t: t[:-1]), TENSOR_FILE,
                        r"behaviour_logprobs has length 33, expected input_ids length 34"),
    "offsets not monotone": (_set("seq_offsets", lambda t: _index_set(t, 2, 11)), TENSOR_FILE,
                             r"seq_offsets not strictly increasing at sequence 2 \(11 -> 10\)"),
    "offsets not ending at total": (_set("seq_offsets", lambda t: _index_set(t, -1, 33)), TENSOR_FILE,
                                    r"seq_offsets must run from 0 to input_ids length 34, got 0\.\.33"),
    "prompt longer than sequence": (_set("prompt_lengths", lambda t: _index_set(t, 1, 4)), TENSOR_FILE,
                                    r"sequence 1 has prompt length 4, expected 1\.\.3"),
    "empty prompt": (_set("prompt_lengths", lambda t: _index_set(t, 1, 0)), TENSOR_FILE,
                     r"sequence 1 has prompt length 0"),
    "nan logprob in response": (_set("behaviour_logprobs", lambda t: _index_set(t, 4, float("nan"))), TENSOR_FILE,
                                r"1 non-finite value\(s\) at response positions \(first: sequence 1, token 2: nan\)"),
    "truncated not 0/1": (_set("truncated", lambda t: _index_set(t, 0, 2)), TENSOR_FILE, r"only 0 and 1"),
    "reward inf": (_set("rewards", lambda t: _index_set(t, 5, float("inf"))), TENSOR_FILE,
                   r"rewards is not finite at sequence 5"),
    "negative token": (_set("input_ids", lambda t: _index_set(t, 0, -1)), TENSOR_FILE, r"negative token ids"),
}


def _rewrite(path: Path, edit: Callable[[dict, dict], None]) -> None:
    tensors, meta = load_tensors(path / TENSOR_FILE), read_json(path / META_FILE)
    edit(tensors, meta)
    save_tensors(path / TENSOR_FILE, tensors)
    atomic_write_json(path / META_FILE, meta)


@pytest.mark.parametrize("case", sorted(CASES))
def test_validation_errors_are_one_line_naming_file_and_issue(store: RunStore, case: str) -> None:
    edit, fname, pattern = CASES[case]
    path = write_rollout(store, 3, make_rollout())
    _rewrite(path, edit)
    with pytest.raises(RolloutError) as info:
        read_rollout(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path / fname}: "), msg
    assert re.search(pattern, msg), msg


def test_nonfinite_logprob_at_prompt_position_is_tolerated(store: RunStore) -> None:
    path = write_rollout(store, 3, make_rollout())
    _rewrite(path, _set("behaviour_logprobs", lambda t: _index_set(t, 0, float("-inf"))))
    assert read_rollout(path).num_seqs == 8


@pytest.mark.parametrize("fname", [META_FILE, TENSOR_FILE])
def test_missing_file(store: RunStore, fname: str) -> None:
    path = write_rollout(store, 3, make_rollout())
    (path / fname).unlink()
    with pytest.raises(RolloutError, match=f"^{path / fname}: missing$"):
        read_rollout(path)


@pytest.mark.parametrize("fname", [META_FILE, TENSOR_FILE])
def test_garbage_file_is_one_line_error(store: RunStore, fname: str) -> None:
    path = write_rollout(store, 3, make_rollout())
    (path / fname).write_bytes(b"\x00garbage{")
    with pytest.raises(CorruptFileError) as info:
        read_rollout(path)
    assert str(info.value).startswith(str(path / fname)) and "\n" not in str(info.value)


def test_meta_step_must_match_requested_step(store: RunStore) -> None:
    path = write_rollout(store, 3, make_rollout())
    with pytest.raises(RolloutError, match=f"{path / META_FILE}: step is 3, expected 5"):
        read_rollout(path, 5)


# --------------------------------------------------------------------------- mini-batches


def test_mini_batches_split_by_prompt() -> None:
    r = make_rollout(num_prompts=4, group_size=2)
    assert mini_batches(r, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert mini_batches(r, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert mini_batches(r, 1) == [list(range(8))]
    for mb in mini_batches(make_rollout(num_prompts=6, group_size=3), 3):
        assert len({i // 3 for i in mb}) == 2 and len(mb) == 6  # whole groups only


@pytest.mark.parametrize("n", [3, 0, 8])
def test_mini_batches_must_divide_prompts(n: int) -> None:
    with pytest.raises(ValueError, match="do not split|must be an int >= 1"):
        mini_batches(make_rollout(num_prompts=4), n)
