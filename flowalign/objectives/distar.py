"""Diff-Instruct* (DI*): reward + score-divergence regularisation for one-step generators (docs/algorithms.md 3).

    min_theta  -alpha_rew E[r(g(z), c)] + D^[0,T](p_theta, p_ref^omega)

with the score-based divergence D = int w(t) E_{x_t ~ p_sg(theta),t}[ d(s_theta,t(x_t) - s_ref,t(x_t)) ] dt
and the pseudo-Huber distance d(y) = sqrt(||y||^2 + c^2) - c. No training code was released; the
tractable loss below is the derivation of docs/algorithms.md 3.2 (an online score network s_psi stands in
for the student's score):

    y_t       = s_psi(x_t) - s_ref^omega(x_t)
    L_reg     = w(t) * ( -d'(y_t)^T ( s_psi(x_t) - grad log p(x_t | x0) ) ),   grad log p(x_t | x0) = -noise / t
    L_G       = -alpha_rew r(x0, c) + L_reg

where x0 = g_theta(z), x_t = (1 - t) x0 + t noise (rectified flow: alpha_t = 1 - t, sigma_t = t). theta
enters only through the sample, and the gradient must flow through x_t into d'(y_t) (through BOTH
score networks, as functions of their input, with their parameters frozen) and into s_psi(x_t).
Stopping the gradient through d'(y_t) halves the gradient in the Gaussian-scale toy (check B).

Flow models give velocities; scores are s = -(x_t + (1 - t) v) / t (``flow.score_from_velocity``),
undefined at t = 0: sample t away from 0 (and from 1 for the conversions back).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from flowalign import flow
from flowalign.objectives._common import (
    check_batched,
    check_choice,
    check_floating,
    check_positive,
    check_same_shape,
    check_vector,
    per_sample_weights,
    upcast,
)
from flowalign.objectives.fdistill import fake_score_loss

Distance = Literal["pseudo_huber", "l2"]
DISTANCES: tuple[str, ...] = ("pseudo_huber", "l2")


def _sq_norm(y: Tensor) -> Tensor:
    return y.reshape(y.shape[0], -1).pow(2).sum(dim=1)  # [B]


def pseudo_huber(y: Tensor, *, c: float) -> Tensor:
    """Pseudo-Huber distance per sample: d(y) = sqrt(||y||^2 + c^2) - c (docs/algorithms.md 3.1).

    Computed as ||y||^2 / (sqrt(||y||^2 + c^2) + c), the same number without cancellation for small y.
    d(0) = 0, d ~ ||y||^2 / (2c) for ||y|| << c, d ~ ||y|| - c for ||y|| >> c.

    Args:
        y: score differences [B, ...]; the norm is over all non-batch elements.
        c: scale > 0 (its value in DI* is not published; c proportional to sqrt(D) is a natural choice).

    Returns:
        d [B] (fp32 or fp64).
    """
    check_positive("pseudo_huber", "c", c)
    check_batched("pseudo_huber", "y", y)
    sq = _sq_norm(upcast(y))
    return sq / (torch.sqrt(sq + c**2) + c)


def pseudo_huber_grad(y: Tensor, *, c: float) -> Tensor:
    """Gradient of the pseudo-Huber distance: d'(y) = y / sqrt(||y||^2 + c^2), with ||d'(y)|| < 1.

    Args:
        y: score differences [B, ...].
        c: scale > 0.

    Returns:
        d'(y), shape of ``y``; differentiable w.r.t. ``y``.
    """
    check_positive("pseudo_huber_grad", "c", c)
    check_batched("pseudo_huber_grad", "y", y)
    y = upcast(y)
    return y / flow.expand_t(torch.sqrt(_sq_norm(y) + c**2), y)


def distance_grad(y: Tensor, *, distance: Distance = "pseudo_huber", c: float | None = None) -> Tensor:
    """d'(y) for the DI* distance: "pseudo_huber" (y / sqrt(||y||^2 + c^2)) or "l2" (d = ||y||^2 / 2, d' = y).

    Args:
        y: score differences [B, ...].
        distance: "pseudo_huber" or "l2" (Fisher-divergence distillation).
        c: pseudo-Huber scale (required for "pseudo_huber").

    Returns:
        d'(y), shape of ``y``, differentiable w.r.t. ``y`` (the DI* gradient needs that).
    """
    check_choice("distance_grad", "distance", distance, DISTANCES)
    if distance == "l2":
        return upcast(y)
    if c is None:
        raise ValueError("distance_grad: distance='pseudo_huber' needs the scale c > 0, got c=None")
    return pseudo_huber_grad(y, c=c)


def guided_reference(cond: Tensor, uncond: Tensor, *, guidance_scale: float) -> Tensor:
    """Classifier-free-guided reference (docs/algorithms.md 3.3): uncond + omega (cond - uncond).

    Valid for velocities or scores alike: the velocity-to-score map at fixed (x_t, t) is affine with
    weights summing to one, so guiding velocities and converting equals converting and guiding scores.
    omega = 1 is the conditional model; DI* uses omega = 7.5 inside the distance ("DI*-IN").

    Args:
        cond: conditional prediction [B, ...].
        uncond: unconditional prediction, same shape.
        guidance_scale: omega.

    Returns:
        The guided prediction, shape of ``cond``.
    """
    check_same_shape("guided_reference", [("cond", cond), ("uncond", uncond)])
    # written around cond so that omega = 1 returns the conditional prediction bit for bit
    return cond + (guidance_scale - 1) * (cond - uncond)


def _check_carries_grad(fn: str, tensors: list[tuple[str, Tensor]]) -> None:
    if any(x.requires_grad for _, x in tensors):
        for name, x in tensors[:2]:
            if not x.requires_grad:
                raise ValueError(
                    f"{fn}: {name} carries no gradient while the sample does; DI* needs both score networks "
                    "evaluated on the sample with grad enabled (parameters frozen, not under torch.no_grad)"
                )


def score_divergence_surrogate(
    score_online: Tensor,
    score_ref: Tensor,
    cond_score: Tensor,
    *,
    distance: Distance = "pseudo_huber",
    c: float | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The DI* tractable regulariser in score form (docs/algorithms.md 3.2), for any diffusion path.

        y   = s_psi(x_t) - s_ref(x_t)
        L_i = -w_i d'(y_i)^T ( s_psi(x_t)_i - grad log p(x_t | x0)_i )     (sum over elements)

    Its gradient w.r.t. the generator equals the gradient of the score divergence when every input
    is a function of the reparameterised sample x_t(theta) and the networks' parameters are frozen.
    The value itself is not the divergence.

    Args:
        score_online: online score network's score at x_t [B, ...] (estimates the student's score).
        score_ref: (CFG-guided) reference score at x_t, same shape.
        cond_score: conditional score grad log p(x_t | x0), same shape (-noise / sigma_t).
        distance: "pseudo_huber" or "l2".
        c: pseudo-Huber scale (required for "pseudo_huber").
        weights: optional per-sample time weights w(t) [B].

    Returns:
        loss: [B].
        metrics: detached scalars "reg_loss", "score_diff_norm" (mean ||y||), "dprime_norm" (mean ||d'(y)||).

    Raises:
        ValueError: shapes differ, unknown distance, missing c, or a score network carries no gradient
            while the sample does (the half-gradient bug).
    """
    fn = "score_divergence_surrogate"
    named = [("score_online", score_online), ("score_ref", score_ref), ("cond_score", cond_score)]
    check_same_shape(fn, named)
    check_batched(fn, "score_online", score_online, min_ndim=2)
    for name, x in named:
        check_floating(fn, name, x)
    check_choice(fn, "distance", distance, DISTANCES)
    _check_carries_grad(fn, named)
    s_on, s_ref, s_cond = upcast(score_online), upcast(score_ref), upcast(cond_score)
    y = s_on - s_ref  # [B, ...]
    d_prime = distance_grad(y, distance=distance, c=c)
    inner = (d_prime * (s_on - s_cond)).reshape(y.shape[0], -1).sum(dim=1)  # [B]
    loss = -inner
    w = per_sample_weights(fn, weights, y.shape[0], loss)
    if w is not None:
        loss = w * loss
    metrics = {
        "reg_loss": loss.detach().mean(),
        "score_diff_norm": _sq_norm(y.detach()).sqrt().mean(),
        "dprime_norm": _sq_norm(d_prime.detach()).sqrt().mean(),
    }
    return loss, metrics


def _flow_scores(
    fn: str, v_online: Tensor, v_ref: Tensor, x_t: Tensor, noise: Tensor, t: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    check_same_shape(fn, [("v_online", v_online), ("v_ref", v_ref), ("x_t", x_t), ("noise", noise)])
    check_batched(fn, "x_t", x_t, min_ndim=2)
    check_floating(fn, "t", t)
    check_vector(fn, "t", t, x_t.shape[0])
    _check_carries_grad(fn, [("v_online", v_online), ("v_ref", v_ref), ("x_t", x_t)])
    x_t, t = upcast(x_t), upcast(t).detach()
    s_online = flow.score_from_velocity(x_t, upcast(v_online), t)
    s_ref = flow.score_from_velocity(x_t, upcast(v_ref), t)
    s_cond = -upcast(noise).detach() / flow.expand_t(t, x_t)  # grad log p(x_t | x0) = -noise / t
    return s_online, s_ref, s_cond


def distar_regularizer(
    v_online: Tensor,
    v_ref: Tensor,
    x_t: Tensor,
    noise: Tensor,
    t: Tensor,
    *,
    distance: Distance = "pseudo_huber",
    c: float | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DI* score-divergence regulariser for rectified-flow networks (docs/algorithms.md 3.2 in velocity form).

    Converts velocities to scores, s = -(x_t + (1 - t) v) / t, and applies
    :func:`score_divergence_surrogate` with grad log p(x_t | x0) = -noise / t.

    Args:
        v_online: online score network's velocity at x_t [B, ...], computed from ``x_t`` with grad
            enabled and the network's parameters frozen.
        v_ref: CFG-guided reference velocity at x_t (:func:`guided_reference`), computed the same way.
        x_t: the noised generator sample (1 - t) g(z) + t noise [B, ...], carrying the generator's graph.
        noise: the noise used to build x_t [B, ...].
        t: times [B] in (0, 1).
        distance: "pseudo_huber" (DI*) or "l2" (Fisher divergence).
        c: pseudo-Huber scale.
        weights: optional per-sample time weights w(t) [B].

    Returns:
        loss: [B].
        metrics: as :func:`score_divergence_surrogate`.
    """
    s_online, s_ref, s_cond = _flow_scores("distar_regularizer", v_online, v_ref, x_t, noise, t)
    return score_divergence_surrogate(s_online, s_ref, s_cond, distance=distance, c=c, weights=weights)


def _reward_term(
    fn: str, reward: Tensor | None, reward_scale: float, batch: int, like: Tensor
) -> Tensor | None:
    if reward_scale == 0:
        return None
    if reward is None:
        raise ValueError(f"{fn}: reward_scale = {reward_scale} needs the reward [B], got None")
    check_floating(fn, "reward", reward)
    check_vector(fn, "reward", reward, batch)
    if not reward.requires_grad:
        raise ValueError(
            f"{fn}: reward must carry grad to the generator (compute it from the generated sample "
            "without torch.no_grad); got a tensor without grad"
        )
    return upcast(reward).to(like.dtype)


def distar_generator_loss(
    reward: Tensor | None,
    v_online: Tensor,
    v_ref: Tensor,
    x_t: Tensor,
    noise: Tensor,
    t: Tensor,
    *,
    reward_scale: float,
    distance: Distance = "pseudo_huber",
    c: float | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DI* generator loss per sample (docs/algorithms.md 3.2): L_G = -alpha_rew r(x0, c) + L_reg.

    With ``reward_scale = 0`` this is score-divergence distillation (SIM with d pseudo-Huber; Fisher
    divergence with d = l2); the CFG scale of ``v_ref`` adds the implicit reward log p_ref(c | x_t).

    Args:
        reward: differentiable reward of the clean generator sample [B] (must carry grad when
            reward_scale != 0; may be None when reward_scale = 0). Normalise its scale (docs/algorithms.md 3.5).
        v_online: online score network's velocity at x_t [B, ...] (see :func:`distar_regularizer`).
        v_ref: CFG-guided reference velocity at x_t [B, ...].
        x_t: noised generator sample [B, ...] carrying the generator's graph.
        noise: the noise used to build x_t [B, ...].
        t: times [B] in (0, 1).
        reward_scale: alpha_rew (DI* uses 100 with an O(1)-scale reward).
        distance: "pseudo_huber" or "l2".
        c: pseudo-Huber scale.
        weights: optional per-sample time weights w(t) [B] of the regulariser.

    Returns:
        loss: [B].
        metrics: detached scalars "loss", "reg_loss", "reward" (mean; 0 if unused), "score_diff_norm",
            "dprime_norm".
    """
    fn = "distar_generator_loss"
    reg, metrics = distar_regularizer(v_online, v_ref, x_t, noise, t, distance=distance, c=c, weights=weights)
    r = _reward_term(fn, reward, reward_scale, reg.shape[0], reg)
    loss = reg if r is None else reg - reward_scale * r
    metrics = {
        "loss": loss.detach().mean(),
        "reward": reg.new_zeros(()) if r is None else r.detach().mean(),
        **metrics,
    }
    return loss, metrics


def kl_reward_generator_loss(
    reward: Tensor | None,
    v_online: Tensor,
    v_ref: Tensor,
    x_t: Tensor,
    t: Tensor,
    *,
    reward_scale: float,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KL-regularised reward maximisation for a one-step generator (Diff-Instruct / DI++ baseline, docs/algorithms.md 3.3).

        grad KL(p_theta,t || p_ref,t) = E[ (s_theta(x_t) - s_ref(x_t))^T dx_t/dtheta ]
        L_i = -alpha_rew r_i + w_i sum_j sg(s_psi(x_t) - s_ref^omega(x_t))_ij x_t,ij

    the integral-KL gradient of Diff-Instruct (the score difference is a constant; only x_t carries the
    generator's graph). With ``reward_scale = 0`` and CFG in ``v_ref`` this is Diff-Instruct with CFG.
    The value is a surrogate, not the KL.

    Args:
        reward: differentiable reward [B] (None allowed when reward_scale = 0).
        v_online: online score network's velocity at x_t [B, ...] (detached here).
        v_ref: CFG-guided reference velocity at x_t [B, ...] (detached here).
        x_t: noised generator sample [B, ...] carrying the generator's graph.
        t: times [B] in (0, 1).
        reward_scale: alpha_rew.
        weights: optional per-sample time weights w(t) [B].

    Returns:
        loss: [B].
        metrics: detached scalars "loss", "kl_loss", "reward", "score_diff_norm".
    """
    fn = "kl_reward_generator_loss"
    check_same_shape(fn, [("v_online", v_online), ("v_ref", v_ref), ("x_t", x_t)])
    check_batched(fn, "x_t", x_t, min_ndim=2)
    check_floating(fn, "t", t)
    check_vector(fn, "t", t, x_t.shape[0])
    xt = upcast(x_t)
    tt = upcast(t).detach()
    with torch.no_grad():
        # s_psi - s_ref = -((1 - t) / t) (v_psi - v_ref): the x_t terms cancel
        diff = flow.score_from_velocity(xt, upcast(v_online), tt) - flow.score_from_velocity(
            xt, upcast(v_ref), tt
        )
    kl = (diff * xt).reshape(xt.shape[0], -1).sum(dim=1)  # [B]
    w = per_sample_weights(fn, weights, kl.shape[0], kl)
    if w is not None:
        kl = w * kl
    r = _reward_term(fn, reward, reward_scale, kl.shape[0], kl)
    loss = kl if r is None else kl - reward_scale * r
    metrics = {
        "loss": loss.detach().mean(),
        "kl_loss": kl.detach().mean(),
        "reward": kl.new_zeros(()) if r is None else r.detach().mean(),
        "score_diff_norm": _sq_norm(diff).sqrt().mean(),
    }
    return loss, metrics


def online_score_loss(
    v_online: Tensor, x0: Tensor, noise: Tensor, *, weights: Tensor | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Denoising loss of DI*'s online score network on detached generator samples (docs/algorithms.md 3.4 (a)).

        L_i = w_i mean_j (v_psi(x_t)_ij - sg(noise - x0)_ij)^2,   x0 = sg(g(z)),  x_t = (1 - t) x0 + t noise

    The velocity form of the DSM loss lambda(t) ||eps_psi - eps||^2; identical to f-distill's
    :func:`flowalign.objectives.fdistill.fake_score_loss`.

    Args:
        v_online: online score network's velocity at x_t [B, ...].
        x0: generator samples [B, ...] (detached here).
        noise: the noise used to build x_t [B, ...].
        weights: optional per-sample weights lambda(t) [B].

    Returns:
        loss: [B].
        metrics: detached scalars "loss" and "mse".
    """
    return fake_score_loss(v_online, x0, noise, weights=weights)
