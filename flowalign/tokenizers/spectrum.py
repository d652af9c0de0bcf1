"""Detail metrics on tensors: how much energy a reconstruction has at each spatial frequency.

PSNR, SSIM and LPIPS reward a reconstruction for being pixel-aligned with its reference; a decoder that
blurs fine texture scores well on PSNR while losing the detail. These compare spectra instead, which
do not care where the detail sits, only that it is there at the right scale.

Radial power spectrum of a frame x [C, H, W] (H = W = S), per channel, after removing the frame's mean:

    X = FFT2(x - mean(x)) / S                          (orthonormal: sum |X|^2 = sum (x - mean)^2)
    P(r) = mean over channels and over frequencies (ky, kx) with round(sqrt(kx^2 + ky^2)) = r of |X|^2

for integer radii r = 1 .. S / 2 (frequencies in cycles per frame, signed). Then, per frame,

    spectral distance = mean_r | log10(P_rec(r) + eps) - log10(P_ref(r) + eps) |      (decades)
    high-frequency ratio = sum_{r > S/4} P_rec(r) / sum_{r > S/4} P_ref(r)

and a clip's score is the mean over its frames. eps = 1e-8 (frames in [0, 1]) keeps the log finite on
flat frames; a textured 32 x 32 frame has P(r) >= 1e-5 at every radius.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["high_frequency_ratio", "radial_power_spectrum", "spectral_distance"]

EPS = 1e-8


def _frames(media: Tensor) -> tuple[Tensor, int]:
    if media.ndim == 4:
        return media, media.shape[0]
    if media.ndim != 5:
        raise ValueError(f"spectrum: media must be [B, T, C, H, W] or [B, C, H, W], got {list(media.shape)}")
    return media.flatten(0, 1), media.shape[0]


def radial_power_spectrum(frames: Tensor) -> Tensor:
    """P(r) of frames [N, C, S, S] for r = 1 .. S // 2 (module doc): float64 [N, S // 2]."""
    if frames.ndim != 4 or frames.shape[-1] != frames.shape[-2]:
        raise ValueError(
            f"radial_power_spectrum: frames must be square [N, C, S, S], got {list(frames.shape)}"
        )
    x = frames.double()
    size = x.shape[-1]
    power = torch.fft.fft2(x - x.mean(dim=(-2, -1), keepdim=True), norm="ortho").abs().pow(2).mean(dim=1)
    k = torch.fft.fftfreq(size, d=1.0 / size, dtype=torch.float64, device=x.device)  # cycles per frame
    radius = torch.sqrt(k[None, :] ** 2 + k[:, None] ** 2).round().long().flatten()  # [S * S]
    keep = (radius >= 1) & (radius <= size // 2)
    bins = (radius[keep] - 1).expand(x.shape[0], -1)
    sums = torch.zeros(x.shape[0], size // 2, dtype=torch.float64, device=x.device)
    sums.scatter_add_(1, bins, power.flatten(1)[:, keep])
    counts = torch.bincount(radius[keep] - 1, minlength=size // 2).double()
    return sums / counts


def _check(fn: str, rec: Tensor, ref: Tensor) -> None:
    if rec.shape != ref.shape:
        raise ValueError(f"{fn}: shapes differ: {list(rec.shape)} vs {list(ref.shape)}")


def spectral_distance(reconstruction: Tensor, reference: Tensor) -> Tensor:
    """Per-sample mean |log10 P_rec - log10 P_ref| over radii and frames (decades): [B] float32."""
    _check("spectral_distance", reconstruction, reference)
    rec, b = _frames(reconstruction)
    ref, _ = _frames(reference)
    diff = (radial_power_spectrum(rec) + EPS).log10() - (radial_power_spectrum(ref) + EPS).log10()
    return diff.abs().mean(dim=1).view(b, -1).mean(dim=1).float()


def high_frequency_ratio(reconstruction: Tensor, reference: Tensor) -> Tensor:
    """Per-sample energy above half the Nyquist radius, reconstruction over reference: [B] float32."""
    _check("high_frequency_ratio", reconstruction, reference)
    rec, b = _frames(reconstruction)
    ref, _ = _frames(reference)
    half = rec.shape[-1] // 4  # radii r > S / 4 are bins r - 1 >= S / 4
    top_rec = radial_power_spectrum(rec)[:, half:].sum(dim=1)
    top_ref = radial_power_spectrum(ref)[:, half:].sum(dim=1).clamp_min(EPS)
    return (top_rec / top_ref).view(b, -1).mean(dim=1).float()
