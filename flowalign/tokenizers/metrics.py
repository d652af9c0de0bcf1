"""Reconstruction metrics on tensors: PSNR, SSIM (Gaussian window) and LPIPS, per frame.

They follow the Open-Sora-Plan scripts the CDT release evaluates with (docs/algorithms.md 4.7): frames in
[0, 1]; PSNR = 10 log10(1 / MSE) per frame (100 dB when MSE < 1e-10); SSIM per channel with an
11 x 11 Gaussian window (sigma 1.5), C1 = (0.01 L)^2, C2 = (0.03 L)^2, averaged over the positions
where the window fits inside the frame (the scripts' ``filter2D(...)[5:-5, 5:-5]``) and over
channels; LPIPS on frames mapped to [-1, 1]. Video scores are means over frames.
"""

from __future__ import annotations

import copy
import os
import warnings
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LpipsUnavailable", "gaussian_window", "load_lpips", "psnr", "ssim", "video_metrics"]


def _check_pair(fn: str, a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{fn}: inputs must have the same shape, got {list(a.shape)} and {list(b.shape)}")
    if a.ndim != 4:
        raise ValueError(f"{fn}: inputs must be images [N, C, H, W], got {list(a.shape)}")


def psnr(a: Tensor, b: Tensor, *, data_range: float = 1.0, max_db: float = 100.0) -> Tensor:
    """Peak signal-to-noise ratio per image: 10 log10(L^2 / mean (a - b)^2), capped at ``max_db``.

    Args:
        a, b: images [N, C, H, W] with values in [0, L].
        data_range: L.
        max_db: value returned where the MSE is below 1e-10 (the Open-Sora-Plan convention).

    Returns:
        [N] float32 decibels.
    """
    _check_pair("psnr", a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(dim=1)
    out = 10 * torch.log10(data_range**2 / mse.clamp_min(1e-30))
    return torch.where(mse < 1e-10, torch.full_like(out, max_db), out).float()


@lru_cache(maxsize=8)
def _window_cpu(size: int, sigma: float) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    """Normalised 2-D Gaussian window [size, size] (float64), the outer product of a 1-D Gaussian."""
    return _window_cpu(int(size), float(sigma)).clone()


def ssim(
    a: Tensor,
    b: Tensor,
    *,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """Structural similarity per image (Wang et al. 2004) with a Gaussian window.

        SSIM = (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2)),

    with windowed means/variances/covariance, C1 = (k1 L)^2, C2 = (k2 L)^2, the map averaged over
    the valid positions (window inside the image) and then over channels. Computed in float64.

    Args:
        a, b: images [N, C, H, W] in [0, L], H and W >= ``window_size``.
        data_range: L.
        window_size, sigma: the Gaussian window.
        k1, k2: stabilising constants.

    Returns:
        [N] float32 in [-1, 1] (1 iff a == b).
    """
    _check_pair("ssim", a, b)
    n, c, h, w = a.shape
    if h < window_size or w < window_size:
        raise ValueError(f"ssim: images are {h}x{w}, smaller than the {window_size}x{window_size} window")
    win = gaussian_window(window_size, sigma).to(a.device)[None, None].expand(c, 1, -1, -1)  # [C, 1, k, k]
    a, b = a.double(), b.double()

    def filt(x: Tensor) -> Tensor:
        return F.conv2d(x, win, groups=c)  # [N, C, H - k + 1, W - k + 1], valid positions only

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a**2
    var_b = filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(2).mean(dim=2).mean(dim=1).float()


class LpipsUnavailable(FileNotFoundError):
    """The LPIPS backbone's ImageNet weights are not on this machine (the message says where they go).

    A missing file (an OSError), so the CLI reports it as one ``error:`` line.
    """


_BACKBONE_WEIGHTS = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}


def load_lpips(
    net: str = "alex",
    *,
    backbone_weights: str | os.PathLike[str] | None = None,
    random_backbone: bool = False,
    seed: int = 0,
    allow_download: bool = False,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """A frozen ``lpips.LPIPS`` module in eval mode: frames [N, 3, H, W] in [-1, 1] -> [N, 1, 1, 1].

    The linear heads ship with the ``lpips`` package. The backbone's ImageNet weights come from
    ``backbone_weights`` when given, else from torchvision's cache ``torch.hub.get_dir()/checkpoints``;
    without them (and without ``allow_download``) this raises :class:`LpipsUnavailable` instead of
    reaching the network.

    Args:
        net: "alex" (the metric everyone reports), "vgg" or "squeeze".
        backbone_weights: a local torchvision ``alexnet``/``vgg16``/``squeezenet1_1`` weights file
            (``.safetensors``, or a torch file read with ``weights_only=True``); only its ``features.*``
            entries are used. A file without them raises ``ValueError`` naming the file and the keys.
        random_backbone: use a randomly initialised backbone (seeded by ``seed``): for tests and the
            offline toy world only; its numbers are NOT comparable with published LPIPS.
        seed: seed of the random backbone.
        allow_download: let torchvision download the backbone weights if they are missing.
        device: where to put the module.
    """
    import torchvision

    if net not in _BACKBONE_WEIGHTS:
        raise ValueError(f"load_lpips: net must be one of {sorted(_BACKBONE_WEIGHTS)}, got {net!r}")
    if backbone_weights is not None:
        model = copy.deepcopy(_build_lpips(net, True, seed))
        _load_backbone(model, net, backbone_weights)
        return model.to(device)
    if not random_backbone and not allow_download:
        weights = getattr(torchvision.models, _BACKBONE_WEIGHTS[net]).IMAGENET1K_V1
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        if not os.path.isfile(path):
            raise LpipsUnavailable(
                f"LPIPS-{net} needs torchvision's ImageNet backbone weights at {path} (from {weights.url}); "
                "copy the file there, pass backbone_weights=<file> or allow_download=True, or use "
                "random_backbone=True for tests"
            )
    return copy.deepcopy(_build_lpips(net, random_backbone, seed)).to(device)


def _load_backbone(model: nn.Module, net: str, weights: str | os.PathLike[str]) -> None:
    """Copy torchvision's ``features.<i>`` tensors of ``weights`` into LPIPS' ``slice<k>.<i>`` layers."""
    from flowalign.rewards.backbones import load_state_dict_file

    state = load_state_dict_file(weights)
    mapped, missing = {}, []
    for name, _ in model.net.named_parameters():  # "slice2.3.weight" holds torchvision's "features.3.weight"
        key = "features." + name.split(".", 1)[1]
        if key in state:
            mapped[name] = state[key]
        else:
            missing.append(key)
    if missing:
        raise ValueError(
            f"{weights}: not torchvision {net} weights: missing {len(missing)} key(s), e.g. {missing[:3]}"
        )
    model.net.load_state_dict(mapped, strict=True)
    model.requires_grad_(False)


@lru_cache(maxsize=4)
def _build_lpips(net: str, random_backbone: bool, seed: int) -> nn.Module:
    """Built once per process: initialising AlexNet's unused classifier alone takes about a second."""
    import lpips

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*(pretrained|weights).*", category=UserWarning
        )  # lpips' old API
        torch.manual_seed(seed)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=random_backbone, verbose=False)
    return model.requires_grad_(False).eval()


def _frames(video: Tensor) -> Tensor:
    """[B, T, 3, H, W] or [B, 3, H, W] -> [B * T, 3, H, W]."""
    if video.ndim == 4:
        return video
    if video.ndim != 5:
        raise ValueError(
            f"video_metrics: media must be [B, T, 3, H, W] or [B, 3, H, W], got {list(video.shape)}"
        )
    return video.flatten(0, 1)


@torch.no_grad()
def video_metrics(
    reconstruction: Tensor, reference: Tensor, *, lpips_fn: nn.Module | None = None
) -> dict[str, Tensor]:
    """Per-sample PSNR, SSIM and (with ``lpips_fn``) LPIPS, each the mean over frames.

    Args:
        reconstruction, reference: media in [0, 1], [B, T, 3, H, W] videos or [B, 3, H, W] images.
        lpips_fn: e.g. :func:`load_lpips`; frames are mapped to [-1, 1] for it.

    Returns:
        {"psnr": [B], "ssim": [B], "lpips": [B] (if lpips_fn)} float32 on the inputs' device.
    """
    if reconstruction.shape != reference.shape:
        raise ValueError(
            f"video_metrics: shapes differ: {list(reconstruction.shape)} vs {list(reference.shape)}"
        )
    b = reconstruction.shape[0]
    rec, ref = _frames(reconstruction.float()), _frames(reference.float())
    out = {"psnr": psnr(rec, ref).view(b, -1).mean(1), "ssim": ssim(rec, ref).view(b, -1).mean(1)}
    if lpips_fn is not None:
        dev = next(iter(lpips_fn.parameters()), rec).device
        try:
            dist = lpips_fn(rec.to(dev) * 2 - 1, ref.to(dev) * 2 - 1).reshape(b, -1).mean(1)
        except RuntimeError as exc:  # AlexNet's pooling needs frames of at least 31 x 31
            raise ValueError(
                f"video_metrics: LPIPS failed on {rec.shape[-2]}x{rec.shape[-1]} frames ({exc})"
            ) from exc
        out["lpips"] = dist.float().to(rec.device)
    return out
