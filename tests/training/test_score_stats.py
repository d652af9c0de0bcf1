"""The reward trainers' running score statistics (``training.methods.score_stats.ScoreNormaliser``)."""

from __future__ import annotations

import math

import torch

from flowalign.training.methods.score_stats import ScoreNormaliser


def test_ema_of_mean_and_second_moment_gives_the_std_both_ways():
    norm = ScoreNormaliser(["a", "b"], 0.5, second_key="norm_sq_mean", centre=True)
    assert norm.statistics() == {}
    r1 = torch.tensor([[1.0, 2.0], [3.0, 2.0]], dtype=torch.float64)
    r2 = torch.tensor([[5.0, 2.0], [7.0, 2.0]], dtype=torch.float64)
    for r in (r1, r2):
        norm.update(r.mean(0), r.pow(2).mean(0))
    # first update takes the batch as it is; the second averages with momentum 0.5
    mean_a = 0.5 * 2.0 + 0.5 * 6.0
    sq_a = 0.5 * (1 + 9) / 2 + 0.5 * (25 + 49) / 2
    stats = norm.statistics()
    assert stats["a"] == (mean_a, math.sqrt(sq_a - mean_a**2))
    assert "b" not in stats  # zero spread: left out
    half = ScoreNormaliser(["a"], 0.9, second_key="norm_half_diff_sq", centre=False)
    half.update(torch.tensor([1.0]), torch.tensor([4.0]))
    assert half.statistics() == {"a": (1.0, 2.0)}


def test_a_non_finite_batch_is_skipped_and_state_round_trips():
    norm = ScoreNormaliser(["a"], 0.9, second_key="norm_sq_mean", centre=True)
    norm.update(torch.tensor([float("nan")]), torch.tensor([1.0]))
    assert norm.count == 0
    norm.update(torch.tensor([1.0]), torch.tensor([2.0]))
    state = norm.state_dict()
    assert set(state) == {"norm_mean", "norm_sq_mean", "norm_count"}
    again = ScoreNormaliser(["a"], 0.9, second_key="norm_sq_mean", centre=True)
    again.load_state_dict(state)
    assert again.statistics() == norm.statistics() == {"a": (1.0, 1.0)}
