"""GRPO loss pieces against hand-computed values on tiny tensors (arithmetic in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from deepscaler.advantages import group_advantages
from deepscaler.trainer.loss import (grpo_loss, k1_kl, kl_penalty, low_var_kl, masked_token_mean, ppo_clip_loss,
                                     token_entropy, token_log_probs, token_log_probs_and_entropy)

LN = math.log


def close(actual, expected, tol=1e-5) -> None:
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), atol=tol, rtol=tol)


# --------------------------------------------------------------------------- log-probs and entropy


def test_token_log_probs_hand_computed() -> None:
    # V = 2. logits [0, ln 3] -> softmax [1/4, 3/4]
    logits = torch.tensor([[[0.0, LN(3)], [0.0, LN(3)], [1000.0, 0.0], [1e4, 1e4 + LN(3)]]])
    tokens = torch.tensor([[1, 0, 1, 1]])
    # ln(3/4) = -0.287682, ln(1/4) = -1.386294, ln softmax([1000, 0])[1] = -1000 - ln(1 + e^-1000) = -1000,
    # and a shift by 1e4 changes nothing: ln(3/4) again (no cancellation error at large magnitude)
    out = token_log_probs(logits, tokens)
    close(out, [[LN(0.75), LN(0.25), -1000.0, LN(0.75)]])
    assert out.dtype == torch.float32


def test_token_log_probs_matches_log_softmax_and_temperature() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g) * 5
    tokens = torch.randint(0, 11, (2, 5), generator=g)
    ref = torch.log_softmax(logits / 0.6, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    close(token_log_probs(logits, tokens, temperature=0.6), ref)
    # temperature 2 on [0, 2 ln 3] equals temperature 1 on [0, ln 3]: ln(3/4)
    close(token_log_probs(torch.tensor([[0.0, 2 * LN(3)]]), torch.tensor([1]), temperature=2.0), [LN(0.75)])


def test_token_log_probs_bf16_logits_computed_in_float32() -> None:
    logits = torch.tensor([[0.0, LN(3)]], dtype=torch.bfloat16)
    out = token_log_probs(logits, torch.tensor([1]))
    assert out.dtype == torch.float32
    close(out, torch.log_softmax(logits.float(), -1)[:, 1])


def test_entropy_uniform_is_log_v() -> None:
    for v in (2, 7, 151936):
        close(token_entropy(torch.full((1, v), 3.7)), [LN(v)], tol=1e-4)


def test_entropy_hand_computed_and_stable() -> None:
    # p = [1/4, 3/4]: H = -(1/4 ln 1/4 + 3/4 ln 3/4) = ln 4 - (3/4) ln 3 = 1.386294 - 0.823959 = 0.562335
    logits = torch.tensor([[0.0, LN(3)], [1e4, 0.0], [-1e4, -1e4]])
    h = token_entropy(logits)
    close(h, [LN(4) - 0.75 * LN(3), 0.0, LN(2)])
    assert torch.isfinite(h).all()
    x = logits.clone().requires_grad_(True)
    token_entropy(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_fused_log_probs_and_entropy_match_the_separate_functions() -> None:
    # p = [1/4, 3/4] at temperature 1: log p(token 1) = ln 3/4, H = ln 4 - (3/4) ln 3 (as above);
    # at temperature 0.5 the logits double: p = [1/10, 9/10].
    logits = torch.tensor([[0.0, LN(3)], [0.0, LN(3)]])
    tokens = torch.tensor([1, 0])
    lp, h = token_log_probs_and_entropy(logits, tokens)
    close(lp, [LN(0.75), LN(0.25)])
    close(h, [LN(4) - 0.75 * LN(3)] * 2)
    lp, h = token_log_probs_and_entropy(logits, tokens, temperature=0.5)
    close(lp, [LN(0.9), LN(0.1)])
    close(h, token_entropy(logits, temperature=0.5))
    close(lp, token_log_probs(logits, tokens, temperature=0.5))


# --------------------------------------------------------------------------- PPO clip


def _ratio_case():
    # Per token: (advantage, ratio r = exp(logp - behaviour)), clip 0.2 -> [0.8, 1.2]
    #   1: A=+1, r=1.5   unclipped -1.5, clipped -1.2 -> max -1.2 (CLIPPED, high)   d/dlogp = 0
    #   2: A=+1, r=0.5   unclipped -0.5, clipped -0.8 -> max -0.5 (unclipped)        d/dlogp = -A r = -0.5
    #   3: A=-1, r=0.5   unclipped +0.5, clipped +0.8 -> max +0.8 (CLIPPED, low)    d/dlogp = 0
    #   4: A=-1, r=1.5   unclipped +1.5, clipped +1.2 -> max +1.5 (unclipped)        d/dlogp = -A r = +1.5
    #   5: A=+1, r=1.0   -1.0                                                         d/dlogp = -1.0
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0]])
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.0]])
    behaviour = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.2]])
    logp = (behaviour + ratio.log()).requires_grad_(True)
    return logp, behaviour, adv


def test_ppo_clip_loss_hand_computed_values_gradients_and_stats() -> None:
    logp, behaviour, adv = _ratio_case()
    mask = torch.ones(1, 5)
    per_token, stats = ppo_clip_loss(logp, behaviour, adv, mask)
    close(per_token, [[-1.2, -0.5, 0.8, 1.5, -1.0]])
    per_token.sum().backward()
    close(logp.grad, [[0.0, -0.5, 0.0, 1.5, -1.0]])
    close(stats["clip_fraction"], 2 / 5)  # tokens 1 and 3
    close(stats["clip_low_fraction"], 1 / 5)
    close(stats["clip_high_fraction"], 1 / 5)
    close(stats["ratio_mean"], (1.5 + 0.5 + 0.5 + 1.5 + 1.0) / 5)  # = 1.0
    close(stats["ratio_max"], 1.5)
    close(stats["ratio_min"], 0.5)
    # ppo_kl = mean(behaviour - logp) = -mean(ln r) = -(ln1.5 + ln.5 + ln.5 + ln1.5 + 0)/5 = -(2 ln .75)/5
    close(stats["ppo_kl"], -2 * LN(0.75) / 5)
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())


@pytest.mark.parametrize("log_r, adv, clipped", [(5.0, 1.0, True), (-5.0, -1.0, True),
                                                 (5.0, -1.0, False), (-5.0, 1.0, False),
                                                 (40.0, 1.0, True), (-40.0, -1.0, True)])
def test_ratio_far_outside_clip(log_r, adv, clipped) -> None:
    # r = e^5 = 148.4 or e^-5 = 0.0067 (and e^+-40, beyond the +-20 overflow guard).
    behaviour = torch.tensor([[-2.0]])
    logp = (behaviour + log_r).requires_grad_(True)
    per_token, stats = ppo_clip_loss(logp, behaviour, torch.tensor([adv]), torch.ones(1, 1))
    per_token.sum().backward()
    assert torch.isfinite(per_token).all() and torch.isfinite(logp.grad).all()
    if clipped:  # loss is -A * (1 +- 0.2), a constant: no gradient
        close(per_token, [[-adv * (1.2 if log_r > 0 else 0.8)]])
        assert logp.grad.item() == 0.0
        close(stats["clip_fraction"], 1.0)
    else:  # the pessimistic branch is the unclipped one: gradient -A * r
        r = math.exp(log_r)
        close(per_token, [[-adv * r]], tol=1e-4)
        close(logp.grad, [[-adv * r]], tol=1e-4)
        close(stats["clip_fraction"], 0.0)


def test_asymmetric_clip_high() -> None:
    # A=+1, r=1.25: with clip_high 0.2 -> clipped to -1.2 (grad 0); with clip_high 0.28 -> -1.25 (grad -1.25)
    behaviour = torch.tensor([[-1.0]])
    for clip_high, loss, grad in ((0.2, -1.2, 0.0), (0.28, -1.25, -1.25)):
        logp = (behaviour + LN(1.25)).requires_grad_(True)
        per_token, _ = ppo_clip_loss(logp, behaviour, torch.tensor([1.0]), torch.ones(1, 1), clip_high=clip_high)
        per_token.sum().backward()
        close(per_token, [[loss]])
        close(logp.grad, [[grad]])


def test_sequence_advantages_broadcast_to_tokens() -> None:
    # ratio 1 everywhere -> per-token loss = -A of its sequence
    logp = torch.zeros(2, 3)
    per_token, _ = ppo_clip_loss(logp, logp, torch.tensor([0.5, -2.0]), torch.ones(2, 3))
    close(per_token, [[-0.5] * 3, [2.0] * 3])
    with pytest.raises(ValueError):
        ppo_clip_loss(logp, logp, torch.tensor([0.5, -2.0, 1.0]), torch.ones(2, 3))


# --------------------------------------------------------------------------- KL


def test_low_var_kl_hand_computed() -> None:
    # d = ref - logp; kl = e^d - d - 1
    #   logp = ref           -> 1 - 0 - 1 = 0
    #   d = ln 0.5 = -0.693147 -> 0.5 + 0.693147 - 1 = 0.193147
    #   d = 1                -> e - 2 = 0.718282
    #   d = 20               -> e^20 - 21 = 4.85e8 -> clamped to 10
    logp = torch.tensor([-1.3, LN(0.5), -2.0, -25.0])
    ref = torch.tensor([-1.3, LN(0.25), -1.0, -5.0])
    close(low_var_kl(logp, ref), [0.0, 0.5 + LN(2) - 1, math.e - 2, 10.0])
    assert low_var_kl(logp, logp).abs().max().item() == 0.0


def test_low_var_kl_nonnegative_and_gradient() -> None:
    g = torch.Generator().manual_seed(1)
    logp = (torch.randn(100, generator=g) * 3).requires_grad_(True)
    ref = torch.randn(100, generator=g) * 3
    kl = low_var_kl(logp, ref)
    assert (kl >= 0).all()
    kl.sum().backward()
    # d/dlogp (e^d - d - 1) with d = ref - logp is 1 - e^d (where not clamped)
    d = ref - logp.detach()
    unclamped = (torch.exp(d) - d - 1) < 10
    close(logp.grad[unclamped], (1 - torch.exp(d))[unclamped])


def test_kl_penalty_dispatch() -> None:
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])
    close(kl_penalty(logp, ref, "k1"), [0.5])  # logp - ref
    close(k1_kl(logp, ref), [0.5])
    close(kl_penalty(logp, ref, "low_var_kl"), low_var_kl(logp, ref))
    with pytest.raises(ValueError, match="unknown kl_type"):
        kl_penalty(logp, ref, "mse")


# --------------------------------------------------------------------------- aggregation


def test_masked_token_mean_hand_computed() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(masked_token_mean(values, mask), (1 + 2 + 4) / 3)
    close(masked_token_mean(values, mask.bool()), 7 / 3)
    close(masked_token_mean(values, mask, denominator=7.0), 1.0)  # (1 + 2 + 4) / 7
    close(masked_token_mean(values, mask, denominator=torch.tensor(14)), 0.5)


def test_masked_token_mean_empty_mask_is_zero_with_defined_gradient() -> None:
    values = torch.tensor([[1.0, float("nan")], [float("inf"), -2.0]], requires_grad=True)
    out = masked_token_mean(values, torch.zeros(2, 2))
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(values.grad, torch.zeros(2, 2))
    assert masked_token_mean(values, torch.zeros(2, 2), denominator=0.0).item() == 0.0


def test_masked_garbage_does_not_leak() -> None:
    values = torch.tensor([[1.0, float("nan"), float("-inf")]], requires_grad=True)
    out = masked_token_mean(values, torch.tensor([[1, 0, 0]]))
    out.backward()
    assert out.item() == 1.0
    assert torch.equal(values.grad, torch.tensor([[1.0, 0.0, 0.0]]))


def test_token_mean_weighs_long_sequences_more_than_sequence_mean() -> None:
    # seq A: 1 response token, seq B: 3 response tokens. Token-mean gives every token 1/4, so
    # B carries 3/4 of the weight; a sequence-mean gives A's single token 1/2 and B's tokens 1/6.
    values = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    token_mean = masked_token_mean(values, mask)
    token_mean.backward()
    close(token_mean, 1 / 4)  # (1 + 0 + 0 + 0) / 4
    close(values.grad, [[0.25, 0, 0], [0.25, 0.25, 0.25]])
    v2 = values.detach().clone().requires_grad_(True)
    seq_mean = ((v2 * mask).sum(1) / mask.sum(1)).mean()  # (1/1 + 0/3) / 2
    seq_mean.backward()
    close(seq_mean, 0.5)
    close(v2.grad, [[0.5, 0, 0], [1 / 6, 1 / 6, 1 / 6]])


def test_micro_batches_with_shared_denominator_add_up_to_mini_batch_token_mean() -> None:
    values = torch.tensor([[1.0, 0.0, 0.0], [2.0, 3.0, 4.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    full = masked_token_mean(values, mask)  # (1 + 2 + 3 + 4) / 4 = 2.5
    n = mask.sum()
    parts = masked_token_mean(values[:1], mask[:1], n) + masked_token_mean(values[1:], mask[1:], n)  # 1/4 + 9/4
    close(full, 2.5)
    close(parts, 2.5)
    # per-micro-batch means averaged would give (1 + 3) / 2 = 2.0: not the recipe's token-mean
    close((masked_token_mean(values[:1], mask[:1]) + masked_token_mean(values[1:], mask[1:])) / 2, 2.0)


# --------------------------------------------------------------------------- composed loss


def _composed_inputs():
    # One sequence, 3 positions: position 0 is a prompt token (mask 0) holding garbage.
    # Response tokens 1, 2: logp == behaviour (ratio 1), A = 0.5 -> pg per token = -0.5, pg_loss = -0.5
    # ref - logp: token 1 ln 0.5 -> kl 0.193147; token 2: 0 -> kl 0. kl = 0.193147 / 2 = 0.0965736
    # entropy [garbage, 1.0, 2.0] -> 1.5
    logp = torch.tensor([[-7.0, LN(0.5), -0.3]], requires_grad=True)
    behaviour = torch.tensor([[float("nan"), LN(0.5), -0.3]])
    ref = torch.tensor([[float("-inf"), LN(0.25), -0.3]])
    entropy = torch.tensor([[1e6, 1.0, 2.0]])
    mask = torch.tensor([[0, 1, 1]])
    return logp, behaviour, ref, entropy, mask


def test_grpo_loss_hand_computed() -> None:
    logp, behaviour, ref, entropy, mask = _composed_inputs()
    loss, m = grpo_loss(logp, behaviour, torch.tensor([0.5]), mask, ref, entropy)
    # loss = -0.5 - 0.001 * 1.5 + 0.001 * 0.0965736 = -0.5014034264
    kl = (0.5 + LN(2) - 1) / 2
    close(loss, -0.5 - 0.001 * 1.5 + 0.001 * kl, tol=1e-7)
    close(m["pg_loss"], -0.5)
    close(m["kl"], kl)
    close(m["entropy"], 1.5)
    close(m["clip_fraction"], 0.0)
    close(m["ratio_mean"], 1.0)
    close(m["ratio_max"], 1.0)
    close(m["num_tokens"], 2.0)
    loss.backward()
    # d/dlogp: pg -A r / N = -0.5 / 2 = -0.25 on each response token;
    # kl: kl_coef * (1 - e^d) / N = 0.001 * (1 - 0.5) / 2 = 0.00025 on token 1, 0 on token 2; prompt 0.
    close(logp.grad, [[0.0, -0.25 + 0.00025, -0.25]], tol=1e-7)
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())


def test_masked_prompt_and_padding_do_not_affect_loss_or_gradient() -> None:
    logp, behaviour, ref, entropy, mask = _composed_inputs()
    base_loss, _ = grpo_loss(logp, behaviour, torch.tensor([0.5]), mask, ref, entropy)
    base_loss.backward()
    base_grad = logp.grad.clone()
    # Different garbage in the prompt slot plus two padding positions with more garbage.
    logp2 = torch.tensor([[3.0, LN(0.5), -0.3, 0.0, -1e9]], requires_grad=True)
    beh2 = torch.tensor([[float("inf"), LN(0.5), -0.3, float("nan"), 5.0]])
    ref2 = torch.tensor([[0.0, LN(0.25), -0.3, float("-inf"), float("nan")]])
    ent2 = torch.tensor([[float("nan"), 1.0, 2.0, -5.0, float("inf")]])
    mask2 = torch.tensor([[0, 1, 1, 0, 0]])
    loss2, m2 = grpo_loss(logp2, beh2, torch.tensor([0.5]), mask2, ref2, ent2)
    loss2.backward()
    close(loss2, base_loss.detach(), tol=1e-7)
    close(logp2.grad[:, :3], base_grad, tol=1e-7)
    assert torch.equal(logp2.grad[:, 3:], torch.zeros(1, 2))
    assert all(torch.isfinite(v) for v in m2.values())


def test_empty_response_gives_zero_loss_and_finite_zero_gradient() -> None:
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, m = grpo_loss(logp, torch.tensor([[-1.5, float("nan")]]), torch.tensor([1.0]), torch.zeros(1, 2),
                        torch.tensor([[-3.0, -1.0]]), torch.tensor([[1.0, 1.0]]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(1, 2))
    assert all(torch.isfinite(v) and v.item() == 0.0 for v in m.values())


def test_grpo_loss_requires_ref_and_entropy_when_their_coefs_are_set() -> None:
    logp = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    with pytest.raises(ValueError, match="ref_logp is required"):
        grpo_loss(logp, logp, torch.tensor([1.0]), mask, None, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="entropy is required"):
        grpo_loss(logp, logp, torch.tensor([1.0]), mask, logp)
    # Both off: plain clipped PG; kl still reported from ref when given but not penalised.
    loss, m = grpo_loss(logp, logp, torch.tensor([1.0]), mask, logp - 1.0, kl_type="none", entropy_coef=0.0)
    close(loss, -1.0)
    close(m["kl"], math.exp(-1))  # d = ref - logp = -1 -> e^-1 - (-1) - 1 = e^-1 = 0.367879


def test_on_policy_gradient_is_reinforce_with_token_mean() -> None:
    # With behaviour == logp (on-policy, first mini-batch) the ratio is 1 and nothing is clipped:
    # grad of pg_loss wrt logits = -sum_t A * grad logp_t / N. Check against a direct computation.
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 9, generator=g, requires_grad=True)
    tokens = torch.randint(0, 9, (2, 4), generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    adv = torch.tensor([0.7, -1.3])
    logp = token_log_probs(logits, tokens)
    loss, m = grpo_loss(logp, logp.detach(), adv, mask, kl_coef=0.0, entropy_coef=0.0)
    (grad,) = torch.autograd.grad(loss, logits)
    logits2 = logits.detach().clone().requires_grad_(True)
    lp2 = token_log_probs(logits2, tokens)
    reinforce = -(adv[:, None] * lp2 * mask).sum() / mask.sum()
    (grad2,) = torch.autograd.grad(reinforce, logits2)
    close(grad, grad2, tol=1e-6)
    close(m["clip_fraction"], 0.0)


def test_full_pipeline_from_logits_backprops_finite() -> None:
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(4, 6, 13, generator=g) * 4).requires_grad_(True)
    tokens = torch.randint(0, 13, (4, 6), generator=g)
    mask = torch.ones(4, 6)
    mask[:, :2] = 0  # prompt
    mask[3, 4:] = 0  # padding
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=2)  # [+-0.7071]
    close(adv, [0.707106, -0.707106, -0.707106, 0.707106])  # +-0.5 / sqrt(0.5)
    logp = token_log_probs(logits, tokens, temperature=0.6)
    behaviour = logp.detach() + 0.3 * torch.randn(4, 6, generator=g)
    ref = logp.detach() + 0.1 * torch.randn(4, 6, generator=g)
    loss, m = grpo_loss(logp, behaviour, adv, mask, ref, token_entropy(logits, temperature=0.6))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert torch.equal(logits.grad[:, :2], torch.zeros(4, 2, 13))  # prompt positions get nothing
    assert m["num_tokens"].item() == 4 * 4 - 2
    assert 0.0 < m["clip_fraction"].item() < 1.0


# --------------------------------------------------------------------------- old log-probs, TIS, dual clip


def test_truncated_is_weights_by_token_are_the_capped_ratio_and_skip_masked_tokens():
    from deepscaler.trainer.loss import truncated_is_weights

    old = torch.tensor([[-1.0, -1.0, -1.0, float("nan")]])
    behaviour = torch.tensor([[-1.5, -1.0, -3.0, -1.0]])  # ratios e^0.5, 1, e^2 (capped at 2), masked
    mask = torch.tensor([[True, True, True, False]])
    w, stats = truncated_is_weights(old, behaviour, mask, cap=2.0)
    expected = torch.tensor([[math.exp(0.5), 1.0, 2.0, 0.0]])
    torch.testing.assert_close(w, expected)
    assert stats["tis_clipped_fraction"].item() == pytest.approx(1 / 3)
    assert stats["tis_weight_mean"].item() == pytest.approx((math.exp(0.5) + 1.0 + 2.0) / 3)


def test_a_sequence_whose_mean_ratio_leaves_the_band_is_masked_whole():
    from deepscaler.trainer.loss import truncated_is_weights

    # two sequences in one packed row: the first's mean log-ratio 0.25 (ratio 1.28, inside
    # [1/2, 2]); the second's mean log-ratio 1.0 (ratio e = 2.7: out), although its first
    # token alone (log-ratio 0) would pass.
    old = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0]])
    behaviour = torch.tensor([[-0.5, 0.0, 0.0, -2.0, 0.0]])
    mask = torch.tensor([[True, True, False, True, True]])
    segments = torch.tensor([[0, 0, 0, 1, 1]])
    w, stats = truncated_is_weights(old, behaviour, mask, cap=2.0, mode="sequence_mask", segments=segments)
    assert w.tolist() == [[1.0, 1.0, 0.0, 0.0, 0.0]]
    assert stats["tis_clipped_fraction"].item() == pytest.approx(0.5)  # 2 of the 4 valid tokens dropped
    with pytest.raises(ValueError):
        truncated_is_weights(old, behaviour, mask, cap=0.5)


def test_dual_clip_caps_the_loss_of_a_negative_advantage_token():
    from deepscaler.trainer.loss import ppo_clip_loss

    logp = torch.tensor([[0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-3.0, -3.0]])  # ratio e^3 = 20.1 on both tokens
    adv = torch.tensor([[-1.0, 1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    plain, _ = ppo_clip_loss(logp, old, adv, mask)
    dual, _ = ppo_clip_loss(logp, old, adv, mask, clip_ratio_c=3.0)
    assert plain[0, 0].item() == pytest.approx(math.exp(3.0))  # -A * ratio: unbounded
    assert dual[0, 0].item() == pytest.approx(3.0)  # capped at -A * c
    assert dual[0, 1].item() == plain[0, 1].item() == pytest.approx(-1.2)  # A > 0: the usual clip
    dual.sum().backward()
    assert logp.grad[0, 0].item() == 0.0  # the capped branch carries no gradient


def test_weights_scale_each_token_and_a_ratio_against_itself_is_exactly_one():
    from deepscaler.trainer.loss import grpo_loss, mismatch_metrics

    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.tensor([[True, True, False]])
    w = torch.tensor([[0.5, 2.0, 7.0]])
    loss, m = grpo_loss(logp, logp, adv, mask, weights=w, kl_coef=0.0, entropy_coef=0.0)
    assert loss.item() == pytest.approx((-1.0 * 0.5 + 1.0 * 2.0) / 2)  # -A * 1 * w, token mean
    assert m["ratio_mean"].item() == 1.0 and m["clip_fraction"].item() == 0.0
    mm = mismatch_metrics(logp, logp - torch.tensor([[0.1, -0.2, 9.0]]), mask)
    d = torch.tensor([0.1, -0.2])
    assert mm["mismatch_kl"].item() == pytest.approx(float((d.exp() - d - 1).mean()))
    assert mm["mismatch_max"].item() == pytest.approx(0.2)  # the masked 9.0 stays out


def test_the_mismatch_kl_of_tiny_differences_is_never_negative():
    """exp(d) - d - 1 in float32 rounds below zero for |d| ~ 1e-5 (status showed -1e-10): the
    metric stays at or above zero there, close to d^2/2, and keeps the k3 value of a visible
    mismatch (test_weights_scale_each_token_and_a_ratio_against_itself_is_exactly_one)."""
    from deepscaler.trainer.loss import mismatch_metrics

    d = torch.linspace(-1e-5, 1e-5, 201).unsqueeze(0)
    assert (torch.exp(d) - d - 1.0).mean().item() < 0  # the old form, on the same tokens
    mask = torch.ones_like(d, dtype=torch.bool)
    kl = mismatch_metrics(torch.zeros_like(d), -d, mask)["mismatch_kl"].item()
    assert kl >= 0 and kl == pytest.approx(float((d.double() ** 2 / 2).mean()), rel=1e-2)
    assert mismatch_metrics(d, d, mask)["mismatch_kl"].item() == 0.0  # identical log-probs
