"""Eval metrics as pure functions: avg@n, unbiased pass@k, completion lengths, truncation, and
the one-line summary the seed prints.

Why pure and separate: the numbers that go into a results table come from here, so each one is
unit-tested against exact combinatorics and hand-made sample sets, with no server, tokenizer
or file in the way (``deepscaler/eval/run.py`` only feeds samples in).

A sample is a mapping with at least ``problem_id``, ``score`` (the reward, 0 or 1),
``tokens`` (completion length in tokens, the eos token included as the server returns it) and
``truncated``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` correct among ``n`` samples (Chen et al.
    2021): ``1 - C(n-c, k) / C(n, k)``, the chance that k samples drawn without replacement from
    the n include a correct one. Exact integer binomials (n is at most a few hundred here), so
    there is no product-form rounding to argue about."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"pass_at_k: {name} must be an integer, got {value!r}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c ({c}) must be between 0 and n ({n})")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k ({k}) must be between 1 and n ({n})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def default_pass_k(samples: int, pass_k: int | None = None) -> int:
    """The k of Pass@k: ``pass_k`` when configured, else half the samples (the seed's Pass@8 for
    n=16), and 1 when there is a single sample (Pass@1 then equals Avg@1)."""
    return pass_k if pass_k is not None else max(1, samples // 2)


def is_correct(score: float) -> bool:
    """The reward is 0 or 1; a sample counts as correct for pass@k when it earned the reward."""
    return score >= 1.0


def group_by_problem(samples: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """problem id -> its samples, in the order the problems first appear."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for s in samples:
        groups.setdefault(str(s["problem_id"]), []).append(s)
    return groups


def length_stats(lengths: Sequence[float]) -> dict[str, float]:
    """Mean, population standard deviation (ddof 0, as numpy's ``std``), min and max."""
    if not lengths:
        raise ValueError("length_stats: no lengths")
    mean = math.fsum(lengths) / len(lengths)
    var = math.fsum((x - mean) ** 2 for x in lengths) / len(lengths)
    return {"length_mean": mean, "length_std": math.sqrt(var),
            "length_min": float(min(lengths)), "length_max": float(max(lengths))}


def summarize(samples: Sequence[Mapping[str, Any]], n: int, k: int, wall_time_s: float) -> dict[str, Any]:
    """The summary of one benchmark: every problem must have exactly ``n`` samples.

    ``avg_at_n`` is the mean reward over all samples (with n samples per problem, the mean over
    problems of each one's fraction solved: the paper's pass@1 averaged over n); ``pass_at_k``
    the mean of :func:`pass_at_k` over problems.
    """
    if not samples:
        raise ValueError("summarize: no samples")
    groups = group_by_problem(samples)
    uneven = [pid for pid, g in groups.items() if len(g) != n]
    if uneven:
        raise ValueError(f"summarize: problem {uneven[0]} has {len(groups[uneven[0]])} samples, expected {n}")
    scores = [float(s["score"]) for s in samples]
    pass_k = [pass_at_k(n, sum(is_correct(float(s["score"])) for s in g), k) for g in groups.values()]
    return {
        "problems": len(groups),
        "samples_per_problem": n,
        "pass_k": k,
        "avg_at_n": math.fsum(scores) / len(scores),
        "pass_at_k": math.fsum(pass_k) / len(pass_k),
        **length_stats([float(s["tokens"]) for s in samples]),
        "truncated_rate": sum(bool(s["truncated"]) for s in samples) / len(samples),
        "wall_time_s": float(wall_time_s),
    }


def format_line(bench: str, summary: Mapping[str, Any]) -> str:
    """The seed's line, character for character::

        Evaluated aime2024 in 1546.06s (Avg@16=0.2729, Pass@8: 0.6130, Completion Length: 16389.57 (±10200.73, ∈[1643.00, 32699.00]), Truncated: 15.2%)

    Time and lengths with 2 decimals, Avg and Pass with 4, the truncated percentage with 1. The
    seed's mix of ``=`` after Avg and ``:`` after Pass is kept, so its logs and ours grep alike.
    For n = 1 the line shows ``Pass@1``, equal to ``Avg@1``, so every line has the same fields.
    """
    s = summary
    return (f"Evaluated {bench} in {s['wall_time_s']:.2f}s (Avg@{s['samples_per_problem']}={s['avg_at_n']:.4f}, "
            f"Pass@{s['pass_k']}: {s['pass_at_k']:.4f}, Completion Length: {s['length_mean']:.2f} "
            f"(±{s['length_std']:.2f}, ∈[{s['length_min']:.2f}, {s['length_max']:.2f}]), "
            f"Truncated: {100 * s['truncated_rate']:.1f}%)")
