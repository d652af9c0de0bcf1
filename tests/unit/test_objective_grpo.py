"""Flow-GRPO's objective: group advantages, the clipped ratio at the first step, the Gaussian KL."""

from __future__ import annotations

import pytest
import torch

from flowalign.objectives.grpo import gaussian_mean_kl, group_advantages, grpo_clipped_loss
from flowalign.sampling.sde import sde_step_log_prob

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("scale", ["group", "none"])
def test_group_advantages_have_zero_mean_per_group(scale):
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(5 * 4, generator=g, dtype=torch.float64) * 3 + torch.arange(20.0).double()
    adv = group_advantages(rewards, 4, scale=scale)
    eps = torch.finfo(torch.float64).eps
    assert adv.reshape(5, 4).mean(1).abs().max() < 100 * eps
    if scale == "group":  # unit population std up to the eps in the denominator
        std = adv.reshape(5, 4).std(1, unbiased=False)
        r_std = rewards.reshape(5, 4).std(1, unbiased=False)
        torch.testing.assert_close(std, r_std / (r_std + 1e-4), rtol=1e-12, atol=0)
    else:  # centred rewards
        torch.testing.assert_close(
            adv, (rewards.reshape(5, 4) - rewards.reshape(5, 4).mean(1, True)).flatten()
        )
    # a constant added to one group changes nothing; equal rewards give 0
    shifted = rewards.clone()
    shifted[:4] += 7.0
    torch.testing.assert_close(group_advantages(shifted, 4, scale=scale), adv, rtol=0, atol=1e-12)
    assert group_advantages(torch.ones(8), 4).abs().max() == 0


def test_group_advantages_clip_and_errors():
    adv = group_advantages(torch.tensor([0.0, 0.0, 0.0, 100.0]), 4, scale="none", clip=5.0)
    assert adv.max() == 5.0 and adv.min() == -5.0
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.randn(6), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.randn(8), 4, scale="batch")


def _policy_log_prob(w: torch.Tensor, x, x_next, t, t_next):
    v = x * w  # a linear "network": v = w x, one parameter
    lp, mean, std = sde_step_log_prob(x, x_next, v, t, t_next, eta=0.7, reduction="mean")
    return lp, mean, std


def test_first_step_ratio_is_one_and_gradient_is_the_policy_gradient():
    g = torch.Generator().manual_seed(0)
    b = 8
    x = torch.randn(b, 6, generator=g, dtype=torch.float64)
    t, t_next = torch.full((b,), 0.8, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    w = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():  # sampling with the same parameters
        _, mean, std = _policy_log_prob(w, x, x, t, t_next)
        x_next = mean + std[:, None] * torch.randn(b, 6, generator=g, dtype=torch.float64)
        old_lp, _, _ = _policy_log_prob(w, x, x_next, t, t_next)
    adv = group_advantages(torch.randn(b, generator=g, dtype=torch.float64), 4)
    lp, _, _ = _policy_log_prob(w, x, x_next, t, t_next)
    loss, metrics = grpo_clipped_loss(lp[:, None], old_lp[:, None], adv, clip_range=1e-4)
    assert metrics["ratio"] == 1.0 and metrics["clip_frac"] == 0.0
    (grad_clip,) = torch.autograd.grad(loss.mean(), w)
    lp2, _, _ = _policy_log_prob(w, x, x_next, t, t_next)
    (grad_pg,) = torch.autograd.grad((-adv * lp2).mean(), w)
    assert grad_pg.abs() > 1e-6  # the check is not vacuous
    torch.testing.assert_close(grad_clip, grad_pg, rtol=1e-12, atol=0)


def test_clip_stops_the_gradient_outside_the_trust_region():
    lp = torch.tensor([[0.5], [-0.5]], requires_grad=True)
    old = torch.zeros(2, 1)
    adv = torch.tensor([1.0, -1.0])  # both moved in the advantage's direction by more than eps
    loss, metrics = grpo_clipped_loss(lp, old, adv, clip_range=0.2)
    loss.sum().backward()
    assert lp.grad.abs().max() == 0 and metrics["clip_frac"] == 1.0
    lp.grad = None
    loss, _ = grpo_clipped_loss(lp, old, -adv, clip_range=0.2)  # against it: never clipped
    loss.sum().backward()
    assert (lp.grad.abs() > 0).all()


def test_kl_is_zero_at_initialisation_and_matches_the_gaussian_kl():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    std = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    kl0 = gaussian_mean_kl(mean, mean.detach().clone(), std)
    assert (kl0 == 0).all()
    (grad,) = torch.autograd.grad(kl0.sum(), mean)
    assert (grad == 0).all()
    ref = torch.randn(3, 4, generator=g, dtype=torch.float64)
    p = torch.distributions.Normal(mean.detach(), std[:, None])
    q = torch.distributions.Normal(ref, std[:, None])
    expected = torch.distributions.kl_divergence(p, q).sum(1)
    torch.testing.assert_close(gaussian_mean_kl(mean, ref, std, reduction="sum"), expected)
    torch.testing.assert_close(gaussian_mean_kl(mean, ref, std), expected / 4)
