"""Properties of flowalign.objectives.f_divergences (docs/algorithms.md 2.1 and 2.9)."""

from __future__ import annotations

import math

import pytest
import torch

from flowalign.objectives.f_divergences import (
    divergence_names,
    f_second_derivative,
    f_weight,
    get_divergence,
)

CANONICAL = [
    "reverse_kl",
    "softened_reverse_kl",
    "jensen_shannon",
    "squared_hellinger",
    "forward_kl",
    "jeffreys",
    "pearson",
    "neyman",
]
ALPHAS = [-0.5, 0.0, 0.5, 1.0, 2.0]
R = torch.logspace(math.log10(0.1), math.log10(20.0), 41, dtype=torch.float64)  # the clamped ratio range


def _autograd_f2(f, r: torch.Tensor) -> torch.Tensor:
    r = r.clone().requires_grad_()
    (d1,) = torch.autograd.grad(f(r).sum(), r, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), r)
    return d2


def _cases():
    return [(name, 0.5) for name in CANONICAL] + [("alpha", a) for a in ALPHAS]


@pytest.mark.parametrize(("name", "alpha"), _cases())
def test_h_equals_r_squared_f_second_derivative(name, alpha):
    div = get_divergence(name, alpha=alpha)
    f2 = _autograd_f2(div.f, R)
    torch.testing.assert_close(f_weight(R, divergence=name, alpha=alpha), R**2 * f2)
    torch.testing.assert_close(f_second_derivative(R, divergence=name, alpha=alpha), f2)
    # a valid generator: f(1) = 0 and f convex
    assert div.f(torch.ones(1, dtype=torch.float64)).abs().item() < 1e-12
    assert (f2 > 0).all()


def test_table_one_weights_and_fastgen_short_names():
    expected = {
        "rkl": torch.ones_like(R),
        "sf": 1 / (R + 1),
        "js": R / (R + 1),
        "sh": 0.25 * R.sqrt(),
        "kl": R,
        "jf": R + 1,
        "pearson": 2 * R**2,
        "neyman": 2 / R,
    }
    for short, h in expected.items():
        torch.testing.assert_close(f_weight(R, divergence=short), h)
    torch.testing.assert_close(f_weight(R, divergence="alpha", alpha=0.0), torch.ones_like(R))
    torch.testing.assert_close(f_weight(R, divergence="alpha", alpha=1.0), R)
    torch.testing.assert_close(f_weight(R, divergence="alpha", alpha=0.5), 4 * f_weight(R, divergence="sh"))


def test_js_and_softened_rkl_are_complementary_and_js_is_the_discriminator_probability():
    logits = torch.linspace(-8, 8, 33, dtype=torch.float64)
    r = logits.exp()
    torch.testing.assert_close(
        f_weight(r, divergence="js") + f_weight(r, divergence="sf"), torch.ones_like(r)
    )
    torch.testing.assert_close(f_weight(r, divergence="js"), torch.sigmoid(logits))
    torch.testing.assert_close(f_weight(r, divergence="sf"), torch.sigmoid(-logits))


def test_divergences_of_two_gaussians_match_closed_forms():
    # p = N(0, 1), q = N(theta, 1): D_f(p || q) = E_q[f(p / q)]; both KLs equal theta^2 / 2
    theta, n = 0.5, 200_000
    x = theta + torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = torch.exp(-theta * x + theta**2 / 2)
    for name in ("reverse_kl", "forward_kl"):
        vals = get_divergence(name).f(r)
        se = vals.std().item() / math.sqrt(n)
        assert abs(vals.mean().item() - theta**2 / 2) < 5 * se
    # Pearson chi^2(p || q) = exp(theta^2) - 1 for unit-variance Gaussians
    vals = get_divergence("pearson").f(r)
    assert abs(vals.mean().item() - math.expm1(theta**2)) < 5 * vals.std().item() / math.sqrt(n)
    # every divergence is >= 0 and 0 when p = q (r = 1)
    for name, alpha in _cases():
        div = get_divergence(name, alpha=alpha)
        assert div.f(r).mean().item() > 0
        assert div.f(torch.ones(3, dtype=torch.float64)).abs().max().item() < 1e-12


def test_names_aliases_and_unknown_name():
    assert get_divergence("rkl") is get_divergence("reverse_kl") is get_divergence("RKL")
    assert get_divergence("js").name == "jensen_shannon"
    assert {"rkl", "kl", "js", "sf", "sh", "jf", "neyman", "alpha", *CANONICAL} <= set(divergence_names())
    with pytest.raises(ValueError, match=r"unknown divergence 'tv'; known: reverse_kl, rkl, .*js"):
        get_divergence("tv")
    with pytest.raises(ValueError, match="alpha must be finite"):
        get_divergence("alpha", alpha=math.inf)


def test_half_precision_ratios_are_computed_in_fp32():
    r = torch.tensor([0.5, 2.0, 7.0], dtype=torch.bfloat16)
    h = f_weight(r, divergence="jf")
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, r.float() + 1)
