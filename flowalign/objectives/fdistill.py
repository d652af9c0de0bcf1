"""f-distill: one-step distillation by f-divergence distribution matching (Xu, Nie, Vahdat 2025; docs/algorithms.md 2).

Student marginal q (noised one-step samples x = G(z)), teacher marginal p, density ratio r = p / q
estimated by a discriminator with logit l (optimal D = p / (p + q) gives r = e^l). The student
gradient is the score-distillation (DMD / VSD) gradient re-weighted per sample by h(r) = r^2 f''(r):

    grad D = -E[ h(r) (grad log p_t - grad log q_t)^T dx_t/dtheta ],   h(r) = r^2 f''(r)

Pieces, in the order a training step uses them:
    f_divergences.py          f, f'' and h for each divergence (registry by name, FastGen's short names)
    density_ratio_from_logits logits -> r with the logit clamp and ratio clamp (docs/algorithms.md 2.3 step 1)
    RatioBinEMA               per-time-bin ratio normalisation with an EMA; all-reduce by the caller (step 2)
    f_distill_weights         all of 2.3: r -> r~ -> h(r~) -> h~ = h / mean h
    fdistill_generator_loss   the surrogate with the DMD normalisation + GAN term (2.4)
    fake_score_loss           the online "fake" score network's denoising loss, velocity form (2.5)
    gan.py                    discriminator / generator GAN losses and the R1 terms (2.2)

All-reduce: ``reduce_fn`` arguments take a tensor and must return its elementwise SUM over data-parallel
ranks (e.g. ``lambda x: accelerator.reduce(x, "sum")``); None means single process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from flowalign import flow
from flowalign.objectives._common import (
    check_batched,
    check_floating,
    check_positive,
    check_same_shape,
    check_vector,
    per_sample_weights,
    upcast,
)
from flowalign.objectives.f_divergences import get_divergence
from flowalign.objectives.flow_matching import per_sample_mse
from flowalign.objectives.gan import (
    approx_r1_penalty,
    gan_discriminator_loss,
    gan_generator_loss,
    r1_penalty,
)

# the GAN terms live in gan.py and are re-exported so that everything f-distill needs is importable from here
__all__ = [
    "RatioBinEMA",
    "approx_r1_penalty",
    "density_ratio_from_logits",
    "f_distill_weights",
    "fake_score_loss",
    "fdistill_generator_loss",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "normalize_weights",
    "r1_penalty",
    "time_bin_index",
]

ReduceFn = Callable[[Tensor], Tensor]

# ---------------------------------------------------------------------------------------------------------------
# Density ratio from discriminator logits and its normalisation (docs/algorithms.md 2.2-2.3).


def density_ratio_from_logits(
    logits: Tensor,
    *,
    logit_clamp: float | None = 10.0,
    ratio_min: float | None = 0.1,
    ratio_max: float | None = 20.0,
) -> Tensor:
    """Density ratio r = p / q = exp(l) from discriminator logits, clamped (docs/algorithms.md 2.3 step 1).

        l = clip(mean_heads logits, -logit_clamp, logit_clamp),   r = clip(exp(l), ratio_min, ratio_max)

    Args:
        logits: discriminator logits [B] or [B, H] (H heads, averaged first, as in FastGen).
        logit_clamp: symmetric logit clamp (None: none).
        ratio_min: lower ratio clamp (None: none).
        ratio_max: upper ratio clamp (None: none).

    Returns:
        r [B] (fp32 or fp64), detached: the weights are constants for the generator.

    Raises:
        ValueError: ``logits`` is not [B] or [B, H].
    """
    fn = "density_ratio_from_logits"
    check_floating(fn, "logits", logits)
    if logits.ndim not in (1, 2):
        raise ValueError(f"{fn}: logits must have shape [B] or [B, H], got {list(logits.shape)}")
    lg = upcast(logits).detach()
    if lg.ndim == 2:
        lg = lg.mean(dim=1)  # [B]
    if logit_clamp is not None:
        lg = lg.clamp(-logit_clamp, logit_clamp)
    r = torch.exp(lg)
    if ratio_min is not None or ratio_max is not None:
        r = r.clamp(min=ratio_min, max=ratio_max)
    return r


def time_bin_index(t: Tensor, *, num_bins: int = 10, t_min: float = 0.0, t_max: float = 1.0) -> Tensor:
    """Equal-width time-bin index of each t in [t_min, t_max] (values outside go to the end bins).

    Args:
        t: times [B].
        num_bins: number of bins (>= 1).
        t_min: lower edge of bin 0.
        t_max: upper edge of the last bin (> t_min).

    Returns:
        Bin indices [B] (long) in [0, num_bins - 1].
    """
    fn = "time_bin_index"
    check_floating(fn, "t", t)
    check_vector(fn, "t", t)
    if num_bins < 1 or not t_max > t_min:
        raise ValueError(f"{fn}: need num_bins >= 1 and t_max > t_min, got {num_bins}, [{t_min}, {t_max}]")
    pos = (upcast(t).detach() - t_min) / (t_max - t_min) * num_bins
    return pos.floor().long().clamp(0, num_bins - 1)


@dataclass(eq=False)
class RatioBinEMA:
    """Per-time-bin running mean of the density ratio, for the ratio normalisation of docs/algorithms.md 2.3 step 2.

    Since E_q[p / q] = 1, dividing r by its mean within each noise level removes the discriminator's
    calibration bias there: m_b <- decay m_b + (1 - decay) mean_{i in b} r_i for each bin b present in
    the (global) batch, then r~_i = r_i / m_{b(i)}. decay = 0 (default) uses the current batch mean;
    FastGen uses 0.5 on ImageNet-64. The first time a bin is seen, m_b is set to that batch mean
    (no pull toward an arbitrary initial value). Non-finite batch means leave their bin unchanged.

    Distributed use: ``sums, counts = state.bin_sums(r, t)``, all-reduce both (SUM), then
    ``state.update(sums, counts)`` and ``state.normalize(r, t)``.

    Attributes:
        num_bins: number of equal-width bins over [t_min, t_max] (10 in FastGen).
        decay: EMA decay rho in [0, 1).
        t_min: lower edge of the time range.
        t_max: upper edge of the time range.
        means: running means [num_bins] (fp32).
        seen: whether each bin has been updated at least once [num_bins] (bool).
    """

    num_bins: int = 10
    decay: float = 0.0
    t_min: float = 0.0
    t_max: float = 1.0
    means: Tensor = field(default=None)  # type: ignore[assignment]
    seen: Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.num_bins < 1:
            raise ValueError(f"RatioBinEMA: num_bins must be >= 1, got {self.num_bins}")
        if not 0 <= self.decay < 1:
            raise ValueError(f"RatioBinEMA: decay must be in [0, 1), got {self.decay}")
        if not self.t_max > self.t_min:
            raise ValueError(f"RatioBinEMA: need t_max > t_min, got [{self.t_min}, {self.t_max}]")
        if self.means is None:
            self.means = torch.ones(self.num_bins)
        if self.seen is None:
            self.seen = torch.zeros(self.num_bins, dtype=torch.bool)

    def bin_index(self, t: Tensor) -> Tensor:
        """Bin of each time [B] -> long [B]."""
        return time_bin_index(t, num_bins=self.num_bins, t_min=self.t_min, t_max=self.t_max)

    def bin_sums(self, r: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Per-bin sums of r and counts for this (local) batch; all-reduce both before :meth:`update`.

        Args:
            r: density ratios [B].
            t: times [B].

        Returns:
            (sums [num_bins], counts [num_bins]), both in the dtype of ``r`` (fp32 or fp64).
        """
        fn = "RatioBinEMA.bin_sums"
        check_floating(fn, "r", r)
        check_vector(fn, "r", r)
        check_vector(fn, "t", t, r.shape[0])
        r = upcast(r).detach()
        idx = self.bin_index(t).to(r.device)
        sums = torch.zeros(self.num_bins, dtype=r.dtype, device=r.device).index_add(0, idx, r)
        counts = torch.zeros(self.num_bins, dtype=r.dtype, device=r.device).index_add(
            0, idx, torch.ones_like(r)
        )
        return sums, counts

    def update(self, sums: Tensor, counts: Tensor) -> Tensor:
        """EMA update of the bins with counts > 0 from (all-reduced) per-bin sums and counts.

        Args:
            sums: per-bin sums of r [num_bins].
            counts: per-bin sample counts [num_bins].

        Returns:
            The updated means [num_bins].
        """
        check_vector("RatioBinEMA.update", "sums", sums, self.num_bins, what="[num_bins]")
        check_vector("RatioBinEMA.update", "counts", counts, self.num_bins, what="[num_bins]")
        self.means = self.means.to(sums.device)
        self.seen = self.seen.to(sums.device)
        batch_mean = (sums / counts.clamp_min(1)).to(self.means.dtype)
        # a bin whose batch mean is NaN/inf (a non-finite logit; the loop skips that step) keeps its value,
        # else one bad step would poison the running means for the rest of the run
        present = (counts > 0) & torch.isfinite(batch_mean)
        ema = torch.where(self.seen, self.decay * self.means + (1 - self.decay) * batch_mean, batch_mean)
        self.means = torch.where(present, ema, self.means)
        self.seen = self.seen | present
        return self.means

    def normalize(self, r: Tensor, t: Tensor, *, eps: float = 1e-6) -> Tensor:
        """r~_i = r_i / max(m_{b(i)}, eps) with the current means.

        Args:
            r: density ratios [B].
            t: times [B].
            eps: floor for the bin mean (FastGen adds 1e-6 instead; the floor keeps r~ exact).

        Returns:
            Normalised ratios [B].
        """
        r = upcast(r)
        means = self.means.to(device=r.device, dtype=r.dtype)
        return r / means[self.bin_index(t).to(r.device)].clamp_min(eps)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: config and buffers (CPU tensors)."""
        return {
            "num_bins": self.num_bins,
            "decay": self.decay,
            "t_min": self.t_min,
            "t_max": self.t_max,
            "means": self.means.detach().cpu().clone(),
            "seen": self.seen.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; the bin layout must match this object's.

        Raises:
            ValueError: a key is missing or num_bins / t range differ.
        """
        for key in ("num_bins", "t_min", "t_max", "decay", "means", "seen"):
            if key not in state:
                raise ValueError(f"RatioBinEMA.load_state_dict: missing key {key!r}")
        for key in ("num_bins", "t_min", "t_max"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"RatioBinEMA.load_state_dict: {key} is {getattr(self, key)} here but {state[key]} in the state"
                )
        if tuple(state["means"].shape) != (self.num_bins,) or tuple(state["seen"].shape) != (self.num_bins,):
            raise ValueError(f"RatioBinEMA.load_state_dict: means/seen must have shape [{self.num_bins}]")
        self.decay = float(state["decay"])
        self.means = state["means"].detach().clone().float()
        self.seen = state["seen"].detach().clone().bool()


def _global_mean(x: Tensor, reduce_fn: ReduceFn | None) -> Tensor:
    stats = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), dtype=x.dtype, device=x.device)])
    if reduce_fn is not None:
        stats = reduce_fn(stats)
    return stats[0] / stats[1]


def normalize_weights(h: Tensor, *, eps: float = 1e-6, reduce_fn: ReduceFn | None = None) -> Tensor:
    """Global weight normalisation h~_i = h_i / max(mean_global h, eps) (docs/algorithms.md 2.3 step 3).

    Args:
        h: raw weights [B] (local batch).
        eps: floor for the mean (FastGen adds 1e-6; the floor keeps h = 1 mapped to exactly 1).
        reduce_fn: SUM all-reduce for the global mean (None: single process).

    Returns:
        Normalised weights [B], mean 1 over the global batch.
    """
    check_vector("normalize_weights", "h", h)
    h = upcast(h)
    return h / _global_mean(h, reduce_fn).clamp_min(eps)


def f_distill_weights(
    logits: Tensor,
    t: Tensor,
    *,
    divergence: str = "js",
    alpha: float = 0.5,
    ratio_state: RatioBinEMA | None = None,
    bin_normalize: bool = True,
    logit_clamp: float | None = 10.0,
    ratio_min: float | None = 0.1,
    ratio_max: float | None = 20.0,
    eps: float = 1e-6,
    reduce_fn: ReduceFn | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-sample f-distill weights h~ from discriminator logits (docs/algorithms.md 2.3, all three steps).

        r   = clip(exp(clip(l, +-10)), 0.1, 20)                 ratio from the logits (detached)
        r~  = r / m_{bin(t)}                                     per-time-bin ratio normalisation (EMA)
        h~  = h(r~) / mean_global h(r~),   h(r) = r^2 f''(r)     weight normalisation

    Reverse-KL has h = 1, so h~ = 1 exactly (plain DMD); constant logits give h~ = 1 for every divergence.

    Args:
        logits: discriminator logits on the noised student samples [B] or [B, H].
        t: the samples' times [B] (rectified-flow t; any time variable matching ``ratio_state``'s range).
        divergence: name for :func:`get_divergence` (the paper's headline: "kl" CIFAR-10, "js" otherwise).
        alpha: alpha of the alpha-divergence.
        ratio_state: running per-bin means; None means a fresh ``RatioBinEMA()`` (10 bins on [0, 1],
            decay 0: current-batch means). Pass one object across steps for decay > 0 and resume.
        bin_normalize: False skips the per-bin ratio normalisation.
        logit_clamp: logit clamp (None: none).
        ratio_min: lower ratio clamp (None: none).
        ratio_max: upper ratio clamp (None: none).
        eps: floor of the divisors.
        reduce_fn: SUM all-reduce across data-parallel ranks for the bin statistics and the h mean.

    Returns:
        weights: h~ [B], detached.
        metrics: detached scalars "ratio_mean" (before bin normalisation), "ratio_norm_mean",
            "weight_min", "weight_max".
    """
    fn = "f_distill_weights"
    divergence_obj = get_divergence(divergence, alpha=alpha)
    r = density_ratio_from_logits(logits, logit_clamp=logit_clamp, ratio_min=ratio_min, ratio_max=ratio_max)
    check_floating(fn, "t", t)
    check_vector(fn, "t", t, r.shape[0])
    if bin_normalize:
        state = ratio_state if ratio_state is not None else RatioBinEMA()
        sums, counts = state.bin_sums(r, t)
        if reduce_fn is not None:
            sums, counts = reduce_fn(torch.stack([sums, counts])).unbind(0)
        state.update(sums, counts)
        r_tilde = state.normalize(r, t, eps=eps)
    else:
        r_tilde = r
    weights = normalize_weights(divergence_obj.h(r_tilde), eps=eps, reduce_fn=reduce_fn).detach()
    metrics = {
        "ratio_mean": r.mean(),
        "ratio_norm_mean": r_tilde.detach().mean(),
        "weight_min": weights.min(),
        "weight_max": weights.max(),
    }
    return weights, metrics


# ---------------------------------------------------------------------------------------------------------------
# Losses (docs/algorithms.md 2.4, 2.5).


def fdistill_generator_loss(
    x: Tensor,
    x0_teacher: Tensor,
    x0_fake: Tensor,
    *,
    weights: Tensor | None = None,
    fake_logits: Tensor | None = None,
    gan_weight: float = 0.0,
    dmd_normalize: bool = True,
    eps: float = 1e-6,
) -> tuple[Tensor, dict[str, Tensor]]:
    """f-distill generator loss per sample: weighted distribution matching + GAN (docs/algorithms.md 2.4).

        kappa_i = 1 / (mean_j |x_ij - x0_teacher_ij| + eps)               DMD normalisation (detached)
        g_i     = h~_i kappa_i (x0_fake_i - x0_teacher_i)                  (detached)
        L_i     = 1/2 mean_j (x_ij - sg(x_ij - g_ij))^2 + gan_weight softplus(-l(x_t,i))

    so dL_i/dx_i = g_i / D (D elements): gradient descent moves x toward the teacher's denoised
    prediction and away from the fake-score one. Since x0_fake - x0_teacher = (sigma^2 / alpha)
    (s_q - s_p) (docs/algorithms.md 0.2; sigma^2 / alpha = t^2 / (1 - t) in rectified flow), this is the
    f-distill gradient -h (s_p - s_q) up to positive per-sample scale. With weights = None (h~ = 1)
    it is exactly the DMD2 generator loss. The value of the first term is not a divergence; only its
    gradient matters. Flow models: x0 = ``flow.x0_from_velocity(x_t, v, t)`` for teacher (with CFG) and fake.

    Args:
        x: one-step generator samples G(z) [B, ...], carrying the generator's graph.
        x0_teacher: teacher denoised prediction at x_t [B, ...] (CFG applied; detached here).
        x0_fake: fake-score (online) denoised prediction at x_t [B, ...] (detached here).
        weights: h~ [B] from :func:`f_distill_weights`; None = 1 (reverse-KL / DMD2).
        fake_logits: discriminator logits on x_t [B] or [B, H], carrying the graph to x; needed if gan_weight > 0.
        gan_weight: lambda_GAN (1e-3 CIFAR-10 / SD1.5, 3e-3 ImageNet-64 in the paper).
        dmd_normalize: apply kappa (True in DMD2 and FastGen); False gives the raw VSD-style gradient.
        eps: added to the DMD denominator (as in DMD2).

    Returns:
        loss: [B].
        metrics: detached scalars "loss", "dm_loss", "gan_loss" (0 without logits), "dmd_scale" (mean kappa),
            "dm_grad_norm" (mean per-sample ||g||).

    Raises:
        ValueError: shapes differ, weights are not [B], or gan_weight > 0 without fake_logits.
    """
    fn = "fdistill_generator_loss"
    check_same_shape(fn, [("x", x), ("x0_teacher", x0_teacher), ("x0_fake", x0_fake)])
    check_batched(fn, "x", x, min_ndim=2)
    check_floating(fn, "x", x)
    check_positive(fn, "gan_weight", gan_weight, allow_zero=True)
    if gan_weight > 0 and fake_logits is None:
        raise ValueError(
            f"{fn}: gan_weight = {gan_weight} > 0 needs fake_logits (discriminator logits on x_t)"
        )
    xf = upcast(x)
    batch = xf.shape[0]
    x0_t = upcast(x0_teacher).detach().to(xf.dtype)
    x0_f = upcast(x0_fake).detach().to(xf.dtype)
    h = per_sample_weights(fn, weights, batch, xf)
    with torch.no_grad():
        if dmd_normalize:
            kappa = 1.0 / ((xf - x0_t).abs().reshape(batch, -1).mean(dim=1) + eps)  # [B]
        else:
            kappa = torch.ones(batch, dtype=xf.dtype, device=xf.device)
        scale = kappa if h is None else kappa * h.detach()
        g = flow.expand_t(scale, xf) * (x0_f - x0_t)  # [B, ...]
    dm = 0.5 * per_sample_mse(xf, (xf - g).detach())  # [B]
    gan = torch.zeros_like(dm)
    if fake_logits is not None:
        gan = gan_generator_loss(fake_logits).to(dm.dtype)
        if gan.shape[0] != batch:
            raise ValueError(f"{fn}: fake_logits must have batch size {batch}, got {list(fake_logits.shape)}")
    loss = dm + gan_weight * gan if gan_weight > 0 else dm
    metrics = {
        "loss": loss.detach().mean(),
        "dm_loss": dm.detach().mean(),
        "gan_loss": gan.detach().mean(),
        "dmd_scale": kappa.mean(),
        "dm_grad_norm": g.reshape(batch, -1).norm(dim=1).mean(),
    }
    return loss, metrics


def fake_score_loss(
    v_fake: Tensor, x0: Tensor, noise: Tensor, *, weights: Tensor | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Fake-score (online score) denoising loss in flow-velocity form (docs/algorithms.md 2.5).

        L_i = w_i mean_j (v_fake(x_t, t)_ij - sg(noise - x0)_ij)^2,   x_t = (1 - t) sg(x0) + t noise

    trained on fresh, detached student samples x0 = sg(G(z)); no time weighting by default (FastGen).
    The network is initialised from the teacher.

    Args:
        v_fake: the fake-score network's velocity at x_t [B, ...].
        x0: student samples [B, ...] (detached here).
        noise: the noise used to build x_t [B, ...].
        weights: optional per-sample weights [B].

    Returns:
        loss: [B].
        metrics: detached scalars "loss" and "mse".
    """
    fn = "fake_score_loss"
    check_same_shape(fn, [("v_fake", v_fake), ("x0", x0), ("noise", noise)])
    target = flow.velocity_target(upcast(x0).detach(), upcast(noise).detach())
    err = per_sample_mse(v_fake, target)
    w = per_sample_weights(fn, weights, err.shape[0], err)
    loss = err if w is None else w * err
    return loss, {"loss": loss.detach().mean(), "mse": err.detach().mean()}
