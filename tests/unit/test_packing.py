"""Sequence packing: rank balance, micro-batch plans, packed rows, and packed attention isolation."""

from __future__ import annotations

import random

import pytest
import torch

from deepscaler.rollouts import Rollout
from deepscaler.trainer.packing import PackedBatch, oversized, pack, pack_micro_batches, plan_step, split_across_ranks


def random_lengths(n: int, seed: int = 0, low: int = 50, high: int = 24_000) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(n)]


def loads(lengths, ranks) -> list[int]:
    return [sum(lengths[i] for i in r) for r in ranks]


# --------------------------------------------------------------------------- split across ranks


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_balances_tokens(world_size: int, seed: int) -> None:
    lengths = random_lengths(256, seed)
    ranks = split_across_ranks(lengths, world_size)
    ideal = sum(lengths) / world_size
    # LPT guarantees max load <= ideal + longest item and <= 4/3 of optimal; in practice far better.
    assert max(loads(lengths, ranks)) <= ideal + max(lengths)
    assert max(loads(lengths, ranks)) <= ideal * 1.01
    assert sorted(i for r in ranks for i in r) == list(range(256))
    assert all(r == sorted(r) for r in ranks)


def test_split_hand_example_and_tie_breaks() -> None:
    # longest first: 8 -> r0; 5 -> r1; 4 -> r1 (5 < 8); 3 -> r0 (8 < 9); 1 -> r1 (9 < 11)
    lengths = [3, 8, 1, 5, 4]
    assert split_across_ranks(lengths, 2) == [[0, 1], [2, 3, 4]]
    # equal lengths: ties by index, then least-loaded rank by rank index (round-robin)
    assert split_across_ranks([7] * 5, 3) == [[0, 3], [1, 4], [2]]
    # more ranks than sequences: the rest stay empty
    assert split_across_ranks([2, 9], 4) == [[1], [0], [], []]


def test_split_is_deterministic_and_order_independent() -> None:
    lengths = random_lengths(100, seed=3, low=1, high=20)  # many ties
    first = split_across_ranks(lengths, 4)
    assert split_across_ranks(list(lengths), 4) == first
    subset = list(range(0, 100, 3))
    shuffled = subset[:]
    random.Random(0).shuffle(shuffled)
    assert split_across_ranks(lengths, 4, indices=shuffled) == split_across_ranks(lengths, 4, indices=subset)


def test_split_rejects_bad_world_size() -> None:
    with pytest.raises(ValueError, match="world_size"):
        split_across_ranks([1, 2], 0)


# --------------------------------------------------------------------------- micro-batches


def test_pack_micro_batches_respects_budget_except_oversize() -> None:
    lengths = random_lengths(200, seed=5, low=10, high=3000)
    lengths[7] = 5000  # over the budget
    bins = pack_micro_batches(range(200), lengths, 4096)
    assert sorted(i for b in bins for i in b) == list(range(200))
    for b in bins:
        assert sum(lengths[i] for i in b) <= 4096 or b == [7]
    assert [7] in bins
    assert oversized(lengths, 4096) == [7]
    # first-fit-decreasing is close to the lower bound on the number of rows
    assert len(bins) <= sum(lengths) / 4096 * 1.1 + 2


def test_pack_micro_batches_hand_example() -> None:
    lengths = [6, 5, 4, 3, 2]
    # FFD with budget 10: 6 -> b0; 5 -> b1; 4 -> b0 (10); 3 -> b1 (8); 2 -> b1 (10)
    assert pack_micro_batches(range(5), lengths, 10) == [[0, 2], [1, 3, 4]]
    assert pack_micro_batches([], lengths, 10) == []


def test_plan_step_equal_micro_batch_counts_with_empty_fillers() -> None:
    # rank 0 gets the 10-token sequence alone; rank 1 gets three 4s that need two rows of budget 10
    lengths = [10, 4, 4, 4]
    plan = plan_step(lengths, 2, 10)
    assert plan == [[[0], []], [[1, 2], [3]]]
    assert len({len(p) for p in plan}) == 1


def test_plan_step_covers_every_sequence_once_and_is_deterministic() -> None:
    lengths = random_lengths(128, seed=7, low=100, high=8000)
    plan = plan_step(lengths, 4, 16_384)
    assert plan == plan_step(lengths, 4, 16_384)
    assert len({len(ranks) for ranks in plan}) == 1
    flat = [i for ranks in plan for mb in ranks for i in mb]
    assert sorted(flat) == list(range(128))
    for ranks in plan:
        for mb in ranks:
            assert sum(lengths[i] for i in mb) <= 16_384
        # fillers only at the end
        sizes = [len(mb) for mb in ranks]
        assert sizes == sorted(sizes, key=lambda s: s == 0)


def test_plan_step_with_indices_and_idle_ranks() -> None:
    lengths = [5, 6, 7, 8]
    assert plan_step(lengths, 3, 100, indices=[2, 3]) == [[[3]], [[2]], [[]]]
    assert plan_step(lengths, 2, 100, indices=[]) == [[[]], [[]]]


# --------------------------------------------------------------------------- packed rows


def two_seq_rollout() -> Rollout:
    # seq 0: prompt [11, 12], response [13, 14, 15]; seq 1: prompt [21], response [22, 23]
    return Rollout.from_sequences(
        step=0, weight_step=0, group_size=2, problem_ids=["p0"],
        prompt_ids=[[11, 12], [21]], response_ids=[[13, 14, 15], [22, 23]],
        response_logprobs=[[-0.1, -0.2, -0.3], [-0.4, -0.5]],
        rewards=[1.0, 0.0], advantages=[0.7, -0.7], truncated=[False, True],
    )


def test_pack_two_sequences_hand_checked() -> None:
    b = pack(two_seq_rollout(), [0, 1])
    assert b.input_ids.tolist() == [[11, 12, 13, 14, 15, 21, 22, 23]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    assert b.targets.tolist() == [[12, 13, 14, 15, 0, 22, 23, 0]]
    assert b.loss_mask.tolist() == [[False, True, True, True, False, True, True, False]]
    assert torch.allclose(b.behaviour_logp, torch.tensor([[0, -0.1, -0.2, -0.3, 0, -0.4, -0.5, 0]]))
    assert torch.allclose(b.advantages, torch.tensor([[0, 0.7, 0.7, 0.7, 0, -0.7, -0.7, 0]]))
    assert b.cu_seqlens.tolist() == [0, 5, 8]
    assert b.seq_indices == [0, 1] and b.num_tokens == 8 and b.num_loss_tokens == 5
    assert b.input_ids.dtype == b.targets.dtype == b.position_ids.dtype == torch.int64
    assert b.loss_mask.dtype == torch.bool and b.behaviour_logp.dtype == torch.float32
    # order follows the given indices
    assert pack(two_seq_rollout(), [1, 0]).input_ids.tolist() == [[21, 22, 23, 11, 12, 13, 14, 15]]


def test_empty_response_contributes_no_loss_tokens() -> None:
    r = Rollout.from_sequences(
        step=0, weight_step=0, group_size=2, problem_ids=[3],
        prompt_ids=[[1, 2, 3], [1, 2, 3]], response_ids=[[], [4]], response_logprobs=[[], [-1.0]],
        rewards=[0.0, 1.0], advantages=[-0.7, 0.7], truncated=[True, False],
    )
    alone = pack(r, [0])
    assert alone.num_tokens == 3 and alone.num_loss_tokens == 0
    assert alone.advantages.abs().sum() == 0 and alone.behaviour_logp.abs().sum() == 0
    both = pack(r, [0, 1])
    assert both.loss_mask.tolist() == [[False, False, False, False, False, True, False]]
    assert both.num_loss_tokens == sum(r.response_lengths)


def test_empty_micro_batch_gives_zero_loss_dummy() -> None:
    b = pack(two_seq_rollout(), [])
    assert b.input_ids.shape == (1, 1) and b.num_tokens == 0 and b.num_loss_tokens == 0
    assert b.seq_indices == [] and b.cu_seqlens.tolist() == [0, 1]
    from deepscaler.trainer.loss import grpo_loss

    logp = torch.zeros(1, 1, requires_grad=True)
    loss, _ = grpo_loss(logp, b.behaviour_logp, b.advantages, b.loss_mask, logp.detach(), logp, denominator=10.0)
    loss.backward()
    assert loss.item() == 0.0 and logp.grad.abs().sum() == 0


def test_prompt_position_garbage_does_not_leak() -> None:
    r = two_seq_rollout()
    r.behaviour_logprobs[0] = float("nan")  # prompt position: never a target with a loss
    b = pack(r, [0, 1])
    assert torch.isfinite(b.behaviour_logp).all()


def test_model_inputs_and_to() -> None:
    b = pack(two_seq_rollout(), [0, 1])
    kw = b.model_inputs()
    assert kw["use_cache"] is False and "attention_mask" not in kw
    moved = b.to("cpu")
    assert isinstance(moved, PackedBatch) and torch.equal(moved.targets, b.targets)
    assert moved.num_tokens == b.num_tokens and moved.seq_indices == b.seq_indices


# --------------------------------------------------------------------------- packed attention


def tiny_qwen2(attn: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, attn_implementation=attn,
    )
    return Qwen2ForCausalLM(config).eval()


def random_rollout(seed: int = 0) -> Rollout:
    g = torch.Generator().manual_seed(seed)
    lengths = [(3, 9), (5, 0), (1, 6), (7, 12), (2, 1), (4, 20)]  # (prompt, response); one empty response
    ids = lambda n: torch.randint(0, 128, (n,), generator=g).tolist()  # noqa: E731
    return Rollout.from_sequences(
        step=0, weight_step=0, group_size=3, problem_ids=["a", "b"],
        prompt_ids=[ids(p) for p, _ in lengths], response_ids=[ids(r) for _, r in lengths],
        response_logprobs=[[-1.0] * r for _, r in lengths], rewards=[0.0] * 6,
        advantages=[0.5, -0.5, 0.0, 1.0, -1.0, 0.0], truncated=[False] * 6,
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_log_probs_equal_per_sequence(attn: str) -> None:
    """The reason packing is allowed: one packed row gives each sequence's own log-probs."""
    model = tiny_qwen2(attn)
    assert model.config._attn_implementation == attn
    r = random_rollout()
    order = [3, 0, 5, 1, 4, 2]
    b = pack(r, order)
    with torch.no_grad():
        logits = model(**b.model_inputs()).logits.float()
        packed = torch.log_softmax(logits, -1).gather(-1, b.targets.unsqueeze(-1)).squeeze(-1)[0]
        start = 0
        for i in order:
            ids, _, _ = r.sequence(i)
            n = ids.numel()
            own = torch.log_softmax(model(input_ids=ids.long()[None]).logits.float(), -1)[0]
            expected = own[:-1].gather(-1, ids.long()[1:, None]).squeeze(-1)
            assert torch.allclose(packed[start:start + n - 1], expected, atol=1e-5), (attn, i)
            start += n
        assert start == b.input_ids.shape[1]


def test_packed_log_probs_match_through_base_model_in_train_mode() -> None:
    """The engine's path (``model.model`` + lm head) in train mode with dropout-free config."""
    model = tiny_qwen2("sdpa").train()
    r = random_rollout(seed=1)
    b = pack(r, [0, 1, 2])
    hidden = model.model(**b.model_inputs()).last_hidden_state
    logp = torch.log_softmax(model.lm_head(hidden), -1).gather(-1, b.targets.unsqueeze(-1)).squeeze(-1)[0]
    start = 0
    for i in [0, 1, 2]:
        ids, _, _ = r.sequence(i)
        n = ids.numel()
        own = torch.log_softmax(model(input_ids=ids.long()[None], use_cache=False).logits, -1)[0]
        expected = own[:-1].gather(-1, ids.long()[1:, None]).squeeze(-1)
        assert torch.allclose(logp[start:start + n - 1], expected, atol=1e-5)
        start += n
