"""GRPO loss as small pure functions (no model, no state), so each piece is hand-checkable.

The recipe (DeepScaleR's verl scripts; docs/reproduction.md)::

    advantage  A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-6)      per sequence (deepscaler/advantages.py)
    ratio      rho_t = exp(logp_t - old_t)                                per token
    pg_t       = max(-A * rho_t, -A * clip(rho_t, 1 - eps_low, 1 + eps_high))
    kl_t       = exp(ref_t - logp_t) - (ref_t - logp_t) - 1, clamped to [-10, 10]  (verl low_var_kl)
    loss       = token_mean(w_t * pg_t) - entropy_coef * token_mean(H) + kl_coef * token_mean(kl)

``old_t`` is the log-prob of token t under the policy as it was before the step's first
update, recomputed by the trainer (``trainer.loss.old_logprobs: trainer``, verl's
``compute_log_prob`` and the paper's semantics): the ratio is exactly 1 at the first update and
moves only with the step's own updates, which is what the clip range was tuned for.
``old_logprobs: inference`` takes the sampler's log-probs instead, whose kernels disagree with
the trainer's per token (bf16 on GPUs), so the ratio starts off 1 and clipping fires on noise.

``w_t`` is 1 unless truncated importance sampling is on (``trainer.loss.tis_cap`` C), which
corrects samples drawn by older weights (``orchestrator.async_level`` >= 1) or other kernels
(the decoupled-PPO / truncated-IS correction, verl's ``tis_imp_ratio_cap``)::

    token:          w_t = min(exp(old_t - behaviour_t), C)
    sequence_mask:  w_t = 1 if 1/C <= exp(mean_{t in seq}(old_t - behaviour_t)) <= C, else 0

(sequence_mask takes the geometric mean of the sequence's token ratios: their product over
8k-24k tokens under- or overflows for any real mismatch). Dual clip (``clip_ratio_c`` c,
verl's): for A < 0 the loss is also capped at -A * c, so a token whose ratio exploded cannot
dominate the step.

``std`` is the unbiased (n - 1) sample std, torch's default, as verl's GRPO advantage uses.
Token-mean divides the sum over every valid token of the mini-batch by the number of valid
tokens, so long responses weigh more than short ones (unlike a per-sequence mean).

Conventions: ``mask`` is 1/True on response tokens that are trained on and 0 on prompt and
padding tokens. Masked positions may hold garbage (NaN, -inf): every function selects with
``torch.where`` before any arithmetic so garbage can reach neither the loss nor the gradient.
Metrics are detached 0-dim tensors, so the training loop does not sync with the GPU per metric.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# exp(20) ~ 4.9e8: keeps exp() of a log-ratio finite in float32 and bf16 (verl clamps the same way).
_LOG_RATIO_LIMIT = 20.0
_KL_LIMIT = 10.0


def token_log_probs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[token] per position, computed in float32.

    log_softmax subtracts the row max before exponentiating, so huge logits neither overflow
    nor lose precision (``logit - logsumexp`` would cancel catastrophically at |logit| ~ 1e4).
    ``logits[..., t, :]`` must already be the prediction for ``tokens[..., t]`` (shift first).
    ``temperature`` must match how the behaviour log-probs were computed: sampling runs at 0.6,
    and vLLM returns log-probs of the raw logits unless asked for processed ones.
    Memory: one float32 ``[..., V]`` tensor is kept for backward (V = 151936 for Qwen), so
    callers chunk long packed rows.
    """
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    return torch.log_softmax(x, dim=-1).gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / temperature) per position, -sum(p * log p), float32.

    From log_softmax, so it is stable for huge logits: where p underflows to 0, log p is
    finite and the term is exactly 0. Logits must be finite (no -inf vocabulary masking).
    """
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    logp = torch.log_softmax(x, dim=-1)
    return -(torch.exp(logp) * logp).sum(dim=-1)


def token_log_probs_and_entropy(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Both of the above from one log_softmax: the trainer needs both per token, and the
    ``[T, V]`` softmax is the memory-bound part of the step (V = 151936)."""
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    logp = torch.log_softmax(x, dim=-1)
    chosen = logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return chosen, -(torch.exp(logp) * logp).sum(dim=-1)


def _bool_mask(mask: Tensor, like: Tensor) -> Tensor:
    m = mask if mask.dtype == torch.bool else mask != 0
    return m.expand_as(like) if m.shape != like.shape else m


def masked_token_mean(values: Tensor, mask: Tensor, denominator: Tensor | float | None = None) -> Tensor:
    """sum(values over valid tokens) / number of valid tokens; 0 (with a zero gradient) if none.

    With gradient accumulation, pass the valid-token count of the whole mini-batch as
    ``denominator`` so the micro-batch losses add up to the mini-batch token-mean exactly
    (divide it further by whatever the framework averages over, e.g. data-parallel ranks).
    """
    m = _bool_mask(mask, values)
    total = torch.where(m, values, torch.zeros_like(values)).sum()
    if denominator is None:
        denominator = m.sum()
    if isinstance(denominator, Tensor):
        denominator = denominator.to(total.dtype)
        return total / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    denominator = float(denominator)
    return total / (denominator if denominator > 0 else 1.0)


def _masked_max(values: Tensor, m: Tensor) -> Tensor:
    if values.numel() == 0:
        return values.new_zeros(())
    filled = torch.where(m, values, torch.full_like(values, float("-inf"))).max()
    return torch.where(m.any(), filled, torch.zeros_like(filled))


def _masked_min(values: Tensor, m: Tensor) -> Tensor:
    return -_masked_max(-values, m)


def _per_token(advantages: Tensor, like: Tensor) -> Tensor:
    """Broadcast per-sequence advantages ``[B]`` to ``[B, T]``; per-token ones pass through."""
    if advantages.shape == like.shape:
        return advantages
    if advantages.dim() == 1 and like.dim() == 2 and advantages.shape[0] == like.shape[0]:
        return advantages.unsqueeze(-1).expand_as(like)
    raise ValueError(f"advantages of shape {tuple(advantages.shape)} do not fit tokens of shape {tuple(like.shape)}")


def ppo_clip_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token PPO clipped surrogate (to minimise) and clipping statistics.

    The ratio is taken against ``old_logp`` (module doc: the trainer's own pre-update
    log-probs, or the sampler's). Where the clipped branch is active the gradient is 0:
    A > 0 with ratio > 1 + clip_high, or A < 0 with ratio < 1 - clip_low. ``clip_ratio_c``:
    dual clip, the loss of an A < 0 token is at most -A * c. ``weights``: per-token factors
    (truncated importance sampling), no gradient. Masked tokens give 0.
    ``advantages``: ``[B]`` per sequence or per token (same shape as ``logp``, e.g. packed rows).
    """
    m = _bool_mask(mask, logp)
    adv = _per_token(advantages, logp).to(torch.float32)
    zero = torch.zeros_like(logp, dtype=torch.float32)
    log_ratio = torch.where(m, logp.float() - torch.where(m, old_logp.float(), zero), zero)
    log_ratio = log_ratio.clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    adv = torch.where(m, adv, zero)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(unclipped, clipped)
    if clip_ratio_c is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * clip_ratio_c), pg)
    if weights is not None:
        pg = pg * torch.where(m, weights.detach().float(), zero)
    per_token = torch.where(m, pg, zero)
    with torch.no_grad():
        r = ratio.detach()
        is_clipped = m & (clipped > unclipped)
        stats = {
            "clip_fraction": masked_token_mean(is_clipped.float(), m),
            "clip_low_fraction": masked_token_mean((is_clipped & (r < 1.0)).float(), m),
            "clip_high_fraction": masked_token_mean((is_clipped & (r > 1.0)).float(), m),
            "ratio_mean": masked_token_mean(r, m),
            "ratio_max": _masked_max(r, m),
            "ratio_min": _masked_min(r, m),
            # mean(old - logp): how far the update moved the policy (k1 estimate).
            "ppo_kl": masked_token_mean(-log_ratio.detach(), m),
        }
    return per_token, stats


def truncated_is_weights(old_logp: Tensor, behaviour_logp: Tensor, mask: Tensor, cap: float,
                         mode: str = "token", segments: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token truncated importance weights (module doc) and their statistics.

    ``segments``: the sequence id of every token (``mode="sequence_mask"``; packed rows hold
    several sequences). Masked tokens get weight 0. Stats: ``tis_weight_mean`` (over valid
    tokens) and ``tis_clipped_fraction`` (tokens whose weight the cap cut, or that a masked
    sequence dropped).
    """
    if cap is None or cap < 1.0:
        raise ValueError(f"the truncated-IS cap must be >= 1, got {cap}")
    m = _bool_mask(mask, old_logp)
    zero = torch.zeros_like(old_logp, dtype=torch.float32)
    log_ratio = torch.where(m, old_logp.float() - torch.where(m, behaviour_logp.float(), zero), zero)
    log_ratio = log_ratio.clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    if mode == "token":
        raw = torch.exp(log_ratio)
        weights = torch.where(m, raw.clamp(max=cap), zero)
        cut = m & (raw > cap)
    elif mode == "sequence_mask":
        if segments is None:
            raise ValueError("sequence_mask needs the sequence id of every token (segments)")
        seg = segments.reshape(-1).long()
        flat_m = m.reshape(-1)
        count = torch.zeros(int(seg.max()) + 1 if seg.numel() else 1, dtype=torch.float32, device=seg.device)
        total = torch.zeros_like(count)
        count.index_add_(0, seg, flat_m.float())
        total.index_add_(0, seg, torch.where(flat_m, log_ratio.reshape(-1), zero.reshape(-1)))
        mean = total / count.clamp(min=1.0)
        inside = (mean >= -math.log(cap)) & (mean <= math.log(cap))
        keep = inside[seg].reshape(m.shape)
        weights = torch.where(m & keep, torch.ones_like(zero), zero)
        cut = m & ~keep
    else:
        raise ValueError(f"unknown tis_mode {mode!r}; expected token or sequence_mask")
    stats = {"tis_weight_mean": masked_token_mean(weights, m), "tis_clipped_fraction": masked_token_mean(cut.float(), m)}
    return weights, stats


def mismatch_metrics(old_logp: Tensor, behaviour_logp: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """How far the sampler's log-probs are from the trainer's for the same weights and tokens:
    ``mismatch_kl``, the token-mean k3 estimate of KL(sampler || trainer) under the sampler's
    tokens (exp(d) - d - 1 with d = old - behaviour), and ``mismatch_max``, the largest |d|.
    The KL is computed as expm1(d) - d, floored at 0: d is tiny when sampler and trainer agree,
    and exp(d) - 1 then rounds below d, which showed a healthy run's KL as -1e-10."""
    m = _bool_mask(mask, old_logp)
    zero = torch.zeros_like(old_logp, dtype=torch.float32)
    d = torch.where(m, old_logp.float() - torch.where(m, behaviour_logp.float(), zero), zero)
    d = d.clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    kl = (torch.expm1(d) - d).clamp_min(0.0)
    return {"mismatch_kl": masked_token_mean(kl, m), "mismatch_max": _masked_max(d.abs(), m)}


def low_var_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """verl's ``low_var_kl`` (Schulman's k3) per token: exp(ref - logp) - (ref - logp) - 1.

    Non-negative, unbiased for KL(pi || ref) under samples from pi, and clamped to [-10, 10]
    like verl so one wild token cannot dominate the step.
    """
    d = (ref_logp.float() - logp.float()).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    return (torch.exp(d) - d - 1.0).clamp(-_KL_LIMIT, _KL_LIMIT)


def k1_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """The plain estimator logp - ref per token (config ``kl_type: k1``)."""
    return logp.float() - ref_logp.float()


def kl_penalty(logp: Tensor, ref_logp: Tensor, kl_type: str = "low_var_kl") -> Tensor:
    """Per-token KL estimate named by the config's ``loss.kl_type``."""
    if kl_type == "low_var_kl":
        return low_var_kl(logp, ref_logp)
    if kl_type == "k1":
        return k1_kl(logp, ref_logp)
    raise ValueError(f"unknown kl_type {kl_type!r}; expected low_var_kl or k1 (or skip the term for none)")


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logp: Tensor | None = None,
    entropy: Tensor | None = None,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float | None = None,
    weights: Tensor | None = None,
    kl_coef: float = 0.001,
    kl_type: str = "low_var_kl",
    entropy_coef: float = 0.001,
    denominator: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """loss = pg_loss - entropy_coef * entropy + kl_coef * kl, every term a token-mean.

    ``old_logp``: the ratio's base (module doc). ``weights``, ``clip_ratio_c``: see
    :func:`ppo_clip_loss`. ``ref_logp`` is needed unless ``kl_coef == 0`` or
    ``kl_type == "none"``; ``entropy`` (from :func:`token_entropy`, with grad: the bonus is
    trained on, as in verl) unless ``entropy_coef == 0``. ``denominator``: see
    :func:`masked_token_mean`.
    Returns the scalar loss and detached metrics: pg_loss, kl, entropy (divided by the same
    denominator as the loss, so with a shared denominator they add up over micro-batches),
    clip fractions, ratio mean/min/max and ppo_kl (means over this call's tokens: weight them
    by num_tokens to combine), num_tokens.
    """
    m = _bool_mask(mask, logp)
    per_token_pg, stats = ppo_clip_loss(logp, old_logp, advantages, m, clip_low, clip_high, clip_ratio_c, weights)
    zeros = torch.zeros_like(logp, dtype=torch.float32)
    logp_safe = torch.where(m, logp.float(), zeros)  # masked garbage never reaches exp() or grads
    pg_loss = masked_token_mean(per_token_pg, m, denominator)
    loss = pg_loss
    zero = pg_loss.new_zeros(())

    use_kl = kl_type != "none" and kl_coef != 0.0
    if use_kl:
        if ref_logp is None:
            raise ValueError("ref_logp is required when kl_coef != 0 and kl_type != 'none'")
        ref_safe = torch.where(m, ref_logp.float(), zeros)
        kl = masked_token_mean(kl_penalty(logp_safe, ref_safe, kl_type), m, denominator)
        loss = loss + kl_coef * kl
    elif ref_logp is not None:  # still report it: KL drift is worth watching even unpenalised
        with torch.no_grad():
            ref_safe = torch.where(m, ref_logp.float(), zeros)
            kl = masked_token_mean(low_var_kl(logp_safe, ref_safe), m, denominator)
    else:
        kl = zero

    if entropy is not None:
        ent = masked_token_mean(torch.where(m, entropy.float(), zeros), m, denominator)
        if entropy_coef != 0.0:
            loss = loss - entropy_coef * ent
    elif entropy_coef != 0.0:
        raise ValueError("entropy is required when entropy_coef != 0")
    else:
        ent = zero

    metrics = {"pg_loss": pg_loss.detach(), "kl": kl.detach(), "entropy": ent.detach(), **stats,
               "num_tokens": m.sum().detach().float()}
    return loss, metrics
