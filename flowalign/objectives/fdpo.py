r"""f-DPO for flow models: Flow-DPO with an f-divergence constraint instead of the reverse KL
(Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
Divergence Constraints"; docs/algorithms.md 1G).

With the constraint D_f(π || π_ref) = E_{π_ref}[f_D(π / π_ref)], the optimum satisfies
r(x) = β ψ(u(x)) + const with u = π / π_ref and ψ = f_D', so the preference loss is

    inside = β [ψ(u_w) - ψ(u_l)],     loss = softplus(-inside).

f_D comes from the f table of f-distill (``flowalign.objectives.f_divergences``), written there as
D_f(p || q) = E_q[f(p / q)]. Reading that with q = π, p = π_ref gives E_π[f(π_ref / π)], the same
divergence as E_{π_ref}[f_D(u)] for the perspective f_D(u) = u f(1/u); so "reverse_kl" (f = -log r)
is f_D = u log u, KL(π || π_ref), today's DPO constraint. ψ(u) = f(1/u) - f'(1/u) / u is taken by
autograd from the table's f (no second table of derivatives), in fp64.

Flow models have no tractable log π. As in Flow-DPO the log-ratio of a sample is estimated from
its velocity-error gap at one shared (noise, t) per pair, with a scale a:

    log u = -(a / 2) (e - e_ref),          inside = (β_t / a) [ψ(u_w) - ψ(u_l)]

For the reverse KL ψ(u) = log u + 1 and inside = -(β_t/2)[(e_w - e_ref_w) - (e_l - e_ref_l)], Flow-DPO
for every a (the reverse-KL path calls :func:`flow_dpo_loss` itself). For any other f the scale
matters: a = β_t by default (the log-ratio is Flow-DPO's implicit reward), ``ratio_scale`` sets it.
Closed forms the tests check ψ against: forward KL -1/u; Jensen-Shannon log(2u / (1 + u));
α-divergence (1 - u^(-α)) / α.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flowalign.objectives._common import check_floating, check_positive, check_vector, upcast
from flowalign.objectives.dpo import BetaSchedule, _check_errors, _dpo_metrics, flow_dpo_beta, flow_dpo_loss
from flowalign.objectives.f_divergences import get_divergence

__all__ = ["f_dpo_loss", "f_dpo_psi", "is_reverse_kl"]


def is_reverse_kl(divergence: str) -> bool:
    """True for the names of the reverse KL (the DPO constraint)."""
    return get_divergence(divergence).name == "reverse_kl"


def f_dpo_psi(log_u: Tensor, *, divergence: str, alpha: float = 0.5) -> Tensor:
    """ψ(u) = f_D'(u) with f_D(u) = u f(1/u) and f from the f-distill table, at u = exp(log_u).

    Differentiable in ``log_u`` (second-order autograd through f). Computed in fp64, returned in
    ``log_u``'s dtype (at least fp32).
    """
    check_floating("f_dpo_psi", "log_u", log_u)
    d = get_divergence(divergence, alpha=alpha)
    out_dtype = upcast(log_u).dtype
    with torch.enable_grad():
        lu = log_u.to(torch.float64)
        if not lu.requires_grad:
            lu = lu.detach().requires_grad_(True)
        u = lu.exp()
        f_d = u * d.f(1 / u)
        (df_dlu,) = torch.autograd.grad(f_d.sum(), lu, create_graph=log_u.requires_grad)
    psi = df_dlu / u  # df_D/du = (df_D/dlog u) / u
    return (psi if log_u.requires_grad else psi.detach()).to(out_dtype)


def f_dpo_loss(
    err_w: Tensor,
    err_l: Tensor,
    ref_err_w: Tensor,
    ref_err_l: Tensor,
    *,
    beta: float,
    divergence: str = "reverse_kl",
    alpha: float = 0.5,
    ratio_scale: float | None = None,
    t: Tensor | None = None,
    beta_schedule: BetaSchedule = "constant",
) -> tuple[Tensor, dict[str, Tensor]]:
    """f-DPO loss per pair on velocity errors (module docstring). Reverse KL is :func:`flow_dpo_loss`.

    Args:
        err_w, err_l, ref_err_w, ref_err_l: policy and reference velocity errors [P].
        beta: constraint strength (> 0), the Flow-DPO β.
        divergence: a name of the f table (``"reverse_kl"``/``"rkl"``, ``"forward_kl"``/``"kl"``,
            ``"jensen_shannon"``/``"js"``, ``"alpha"``, ...).
        alpha: α of the α-divergence.
        ratio_scale: a in log u = -(a/2)(e - e_ref); None uses β_t.
        t, beta_schedule: as :func:`flow_dpo_loss`.

    Returns:
        loss [P] and the metrics of :func:`flow_dpo_loss`.

    Raises:
        ValueError: as :func:`flow_dpo_loss`, an unknown divergence, or ratio_scale <= 0.
    """
    if is_reverse_kl(divergence):
        return flow_dpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta=beta, t=t, beta_schedule=beta_schedule)
    fn = "f_dpo_loss"
    e_w, e_l, r_w, r_l = _check_errors(
        fn, [("err_w", err_w), ("err_l", err_l), ("ref_err_w", ref_err_w), ("ref_err_l", ref_err_l)]
    )
    if t is not None:
        check_floating(fn, "t", t)
        check_vector(fn, "t", t, e_w.shape[0], what="[P]")
    if ratio_scale is not None:
        check_positive(fn, "ratio_scale", ratio_scale)
    beta_t = flow_dpo_beta(t, beta=beta, beta_schedule=beta_schedule)
    a = beta_t if ratio_scale is None else float(ratio_scale)
    psi_w = f_dpo_psi(-0.5 * a * (e_w - r_w), divergence=divergence, alpha=alpha)
    psi_l = f_dpo_psi(-0.5 * a * (e_l - r_l), divergence=divergence, alpha=alpha)
    inside = (beta_t / a) * (psi_w - psi_l)
    loss = F.softplus(-inside)
    return loss, _dpo_metrics(inside, loss, e_w - r_w, e_l - r_l)
