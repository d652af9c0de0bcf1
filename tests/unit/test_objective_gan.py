"""Properties of flowalign.objectives.gan (docs/algorithms.md 2.2)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flowalign.objectives.gan import (
    approx_r1_penalty,
    gan_discriminator_loss,
    gan_generator_loss,
    r1_penalty,
)


def test_discriminator_loss_values_and_metrics():
    real = torch.tensor([0.0, 2.0, -1.0, 3.0])
    fake = torch.tensor([0.0, -2.0, 1.0, -0.5])
    loss, m = gan_discriminator_loss(real, fake)
    torch.testing.assert_close(loss, F.softplus(-real) + F.softplus(fake))
    assert loss[0].item() == pytest.approx(2 * math.log(2))
    assert m["d_real_acc"].item() == 0.5 and m["d_fake_acc"].item() == 0.5
    torch.testing.assert_close(m["logit_real"], real.mean())
    torch.testing.assert_close(m["d_loss"], loss.mean())


def test_heads_are_averaged_per_sample():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    loss, _ = gan_discriminator_loss(real, fake)
    per_head = torch.stack([gan_discriminator_loss(real[:, h], fake[:, h])[0] for h in range(3)], dim=1)
    torch.testing.assert_close(loss, per_head.mean(dim=1))
    torch.testing.assert_close(gan_generator_loss(fake), F.softplus(-fake).mean(dim=1))


def test_optimal_discriminator_logit_is_the_log_density_ratio():
    # real ~ p = N(0, 1), fake ~ q = N(theta, 1): the minimiser is l*(x) = log p/q = -theta x + theta^2 / 2,
    # so r = exp(l) is the density ratio f-distill needs (docs/algorithms.md 2.2)
    theta, n = 0.8, 20_000
    g = torch.Generator().manual_seed(1)
    x_real = torch.randn(n, generator=g, dtype=torch.float64)
    x_fake = theta + torch.randn(n, generator=g, dtype=torch.float64)
    params = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([params], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss, _ = gan_discriminator_loss(params[0] * x_real + params[1], params[0] * x_fake + params[1])
        loss = loss.mean()
        loss.backward()
        return loss

    opt.step(closure)
    slope, bias = params.detach().tolist()
    assert slope == pytest.approx(-theta, abs=0.05)
    assert bias == pytest.approx(theta**2 / 2, abs=0.05)


def test_generator_loss_falls_as_the_fake_logit_rises():
    logits = torch.tensor([-3.0, 0.0, 3.0], requires_grad=True)
    loss = gan_generator_loss(logits)
    assert (loss.diff() < 0).all()
    loss.sum().backward()
    torch.testing.assert_close(logits.grad, -torch.sigmoid(-logits.detach()))


def test_r1_penalty_of_a_linear_discriminator_is_its_squared_weight_norm():
    w = torch.tensor([[0.5, -1.0], [2.0, 0.25]], requires_grad=True)  # two heads on a 2-D input
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(2)).requires_grad_()
    logits = x @ w.T  # [4, 2]
    pen = r1_penalty(logits, x)
    w_mean = w.detach().mean(dim=0)  # heads averaged before the gradient
    torch.testing.assert_close(pen, torch.full((4,), float(w_mean.pow(2).sum())))
    pen.mean().backward()  # create_graph: the penalty trains the discriminator
    torch.testing.assert_close(w.grad, (w_mean.expand(2, 2)).clone())
    with pytest.raises(ValueError, match="real_inputs must require grad"):
        r1_penalty(x.detach() @ w.detach().T, x.detach())


def test_approx_r1_is_the_squared_logit_change():
    w = torch.tensor([1.5, -0.5])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2, generator=g)
    delta = 0.1 * torch.randn(6, 2, generator=g)
    torch.testing.assert_close(approx_r1_penalty(x @ w, (x + delta) @ w), (delta @ w) ** 2)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"fake_logits must have the shape of real_logits \[4\]"):
        gan_discriminator_loss(torch.zeros(4), torch.zeros(5))
    with pytest.raises(ValueError, match=r"fake_logits must have shape \[B\] or \[B, H\]"):
        gan_generator_loss(torch.zeros(2, 3, 4))
