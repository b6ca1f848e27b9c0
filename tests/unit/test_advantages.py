"""The GRPO group advantage (deepscaler.advantages) against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from deepscaler.advantages import group_advantages


def close(actual, expected, tol=1e-5) -> None:
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), atol=tol, rtol=tol)


def test_group_advantages_hand_computed() -> None:
    # group 1: [1, 0, 0, 0]: mean 0.25; unbiased var = (0.75^2 + 3 * 0.25^2) / 3 = 0.75 / 3 = 0.25,
    #          std 0.5 -> A = [0.75, -0.25, -0.25, -0.25] / (0.5 + 1e-6) = [1.5, -0.5, -0.5, -0.5]
    #          (the biased std sqrt(0.1875) = 0.433 would give 1.732: the test pins torch.std's n-1)
    # group 2: [1, 1, 0, 0]: mean 0.5; var = 4 * 0.25 / 3 = 1/3, std 0.57735 -> A = +-0.5 / 0.57735 = +-0.866025
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0])
    adv = group_advantages(rewards, group_size=4)
    assert adv.shape == (8,)
    close(adv, [1.5, -0.5, -0.5, -0.5, 0.866025, 0.866025, -0.866025, -0.866025])
    close(adv[0], 0.75 / (0.5 + 1e-6), tol=1e-7)  # eps sits in the denominator, as in the recipe


def test_group_advantages_2d_and_int_rewards() -> None:
    adv = group_advantages(torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0]]), group_size=4)
    assert adv.shape == (2, 4) and adv.dtype == torch.float32
    close(adv[0], [1.5, -0.5, -0.5, -0.5])


def test_group_advantages_all_equal_group_is_exactly_zero() -> None:
    # [1,1,1,1] and [0,0,0,0]: std 0 -> no signal; [0.1]*3 would leave a rounding residue / 1e-6.
    rewards = torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0, 0.1, 0.1, 0.1, 0.1, 1, 0, 1, 0])
    adv = group_advantages(rewards, group_size=4)
    assert torch.equal(adv[:12], torch.zeros(12))
    # [1, 0, 1, 0]: mean 0.5, var = 4 * 0.25 / 3, std 0.57735 -> +-0.866025
    close(adv[12:], [0.866025, -0.866025, 0.866025, -0.866025])


def test_group_size_one_gives_zeros_not_nan() -> None:
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0]), group_size=1)
    assert torch.equal(adv, torch.zeros(3))


@pytest.mark.parametrize("rewards, n", [(torch.zeros(7), 4), (torch.zeros(2, 3), 4), (torch.zeros(2, 2, 2), 2),
                                        (torch.zeros(4), 0)])
def test_group_advantages_shape_errors(rewards, n) -> None:
    with pytest.raises(ValueError):
        group_advantages(rewards, group_size=n)
