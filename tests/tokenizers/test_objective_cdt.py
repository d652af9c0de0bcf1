"""CDT objective: KL of a diagonal Gaussian, term weights, per-frame LPIPS, errors."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from flowalign.objectives.cdt import cdt_loss, kl_diagonal_gaussian, per_frame_lpips


def _mean_abs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A stand-in LPIPS: mean |a - b| per frame, shaped [N, 1, 1, 1] like lpips.LPIPS."""
    return (a - b).abs().flatten(1).mean(1).view(-1, 1, 1, 1)


def test_kl_is_zero_at_standard_normal():
    z = torch.zeros(3, 4, 2, 5, 5)
    assert kl_diagonal_gaussian(z, z).tolist() == [0.0, 0.0, 0.0]


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    expected = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(kl_diagonal_gaussian(mean, logvar), expected)
    assert (kl_diagonal_gaussian(mean, logvar) > 0).all()


def test_kl_is_per_sample():
    mean = torch.zeros(2, 8)
    mean[1] = 2.0  # 8 elements * 0.5 * 2^2
    assert kl_diagonal_gaussian(mean, torch.zeros(2, 8)).tolist() == [0.0, 16.0]


def test_loss_is_zero_for_perfect_reconstruction_and_standard_posterior():
    x = torch.rand(2, 3, 5, 8, 8) * 2 - 1
    z = torch.zeros(2, 4, 2, 1, 1)
    loss, metrics = cdt_loss(x.clone(), x, z, z, lpips_fn=_mean_abs)
    assert loss.tolist() == [0.0, 0.0]
    assert float(metrics["mse"]) == float(metrics["kl"]) == float(metrics["lpips"]) == 0.0


def test_loss_is_the_weighted_sum_of_its_terms():
    g = torch.Generator().manual_seed(1)
    x, pred = torch.randn(2, 3, 5, 8, 8, generator=g), torch.randn(2, 3, 5, 8, 8, generator=g)
    mean, logvar = torch.randn(2, 4, 2, 1, 1, generator=g), torch.randn(2, 4, 2, 1, 1, generator=g)
    loss, _ = cdt_loss(
        pred, x, mean, logvar, lpips_fn=_mean_abs, mse_weight=0.5, kl_weight=3.0, lpips_weight=2.0
    )
    mse = (pred - x).pow(2).flatten(1).mean(1)
    kl = kl_diagonal_gaussian(mean, logvar) / (3 * 5 * 8 * 8)
    lp = (pred - x).abs().mean(dim=(1, 3, 4))  # [B, T] per-frame mean abs diff
    torch.testing.assert_close(loss, 0.5 * mse + 3.0 * kl + 2.0 * lp.mean(1))


def test_mse_gradient():
    x, pred = torch.randn(1, 3, 1, 4, 4), torch.randn(1, 3, 1, 4, 4, requires_grad=True)
    z = torch.zeros(1, 2, 1, 1, 1)
    loss, _ = cdt_loss(pred, x, z, z, lpips_weight=0.0, mse_weight=2.0)
    loss.sum().backward()
    torch.testing.assert_close(pred.grad, 2.0 * 2 * (pred.detach() - x) / x.numel())


def test_per_frame_lpips_averages_frames_of_each_sample():
    calls = []

    def fn(a, b):
        calls.append(a.shape)
        return (a - b).abs().flatten(1).mean(1)

    a = torch.zeros(2, 3, 4, 8, 8)
    b = torch.zeros(2, 3, 4, 8, 8)
    b[1, :, 0] = 1.0  # sample 1, frame 0 differs by 1 everywhere
    out = per_frame_lpips(fn, a, b)
    assert calls == [torch.Size([8, 3, 8, 8])]
    assert out.tolist() == [0.0, 0.25]
    images = per_frame_lpips(fn, a[:, :, 0], b[:, :, 0])
    assert images.tolist() == [0.0, 1.0]


def test_bad_inputs_are_refused():
    x = torch.zeros(2, 3, 5, 8, 8)
    z = torch.zeros(2, 4, 2, 1, 1)
    with pytest.raises(ValueError, match="needs an lpips_fn"):
        cdt_loss(x, x, z, z)
    with pytest.raises(ValueError, match="x0_pred"):
        cdt_loss(x[:, :, :3], x, z, z, lpips_weight=0.0)
    with pytest.raises(ValueError, match="batch size"):
        cdt_loss(x, x, z[:1], z[:1], lpips_weight=0.0)
    with pytest.raises(ValueError, match="kl_weight"):
        cdt_loss(x, x, z, z, lpips_weight=0.0, kl_weight=-1.0)
    with pytest.raises(ValueError, match="one value per frame"):
        per_frame_lpips(lambda a, b: torch.zeros(1), x, x)
