"""Preference objectives for diffusion/flow models: Flow-DPO and Diffusion-DPO.

Batch layout for pairs (the one every helper here assumes): chosen and rejected are concatenated on
dim 0, i.e. a [2P, ...] batch is ``[w_0, ..., w_{P-1}, l_0, ..., l_{P-1}]``, where pair i is
(w_i, l_i) and both members share one noise draw and one t. ``torch.cat([x_w, x_l])`` builds it and
:func:`velocity_errors_for_pairs` splits it.

Beta conventions (docs/algorithms.md 1B, 5.1). Errors may be a per-element *mean* (the
reference code, ``reduction="mean"``) or a *sum* (the papers' squared norm). The loss is linear in
beta times the errors, so (mean, beta) equals (sum, beta / D) with D the elements per sample.
``beta`` here multiplies whatever errors you pass, with the 1/2 of the reference code inside:

    inside = -(beta_t / 2) [ (e_w - e_ref_w) - (e_l - e_ref_l) ],   loss = softplus(-inside).

The reference values are beta = 100 on mean errors for Flow-DPO (flow_grpo) and beta = 5000 on mean
errors for Diffusion-DPO (SD1.5/SDXL).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from flowalign.objectives._common import (
    check_batched,
    check_choice,
    check_floating,
    check_positive,
    check_same_shape,
    check_vector,
    upcast,
)
from flowalign.objectives.flow_matching import Reduction, per_sample_mse

BetaSchedule = Literal["constant", "t2"]
BETA_SCHEDULES: tuple[str, ...] = ("constant", "t2")


def _check_errors(fn: str, errors: list[tuple[str, Tensor]]) -> list[Tensor]:
    for name, e in errors:
        check_floating(fn, name, e)
    check_vector(fn, errors[0][0], errors[0][1], what="[P]")
    check_same_shape(fn, errors)
    return [upcast(e) for _, e in errors]


def _inside(e_w: Tensor, e_l: Tensor, r_w: Tensor, r_l: Tensor, beta: float | Tensor) -> Tensor:
    if isinstance(beta, Tensor):
        beta = beta.to(e_w.dtype)
    return -0.5 * beta * ((e_w - r_w) - (e_l - r_l))


def flow_dpo_beta(
    t: Tensor | None, *, beta: float, beta_schedule: BetaSchedule = "constant"
) -> Tensor | float:
    """The per-pair DPO strength beta_t of Flow-DPO (docs/algorithms.md 1B).

        "constant": beta_t = beta              (the paper's recommendation and the released code)
        "t2":       beta_t = beta (1 - t)^2    (the theory-derived weight; equals Diffusion-DPO on eps errors)

    Args:
        t: per-pair times [P] in [0, 1]; required for "t2", ignored for "constant".
        beta: base strength (> 0).
        beta_schedule: "constant" or "t2".

    Returns:
        ``beta`` (a float) for "constant", else beta (1 - t)^2 of shape [P] (detached).

    Raises:
        ValueError: unknown schedule, beta <= 0, or "t2" without a [P] ``t``.
    """
    fn = "flow_dpo_beta"
    check_choice(fn, "beta_schedule", beta_schedule, BETA_SCHEDULES)
    check_positive(fn, "beta", beta)
    if beta_schedule == "constant":
        return float(beta)
    if t is None:
        raise ValueError(f"{fn}: beta_schedule='t2' needs the per-pair times t [P], got t=None")
    check_floating(fn, "t", t)
    check_vector(fn, "t", t, what="[P]")
    return beta * (1 - upcast(t).detach()).pow(2)


def dpo_inside(
    err_w: Tensor,
    err_l: Tensor,
    ref_err_w: Tensor,
    ref_err_l: Tensor,
    *,
    beta: float | Tensor,
) -> Tensor:
    """The DPO logit ("inside" of the sigmoid) per pair, shared by Flow-DPO and Diffusion-DPO.

        inside = -(beta / 2) [ (err_w - ref_err_w) - (err_l - ref_err_l) ]

    inside > 0 means the policy lowered its error on the chosen sample, relative to the reference,
    more than on the rejected one (the implicit reward prefers w).

    Args:
        err_w: policy error on the chosen members [P].
        err_l: policy error on the rejected members [P].
        ref_err_w: reference error on the chosen members [P] (computed without grad).
        ref_err_l: reference error on the rejected members [P].
        beta: a float or a per-pair tensor [P] (e.g. from :func:`flow_dpo_beta`).

    Returns:
        inside [P] (fp32 or fp64), differentiable w.r.t. the errors.

    Raises:
        ValueError: the four errors are not equal-shape 1-D tensors, or ``beta`` has the wrong shape.
    """
    fn = "dpo_inside"
    errors = _check_errors(
        fn, [("err_w", err_w), ("err_l", err_l), ("ref_err_w", ref_err_w), ("ref_err_l", ref_err_l)]
    )
    if isinstance(beta, Tensor) and beta.ndim != 0:
        check_vector(fn, "beta", beta, errors[0].shape[0], what="[P]")
    return _inside(*errors, beta)


def _dpo_metrics(inside: Tensor, loss: Tensor, gap_w: Tensor, gap_l: Tensor) -> dict[str, Tensor]:
    return {
        "loss": loss.detach().mean(),
        "implicit_acc": (inside.detach() > 0).to(inside.dtype).mean(),
        "inside": inside.detach().mean(),
        "reward_margin": (gap_l - gap_w).detach().mean(),
        "err_gap_w": gap_w.detach().mean(),
        "err_gap_l": gap_l.detach().mean(),
    }


def flow_dpo_loss(
    err_w: Tensor,
    err_l: Tensor,
    ref_err_w: Tensor,
    ref_err_l: Tensor,
    *,
    beta: float,
    t: Tensor | None = None,
    beta_schedule: BetaSchedule = "constant",
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""Flow-DPO loss per pair (Liu et al. 2025, "Improving Video Generation with Human Feedback", Sec. 4; docs/algorithms.md 1B).

    With one shared noise and t per pair, x_t^{w/l} = (1 - t) x0^{w/l} + t noise and velocity errors
    e = ||(noise - x0) - v(x_t, t, c)||^2 for the policy (e) and the frozen reference (e_ref):

        inside = -(beta_t / 2) [ (e_w - e_ref_w) - (e_l - e_ref_l) ]
        loss   = -log sigmoid(inside) = softplus(-inside)

    beta_t = beta ("constant", recommended) or beta (1 - t)^2 ("t2"). When policy == reference,
    inside = 0 and loss = log 2 exactly, with d loss / d inside = -1/2. Swapping chosen and rejected
    maps inside to -inside.

    Args:
        err_w: policy velocity error on the chosen members [P] (e.g. from :func:`velocity_errors_for_pairs`).
        err_l: policy velocity error on the rejected members [P].
        ref_err_w: reference error on the chosen members [P], computed without grad.
        ref_err_l: reference error on the rejected members [P], computed without grad.
        beta: DPO strength (> 0) for the error convention used (mean: ~100; sum: beta_mean / D).
        t: per-pair times [P]; required when ``beta_schedule="t2"``.
        beta_schedule: "constant" or "t2".

    Returns:
        loss: per-pair loss [P].
        metrics: detached scalars: "loss"; "implicit_acc" = fraction of pairs with inside > 0;
            "inside" = mean inside (beta-scaled logit); "reward_margin" = mean of
            (e_l - e_ref_l) - (e_w - e_ref_w), the beta-free margin (> 0: policy improved more on w);
            "err_gap_w" / "err_gap_l" = mean policy-minus-reference error on chosen / rejected.

    Raises:
        ValueError: shapes differ, beta <= 0, unknown schedule, or "t2" without ``t`` [P].
    """
    fn = "flow_dpo_loss"
    e_w, e_l, r_w, r_l = _check_errors(
        fn, [("err_w", err_w), ("err_l", err_l), ("ref_err_w", ref_err_w), ("ref_err_l", ref_err_l)]
    )
    if t is not None:
        check_floating(fn, "t", t)
        check_vector(fn, "t", t, e_w.shape[0], what="[P]")
    beta_t = flow_dpo_beta(t, beta=beta, beta_schedule=beta_schedule)
    inside = _inside(e_w, e_l, r_w, r_l, beta_t)  # [P]
    loss = F.softplus(-inside)
    return loss, _dpo_metrics(inside, loss, e_w - r_w, e_l - r_l)


def diffusion_dpo_loss(
    eps_err_w: Tensor,
    eps_err_l: Tensor,
    ref_eps_err_w: Tensor,
    ref_eps_err_l: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Diffusion-DPO loss per pair for epsilon-prediction models (Wallace et al. 2024, eq. 14; docs/algorithms.md 5.1).

    With e = ||noise - eps(x_t, t)||^2 (shared noise and t per pair; T * omega(lambda_t) absorbed into beta):

        inside = -(beta / 2) [ (e_w - e_ref_w) - (e_l - e_ref_l) ],   loss = softplus(-inside).

    For a rectified-flow model, eps_hat = x_t + (1 - t) v_hat (``flow.noise_from_velocity``) gives
    e_eps = (1 - t)^2 e_v, so this equals :func:`flow_dpo_loss` with ``beta_schedule="t2"``.

    Args:
        eps_err_w: policy noise-prediction error on the chosen members [P].
        eps_err_l: policy noise-prediction error on the rejected members [P].
        ref_eps_err_w: reference error on the chosen members [P], computed without grad.
        ref_eps_err_l: reference error on the rejected members [P], computed without grad.
        beta: DPO strength (> 0); the reference code uses 5000 on per-element mean errors.

    Returns:
        loss: per-pair loss [P].
        metrics: the same detached scalars as :func:`flow_dpo_loss`.

    Raises:
        ValueError: shapes differ or beta <= 0.
    """
    fn = "diffusion_dpo_loss"
    check_positive(fn, "beta", beta)
    e_w, e_l, r_w, r_l = _check_errors(
        fn,
        [
            ("eps_err_w", eps_err_w),
            ("eps_err_l", eps_err_l),
            ("ref_eps_err_w", ref_eps_err_w),
            ("ref_eps_err_l", ref_eps_err_l),
        ],
    )
    inside = _inside(e_w, e_l, r_w, r_l, float(beta))  # [P]
    loss = F.softplus(-inside)
    return loss, _dpo_metrics(inside, loss, e_w - r_w, e_l - r_l)


def split_pairs(x: Tensor) -> tuple[Tensor, Tensor]:
    """Split a [2P, ...] batch laid out as [w_0..w_{P-1}, l_0..l_{P-1}] into (x_w [P, ...], x_l [P, ...]).

    Args:
        x: chosen and rejected concatenated on dim 0.

    Returns:
        Views of the chosen half and the rejected half.

    Raises:
        ValueError: ``x`` has no batch axis or an odd batch size.
    """
    check_batched("split_pairs", "x", x)
    if x.shape[0] % 2 != 0:
        raise ValueError(
            f"split_pairs: the pair batch must have an even size 2P laid out as [w_0..w_(P-1), l_0..l_(P-1)], "
            f"got batch size {x.shape[0]}"
        )
    x_w, x_l = x.chunk(2, dim=0)
    return x_w, x_l


def velocity_errors_for_pairs(
    v_pred: Tensor, v_target: Tensor, *, reduction: Reduction = "mean"
) -> tuple[Tensor, Tensor]:
    """Per-pair velocity errors (err_w, err_l) from one [2P, ...] forward pass.

    The batch layout is chosen and rejected concatenated on dim 0: rows 0..P-1 are the chosen
    members w_i, rows P..2P-1 the rejected members l_i (pair i = rows i and P + i).

        err_i = reduce_j (v_target_ij - v_pred_ij)^2   (mean or sum over non-batch elements)

    Args:
        v_pred: velocities predicted on [x_t^w; x_t^l], shape [2P, ...].
        v_target: targets [noise - x0^w; noise - x0^l], same shape.
        reduction: "mean" (reference code) or "sum" (papers); see the module docstring for beta.

    Returns:
        (err_w [P], err_l [P]).

    Raises:
        ValueError: shapes differ or the batch size is odd.
    """
    err = per_sample_mse(v_pred, v_target, reduction=reduction)  # [2P]
    return split_pairs(err)


def check_shared_pair_noise(noise: Tensor, t: Tensor | None = None, *, atol: float = 0.0) -> None:
    """Raise ``ValueError`` unless chosen and rejected share their noise (and t) in a [2P, ...] batch.

    Flow-DPO and Diffusion-DPO need one noise draw and one t per pair (docs/algorithms.md 1B: the
    variance of the loss explodes otherwise). Call it where the pair batch is built.

    Args:
        noise: noise [2P, ...] in the pair layout.
        t: optional times [2P] in the pair layout.
        atol: tolerance for the comparison (0: exact).

    Raises:
        ValueError: the halves differ, or the batch size is odd.
    """
    n_w, n_l = split_pairs(noise)
    if not torch.allclose(n_w, n_l, rtol=0.0, atol=atol):
        raise ValueError(
            "check_shared_pair_noise: noise differs between chosen and rejected halves of the pair batch"
        )
    if t is not None:
        t_w, t_l = split_pairs(t)
        if not torch.allclose(t_w, t_l, rtol=0.0, atol=atol):
            raise ValueError(
                "check_shared_pair_noise: t differs between chosen and rejected halves of the pair batch"
            )
