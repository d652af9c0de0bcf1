"""f-DPO: reverse KL is Flow-DPO exactly; ψ from the shared f table equals the closed forms."""

from __future__ import annotations

import pytest
import torch

from flowalign.objectives.dpo import flow_dpo_loss
from flowalign.objectives.fdpo import f_dpo_loss, f_dpo_psi

pytestmark = pytest.mark.usefixtures("one_thread")


def _errors(seed=0, p=6):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(p, generator=g, dtype=torch.float64) * 1e-3 for _ in range(4)]


@pytest.mark.parametrize("name", ["reverse_kl", "rkl"])
@pytest.mark.parametrize("schedule", ["constant", "t2"])
def test_reverse_kl_is_flow_dpo_exactly(name, schedule):
    errs = _errors()
    t = torch.rand(6, dtype=torch.float64)
    loss, metrics = f_dpo_loss(*errs, beta=5000.0, divergence=name, t=t, beta_schedule=schedule)
    ref, ref_metrics = flow_dpo_loss(*errs, beta=5000.0, t=t, beta_schedule=schedule)
    assert torch.equal(loss, ref)
    assert all(torch.equal(metrics[k], ref_metrics[k]) for k in ref_metrics)


def test_reverse_kl_psi_from_the_table_gives_the_same_loss():
    # the general path (ψ by autograd from the table's f) agrees with Flow-DPO to fp64 rounding
    e_w, e_l, r_w, r_l = _errors(1)
    beta, a = 5000.0, 300.0
    psi = lambda e, r: f_dpo_psi(-0.5 * a * (e - r), divergence="reverse_kl")  # noqa: E731
    inside = beta / a * (psi(e_w, r_w) - psi(e_l, r_l))
    ref, metrics = flow_dpo_loss(e_w, e_l, r_w, r_l, beta=beta)
    torch.testing.assert_close(torch.nn.functional.softplus(-inside), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "name, alpha, closed",
    [
        ("forward_kl", 0.5, lambda u: -1 / u),
        ("js", 0.5, lambda u: torch.log(2 * u / (1 + u))),
        ("alpha", 0.3, lambda u: (1 - u.pow(-0.3)) / 0.3),
        ("alpha", 0.7, lambda u: (1 - u.pow(-0.7)) / 0.7),
        ("reverse_kl", 0.5, lambda u: torch.log(u) + 1),
    ],
)
def test_psi_equals_the_closed_forms(name, alpha, closed):
    log_u = torch.linspace(-3, 3, 13, dtype=torch.float64)
    torch.testing.assert_close(f_dpo_psi(log_u, divergence=name, alpha=alpha), closed(log_u.exp()),
                               rtol=1e-12, atol=1e-12)  # fmt: skip


def test_f_dpo_gradient_favours_the_winner_and_is_log2_at_init():
    e_w, e_l, _, _ = _errors(2)
    for name in ("forward_kl", "js", "alpha"):
        w = e_w.clone().requires_grad_(True)
        loss, metrics = f_dpo_loss(w, e_l, e_w.clone(), e_l.clone(), beta=5000.0, divergence=name)
        torch.testing.assert_close(loss, torch.full_like(loss, torch.log(torch.tensor(2.0)).item()))
        loss.sum().backward()
        assert (w.grad > 0).all(), name  # lowering the winner's error lowers the loss
    with pytest.raises(ValueError, match="unknown divergence"):
        f_dpo_loss(*_errors(), beta=1.0, divergence="tv")
