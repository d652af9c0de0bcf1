"""CDT tokenizer loss: x0 regression of the diffusion decoder + KL of the posterior + LPIPS (docs/algorithms.md 4.2).

    L = w_mse * mean_j (x0_hat - x)_j^2
      + w_kl  * KL(q(z | x) || N(0, I)) / D_x
      + w_lpips * mean_frames LPIPS(x0_hat_f, x_f)

with x0_hat the denoiser's clean-video prediction from x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps,
D_x the number of video elements per sample, and videos in [-1, 1]. The paper names the three
terms but publishes no weights, time distribution or schedule (docs/algorithms.md 4.2).

Weights here (choices, not the paper's):
- ``mse_weight = 1``.
- ``kl_weight = 1e-6``: dividing the summed KL by D_x makes the weight mean what it means in the
  LDM / Stable Diffusion KL-VAE recipe, where the summed reconstruction loss and the summed KL are
  divided by the same batch size and the KL weight is 1e-6.
- ``lpips_weight = 0.1``: LPIPS is O(0.1-0.5) where the MSE in [-1, 1] is O(0.01); a weight of 1
  (the LDM recipe with an L1 loss) lets the perceptual term dominate a small model.

The KL-VAE baseline uses the same loss with x0_hat from a deterministic decoder.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from flowalign.objectives._common import (
    check_batched,
    check_floating,
    check_positive,
    check_same_shape,
    upcast,
)

__all__ = ["LpipsFn", "cdt_loss", "kl_diagonal_gaussian", "per_frame_lpips"]

LpipsFn = Callable[[Tensor, Tensor], Tensor]
"""(frames_a [N, 3, H, W], frames_b [N, 3, H, W]) in [-1, 1] -> distance [N] (or [N, 1, 1, 1])."""


def kl_diagonal_gaussian(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, diag(exp(logvar))) || N(0, I)) per sample, summed over the latent elements.

        KL = 1/2 sum_j (mean_j^2 + exp(logvar_j) - 1 - logvar_j)   (>= 0; = 0 iff mean = 0, logvar = 0)

    Args:
        mean: posterior mean [B, ...].
        logvar: posterior log-variance, same shape.

    Returns:
        [B] KL in nats (fp32, or fp64 for fp64 inputs).
    """
    fn = "kl_diagonal_gaussian"
    check_same_shape(fn, [("mean", mean), ("logvar", logvar)])
    check_batched(fn, "mean", mean)
    check_floating(fn, "mean", mean)
    check_floating(fn, "logvar", logvar)
    mean, logvar = upcast(mean), upcast(logvar)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.reshape(kl.shape[0], -1).sum(dim=1)


def per_frame_lpips(lpips_fn: LpipsFn, video_a: Tensor, video_b: Tensor) -> Tensor:
    """Mean over frames of ``lpips_fn`` on videos [B, 3, T, H, W] (or images [B, 3, H, W]) -> [B].

    The frames of all samples go through ``lpips_fn`` as one batch of B * T images.
    """
    check_same_shape("per_frame_lpips", [("video_a", video_a), ("video_b", video_b)])
    if video_a.ndim == 4:
        video_a, video_b = video_a[:, :, None], video_b[:, :, None]
    if video_a.ndim != 5:
        raise ValueError(
            f"per_frame_lpips: videos must be [B, 3, T, H, W] or [B, 3, H, W], got {list(video_a.shape)}"
        )
    b, c, t, h, w = video_a.shape
    frames_a = video_a.transpose(1, 2).reshape(b * t, c, h, w)  # [B*T, 3, H, W]
    frames_b = video_b.transpose(1, 2).reshape(b * t, c, h, w)
    dist = lpips_fn(frames_a, frames_b)
    if dist.numel() != b * t:
        raise ValueError(
            f"per_frame_lpips: lpips_fn must return one value per frame ({b * t}), got {list(dist.shape)}"
        )
    return upcast(dist.reshape(b, t)).mean(dim=1)


def cdt_loss(
    x0_pred: Tensor,
    x0: Tensor,
    mean: Tensor,
    logvar: Tensor,
    *,
    lpips_fn: LpipsFn | None = None,
    mse_weight: float = 1.0,
    kl_weight: float = 1e-6,
    lpips_weight: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-sample CDT loss (see the module docstring for the equation and the weights).

    Args:
        x0_pred: predicted clean video [B, 3, T, H, W] in about [-1, 1].
        x0: the clean video, same shape.
        mean, logvar: posterior moments [B, C_z, T', H', W'].
        lpips_fn: perceptual distance on frames in [-1, 1] (an ``lpips.LPIPS`` module works);
            needed when ``lpips_weight > 0``. Its parameters should be frozen by the caller.
        mse_weight, kl_weight, lpips_weight: term weights (>= 0).

    Returns:
        Loss [B] and detached batch means of each term: "mse", "kl" (nats per latent sample,
        unweighted), "kl_per_dim" (KL / D_x) and "lpips" (only when ``lpips_weight > 0``).
    """
    fn = "cdt_loss"
    check_same_shape(fn, [("x0_pred", x0_pred), ("x0", x0)])
    check_same_shape(fn, [("mean", mean), ("logvar", logvar)])
    check_batched(fn, "x0", x0, min_ndim=2)
    if mean.shape[0] != x0.shape[0]:
        raise ValueError(f"{fn}: mean has batch size {mean.shape[0]} but x0 has {x0.shape[0]}")
    for name, value in (("mse_weight", mse_weight), ("kl_weight", kl_weight), ("lpips_weight", lpips_weight)):
        check_positive(fn, name, value, allow_zero=True)
    if lpips_weight > 0 and lpips_fn is None:
        raise ValueError(f"{fn}: lpips_weight={lpips_weight} > 0 needs an lpips_fn")
    pred, target = upcast(x0_pred), upcast(x0)
    mse = (pred - target).pow(2).reshape(pred.shape[0], -1).mean(dim=1)  # [B]
    kl = kl_diagonal_gaussian(mean, logvar)
    kl_per_dim = kl / target[0].numel()
    loss = mse_weight * mse + kl_weight * kl_per_dim
    metrics = {"mse": mse.detach().mean(), "kl": kl.detach().mean(), "kl_per_dim": kl_per_dim.detach().mean()}
    if lpips_weight > 0:
        perceptual = per_frame_lpips(lpips_fn, pred, target).to(loss.dtype)
        loss = loss + lpips_weight * perceptual
        metrics["lpips"] = perceptual.detach().mean()
    return loss, metrics
