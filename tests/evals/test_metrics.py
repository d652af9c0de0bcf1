"""Properties of the eval metrics: Frechet distance, win rates, bootstrap intervals, calibration, drift."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowalign.evals import diversity as evals_diversity
from flowalign.evals import fid as evals_fid
from flowalign.evals import metrics
from flowalign.evals.stats import win_rate


def _random_cov(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


# --------------------------------------------------------------------------- Frechet distance


def test_frechet_one_dimensional_closed_form():
    # FD(N(m1, s1^2), N(m2, s2^2)) = (m1 - m2)^2 + (s1 - s2)^2
    for m1, s1, m2, s2 in [(0.0, 1.0, 0.0, 1.0), (1.0, 2.0, -0.5, 0.5), (3.0, 0.1, 3.0, 4.0)]:
        got = evals_fid.frechet_distance(
            torch.tensor([m1]), torch.tensor([[s1**2]]), torch.tensor([m2]), torch.tensor([[s2**2]])
        )
        assert got == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2, rel=1e-9, abs=1e-12)


def test_frechet_diagonal_and_commuting_closed_form():
    # Commuting covariances (same eigenvectors): FD = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    d = 6
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    a = torch.linspace(0.1, 3.0, d, dtype=torch.float64)
    b = torch.linspace(2.0, 0.5, d, dtype=torch.float64)
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.arange(d, dtype=torch.float64) / 3
    expected = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    assert evals_fid.frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(
        expected, rel=1e-9
    )
    rotated = evals_fid.frechet_distance(mu1, q @ torch.diag(a) @ q.T, mu2, q @ torch.diag(b) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-8)


def test_frechet_matches_scipy_sqrtm_on_general_covariances():
    scipy_linalg = pytest.importorskip("scipy.linalg", reason="scipy gives the independent sqrtm reference")
    d = 8
    s1, s2 = _random_cov(d, 1), _random_cov(d, 2)
    mu1, mu2 = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    covmean = scipy_linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    expected = float(((mu1 - mu2) ** 2).sum()) + float(np.trace(s1.numpy() + s2.numpy() - 2 * covmean))
    assert evals_fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)
    assert evals_fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    # symmetric in its two arguments
    assert evals_fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
        evals_fid.frechet_distance(mu2, s2, mu1, s1)
    )


def test_fid_from_features_converges_to_the_gaussian_closed_form():
    g = torch.Generator().manual_seed(0)
    n = 40_000
    a = torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0], dtype=torch.float64)
    b = (
        torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.tensor([0.5, 2.0], dtype=torch.float64)
        + 1.0
    )
    expected = 2 * 1.0**2 + (1.0 - 0.5) ** 2 + (2.0 - 2.0) ** 2  # mean shift 1 in both dims
    assert evals_fid.fid_from_features(a, b) == pytest.approx(expected, rel=0.05)


def test_frechet_is_real_and_nonnegative_for_singular_covariances():
    # fewer samples than dimensions: rank-deficient covariances must not produce NaN or complex parts
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 20, generator=g), torch.randn(5, 20, generator=g) + 0.1
    value = evals_fid.fid_from_features(a, b)
    assert math.isfinite(value) and value >= -1e-9


def test_frechet_shape_errors_name_shapes():
    with pytest.raises(ValueError, match="shapes do not match"):
        evals_fid.frechet_distance(torch.zeros(2), torch.eye(2), torch.zeros(3), torch.eye(3))
    with pytest.raises(ValueError, match="N >= 2"):
        evals_fid.feature_statistics(torch.zeros(1, 4))


# --------------------------------------------------------------------------- win rates


def test_win_rate_with_ties_counts_ties_half():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    b = torch.tensor([0.0, 2.0, 3.0, 9.0, 1.0])  # wins: 1, 5; ties: 2, 3; loss: 4
    out = metrics.paired_win_rate(a, b, num_resamples=200)
    assert (out["win"], out["tie"], out["loss"]) == pytest.approx((0.4, 0.4, 0.2))
    assert out["win_rate_with_ties"] == pytest.approx(0.4 + 0.5 * 0.4)
    assert out["ci_low"] <= out["win_rate_with_ties"] <= out["ci_high"]
    assert out["n"] == 5


def test_win_rate_tolerance_turns_small_differences_into_ties():
    a = torch.tensor([1.00, 1.05, 2.0])
    b = torch.tensor([1.02, 1.00, 1.0])
    strict = metrics.paired_win_rate(a, b, num_resamples=50)
    loose = metrics.paired_win_rate(a, b, tie_tolerance=0.06, num_resamples=50)
    assert (strict["win"], strict["tie"], strict["loss"]) == pytest.approx((2 / 3, 0, 1 / 3))
    assert (loose["win"], loose["tie"], loose["loss"]) == pytest.approx((1 / 3, 2 / 3, 0))
    assert strict["tie"] == 0.0  # counted, not 1 - win - loss


def test_win_rate_is_antisymmetric():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 3, (50,), generator=g).float(), torch.randint(0, 3, (50,), generator=g).float()
    ab, ba = (
        metrics.paired_win_rate(a, b, num_resamples=100),
        metrics.paired_win_rate(b, a, num_resamples=100),
    )
    assert ab["win"] == pytest.approx(ba["loss"]) and ab["tie"] == pytest.approx(ba["tie"])
    assert ab["win_rate_with_ties"] + ba["win_rate_with_ties"] == pytest.approx(1.0)
    assert win_rate(a, b)["win_rate_with_ties"] == pytest.approx(ab["win_rate_with_ties"])


def test_win_rate_identical_models_is_one_half_with_degenerate_interval():
    a = torch.rand(20)
    out = metrics.paired_win_rate(a, a.clone(), list(range(10)) * 2, num_resamples=100)
    assert out["tie"] == 1.0 and out["win_rate_with_ties"] == out["ci_low"] == out["ci_high"] == 0.5


# --------------------------------------------------------------------------- bootstrap intervals


def test_bootstrap_ci_coverage_iid():
    # 95% percentile bootstrap on n = 60 normal samples covers the true mean in about 95% of trials
    g = torch.Generator().manual_seed(0)
    trials, hits = 200, 0
    for t in range(trials):
        x = 0.3 + torch.randn(60, generator=g, dtype=torch.float64)
        s = metrics.dimension_stats(x, num_resamples=400, seed=t)
        hits += s["ci_low"] <= 0.3 <= s["ci_high"]
    assert 0.88 <= hits / trials <= 0.99


def test_bootstrap_ci_is_the_interval_dimension_stats_reports():
    """One bootstrap for both: the same draws give the same interval, with and without prompt groups."""
    from flowalign.evals.stats import bootstrap_ci

    x = torch.randn(24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    groups = [i // 3 for i in range(24)]
    for g in (None, groups):
        s = metrics.dimension_stats(x, g, num_resamples=300, seed=5)
        assert bootstrap_ci(x, g, num_resamples=300, seed=5) == (s["ci_low"], s["ci_high"])


def test_cluster_bootstrap_covers_where_iid_bootstrap_does_not():
    # 20 prompts x 8 samples with a strong per-prompt effect: resampling samples ignores the prompt
    # variance and under-covers; resampling prompts keeps close to the nominal 95%.
    g = torch.Generator().manual_seed(1)
    trials, hits_iid, hits_cluster = 150, 0, 0
    groups = torch.arange(20).repeat_interleave(8)
    for t in range(trials):
        prompt_effect = torch.randn(20, generator=g, dtype=torch.float64)
        x = prompt_effect[groups] + 0.2 * torch.randn(160, generator=g, dtype=torch.float64)
        iid = metrics.dimension_stats(x, num_resamples=300, seed=t)
        clustered = metrics.dimension_stats(x, groups, num_resamples=300, seed=t)
        hits_iid += iid["ci_low"] <= 0.0 <= iid["ci_high"]
        hits_cluster += clustered["ci_low"] <= 0.0 <= clustered["ci_high"]
        assert clustered["mean"] == pytest.approx(float(x.mean()))
        assert clustered["num_groups"] == 20 and clustered["n"] == 160
    assert hits_cluster / trials >= 0.87
    assert hits_iid / trials <= 0.6


def test_dimension_stats_values_and_reproducibility():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    s = metrics.dimension_stats(x, num_resamples=500, seed=7)
    assert s["mean"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0 and s["n"] == 4
    assert s["std"] == pytest.approx(float(x.std()))
    assert s["se"] == pytest.approx(float(x.std()) / 2)
    assert s == metrics.dimension_stats(x, num_resamples=500, seed=7)
    with pytest.raises(ValueError, match="group labels"):
        metrics.dimension_stats(x, [0, 1])


# --------------------------------------------------------------------------- calibration


def _bt_pairs(n: int, *, seed: int, scale: float = 1.0):
    """Pairs whose labels follow Bradley-Terry on the rewards divided by ``scale``."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g, dtype=torch.float64) * 2 * scale
    b = torch.randn(n, generator=g, dtype=torch.float64) * 2 * scale
    p = torch.sigmoid((a - b) / scale)
    labels = torch.where(torch.rand(n, generator=g, dtype=torch.float64) < p, 1, -1)
    return a, b, labels


def test_calibration_of_a_calibrated_reward_is_small_and_of_a_scaled_one_is_large():
    a, b, labels = _bt_pairs(6000, seed=0)
    good = metrics.preference_calibration(a, b, labels)
    assert good["ece"] < 0.03
    assert good["fitted_temperature"] == pytest.approx(1.0, rel=0.15)
    a5, b5, labels5 = _bt_pairs(6000, seed=1, scale=5.0)  # logits 5x too large: overconfident at T = 1
    over = metrics.preference_calibration(a5, b5, labels5)
    assert over["ece"] > 0.1
    assert over["fitted_temperature"] == pytest.approx(5.0, rel=0.15)
    assert over["ece_fitted"] < 0.03
    assert over["nll_fitted"] < over["nll"]


def test_calibration_accuracy_counts_sign_agreement_and_skips_missing():
    a = torch.tensor([1.0, 0.0, 2.0, 5.0, 1.0])
    b = torch.tensor([0.0, 1.0, 3.0, 5.0, 0.0])
    labels = torch.tensor([1, -1, 1, 0, -2])  # right, right, wrong, tie, missing
    out = metrics.preference_calibration(a, b, labels, fit_temperature=False)
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert out["num_pairs"] == 4 and out["num_ties"] == 1
    assert out["accuracy_with_ties"] >= 2 / 4  # tie-calibrated accuracy >= no-tie accuracy over all pairs
    three_way = metrics.preference_calibration(a, b, labels, theta=5.0, fit_temperature=False)
    assert 0 <= three_way["ece"] <= 1 and three_way["num_pairs"] == 4


def test_expected_calibration_error_known_values():
    conf = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.6, 0.6])
    correct = torch.tensor([1, 1, 1, 0, 1, 0])
    ece, bins = metrics.expected_calibration_error(conf, correct, num_bins=10)
    # bin 0.9: acc 0.75 vs conf 0.9 (4/6 of the mass); bin 0.6: acc 0.5 vs 0.6 (2/6)
    assert ece == pytest.approx(4 / 6 * 0.15 + 2 / 6 * 0.1)
    assert sum(b["count"] for b in bins) == 6


# --------------------------------------------------------------------------- drift and hacking


def test_paired_difference_and_hacking_flags():
    g = torch.Generator().manual_seed(0)
    base_ta, base_vq = torch.rand(200, generator=g), torch.rand(200, generator=g)
    groups = list(range(50)) * 4
    deltas = {
        "ta": metrics.paired_difference(base_ta + 0.3, base_ta, groups, num_resamples=300),
        "vq": metrics.paired_difference(
            base_vq - 0.2 + 0.01 * torch.randn(200, generator=g), base_vq, groups, num_resamples=300
        ),  # fmt: skip
    }
    assert deltas["ta"]["delta"] == pytest.approx(0.3, abs=1e-6)
    assert deltas["ta"]["delta_std"] == pytest.approx(0.3 / float(base_ta.double().std()), rel=1e-6)
    flags = metrics.hacking_flags(deltas, trained=["ta"], heldout=["vq"])
    assert len(flags) == 1 and "'vq' fell" in flags[0] and "['ta'] rose" in flags[0]
    assert metrics.hacking_flags(deltas, trained=["vq"], heldout=["ta"]) == []  # held-out rose: fine


def test_pixel_distance_zero_iff_identical():
    x = torch.rand(3, 3, 8, 8)
    assert torch.equal(evals_diversity.pixel_distance(x, x), torch.zeros(3))
    y = x.clone()
    y[1] = 1 - y[1]
    d = evals_diversity.pixel_distance(x, y)
    assert d[0] == 0 and d[2] == 0 and d[1] > 0
