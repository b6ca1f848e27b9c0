"""The eval metrics (deepscaler/eval/metrics.py): pass@k against exact combinatorics, the summary
on hand-made sample sets, and the seed's line format character for character."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest

from deepscaler.eval.metrics import default_pass_k, format_line, length_stats, pass_at_k, summarize


def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """The fraction of all k-subsets of n samples (c of them correct) holding a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(samples[i] for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_is_the_exact_subset_probability(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(n, c, k)), abs=1e-15), (n, c, k)


def test_pass_at_k_edges_and_large_n() -> None:
    assert pass_at_k(16, 0, 8) == 0.0
    assert pass_at_k(16, 16, 8) == 1.0
    assert pass_at_k(16, 9, 8) == 1.0  # 7 wrong ones cannot fill 8 draws
    assert pass_at_k(16, 3, 1) == pytest.approx(3 / 16)  # pass@1 = c / n
    # n = 1024 (the server's limit): exact binomials, no overflow or cancellation
    assert pass_at_k(1024, 1, 512) == pytest.approx(0.5)
    assert pass_at_k(1024, 2, 512) == pytest.approx(1 - (512 * 511) / (1024 * 1023))


@pytest.mark.parametrize("n, c, k", [(4, 5, 2), (4, -1, 2), (4, 2, 0), (4, 2, 5), (4, 2, 2.0), (4, True, 2)])
def test_pass_at_k_refuses_impossible_counts(n, c, k) -> None:
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(n, c, k)


def test_default_k_is_half_the_samples_and_one_for_a_single_sample() -> None:
    assert default_pass_k(16) == 8  # the seed's Pass@8 for Avg@16
    assert default_pass_k(16, 4) == 4
    assert default_pass_k(1) == 1
    assert default_pass_k(3) == 1


def samples(per_problem: list[list[tuple[float, int, bool]]]) -> list[dict]:
    """Hand-made samples: per problem a list of (score, tokens, truncated)."""
    return [{"problem_id": f"p{i}", "score": s, "tokens": t, "truncated": tr}
            for i, group in enumerate(per_problem) for s, t, tr in group]


def test_summary_of_a_mixed_set_by_hand() -> None:
    # p0: 1 of 4 correct, p1: 3 of 4 correct; k = 2
    data = samples([[(1, 10, False), (0, 20, False), (0, 30, True), (0, 40, True)],
                    [(1, 50, False), (1, 60, False), (1, 70, False), (0, 80, True)]])
    s = summarize(data, n=4, k=2, wall_time_s=12.5)
    assert s["problems"] == 2 and s["samples_per_problem"] == 4 and s["pass_k"] == 2
    assert s["avg_at_n"] == 0.5
    # p0: 1 - C(3,2)/C(4,2) = 1 - 3/6; p1: 1 - C(1,2)/C(4,2) = 1
    assert s["pass_at_k"] == pytest.approx((0.5 + 1.0) / 2)
    assert s["length_mean"] == 45.0
    assert s["length_std"] == pytest.approx(math.sqrt(sum((x - 45) ** 2 for x in range(10, 90, 10)) / 8))
    assert (s["length_min"], s["length_max"]) == (10.0, 80.0)
    assert s["truncated_rate"] == 3 / 8
    assert s["wall_time_s"] == 12.5


def test_summary_all_correct() -> None:
    s = summarize(samples([[(1.0, 100, False)] * 4] * 3), n=4, k=2, wall_time_s=1.0)
    assert (s["avg_at_n"], s["pass_at_k"], s["truncated_rate"]) == (1.0, 1.0, 0.0)
    assert (s["length_mean"], s["length_std"], s["length_min"], s["length_max"]) == (100.0, 0.0, 100.0, 100.0)


def test_summary_none_correct() -> None:
    s = summarize(samples([[(0.0, 7, False), (0.0, 9, False)]] * 5), n=2, k=1, wall_time_s=1.0)
    assert (s["avg_at_n"], s["pass_at_k"]) == (0.0, 0.0)
    assert s["length_mean"] == 8.0 and s["length_std"] == 1.0


def test_summary_all_truncated() -> None:
    s = summarize(samples([[(0.0, 64, True)] * 4, [(1.0, 64, True)] * 4]), n=4, k=2, wall_time_s=1.0)
    assert s["truncated_rate"] == 1.0
    assert (s["length_min"], s["length_max"], s["length_std"]) == (64.0, 64.0, 0.0)
    assert (s["avg_at_n"], s["pass_at_k"]) == (0.5, 0.5)


def test_summary_refuses_uneven_or_empty_sets() -> None:
    with pytest.raises(ValueError, match="problem p1 has 1 samples, expected 2"):
        summarize(samples([[(1, 1, False)] * 2, [(1, 1, False)]]), n=2, k=1, wall_time_s=0)
    with pytest.raises(ValueError, match="no samples"):
        summarize([], n=1, k=1, wall_time_s=0)
    with pytest.raises(ValueError, match="no lengths"):
        length_stats([])


def test_line_format_is_the_seeds() -> None:
    summary = {"wall_time_s": 1546.0612, "samples_per_problem": 16, "pass_k": 8, "avg_at_n": 0.27291666,
               "pass_at_k": 0.61298, "length_mean": 16389.5712, "length_std": 10200.7301, "length_min": 1643,
               "length_max": 32699, "truncated_rate": 0.15208}
    assert format_line("aime2024", summary) == (
        "Evaluated aime2024 in 1546.06s (Avg@16=0.2729, Pass@8: 0.6130, Completion Length: 16389.57 "
        "(±10200.73, ∈[1643.00, 32699.00]), Truncated: 15.2%)")


def test_line_for_a_single_sample_shows_pass_at_1() -> None:
    s = summarize(samples([[(1.0, 12, False)], [(0.0, 30, True)]]), n=1, k=default_pass_k(1), wall_time_s=3.0)
    assert format_line("math500", {**s}) == (
        "Evaluated math500 in 3.00s (Avg@1=0.5000, Pass@1: 0.5000, Completion Length: 21.00 "
        "(±9.00, ∈[12.00, 30.00]), Truncated: 50.0%)")
