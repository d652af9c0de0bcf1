"""Training the CDT tokenizer (docs/algorithms.md 4.2) and its KL-VAE baseline on the shared loop.

Per micro-batch of clips x in [-1, 1] ([B, 3, 1 + 4k, H, W]):

    z      = mean + std * eps_z                     (reparameterised sample of q(z | x))
    i      ~ floor(T * u^(1 / p)),  u ~ U[0, 1)       (p = time_power; 1 = uniform DDPM indices)
    x_i    = sqrt(abar_i) x + sqrt(1 - abar_i) eps
    x0_hat = D(x_i, i / T, cond(z))                  (the "vae" decoder: D(cond(z)), no x_i, no i)
    L      = cdt_loss(x0_hat, x, mean, logvar; LPIPS frozen)

Encoder, conditioning decoder and denoiser train jointly from scratch; LPIPS is frozen. The
decoder kind is the model's ``decoder_type``, so the CDT and the baseline differ only there.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

import flowalign.toy  # noqa: F401  (registers the toy: data sources)
from flowalign.config import TrainConfig
from flowalign.data.batches import MediaBatch
from flowalign.data.items import VideoFolderDataset as VideoFolderDataset
from flowalign.data.sources import open_source
from flowalign.objectives.cdt import cdt_loss
from flowalign.tokenizers.cdt import CDTConfig, ConditionedDiffusionTokenizer
from flowalign.training.method import Method, StepContext

__all__ = ["CDTDataConfig", "CDTLossConfig", "CDTRunConfig", "CDTTraining", "VideoFolderDataset", "train_cdt"]


@dataclass(kw_only=True)
class CDTLossConfig:
    """Loss weights and noise draws of CDT training (the paper publishes none; see objectives/cdt.py)."""

    mse_weight: float = 1.0
    """Weight of the per-element MSE between the x0 prediction and the clip (in [-1, 1])."""
    kl_weight: float = 1e-6
    """Weight of KL(q(z|x) || N(0, I)) divided by the clip's element count (LDM KL-VAE convention)."""
    lpips_weight: float = 0.1
    """Weight of the per-frame LPIPS of the x0 prediction."""
    sample_latent: bool = True
    """Decode a reparameterised sample of q(z|x) (True) or its mean (False)."""
    time_power: float = 1.0
    """p in i = floor(T u^(1/p)): 1 = uniform DDPM indices; p > 1 favours the noisy end, where one-step
    decoding starts (p = 3 gave the better one-step CDT in the toy comparison, experiments/toy_cdt.py)."""

    def __post_init__(self) -> None:
        for key in ("mse_weight", "kl_weight", "lpips_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"CDTLossConfig.{key} must be >= 0, got {getattr(self, key)}")
        if self.time_power <= 0:
            raise ValueError(f"CDTLossConfig.time_power must be > 0, got {self.time_power}")


class CDTTraining(Method):
    """CDT (or, with ``decoder_type="vae"``, the KL-VAE baseline) as a :class:`Method`.

    Batches hold ``pixels`` ([B, T, 3, H, W] clips or [B, 3, H, W] images in [0, 1]) and ``index``.

    Args:
        model: the tokenizer to train (all of its parameters are trained).
        lpips_fn: frozen perceptual distance on frames in [-1, 1] (e.g.
            :func:`flowalign.tokenizers.metrics.load_lpips`); None needs ``lpips_weight = 0``.
        config: loss settings.
    """

    def __init__(
        self,
        model: ConditionedDiffusionTokenizer,
        *,
        lpips_fn: nn.Module | Callable[[Tensor, Tensor], Tensor] | None,
        config: CDTLossConfig | None = None,
    ) -> None:
        self.model = model
        self.config = config or CDTLossConfig()
        if self.config.lpips_weight > 0 and lpips_fn is None:
            raise ValueError(
                f"lpips_weight={self.config.lpips_weight} needs an lpips_fn (or set lpips_weight=0)"
            )
        self.lpips_fn = lpips_fn
        if isinstance(lpips_fn, nn.Module):
            lpips_fn.requires_grad_(False).eval()
        model.requires_grad_(True).train()

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"tokenizer": self.model}

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"lpips": self.lpips_fn} if isinstance(self.lpips_fn, nn.Module) else {}

    def collate(self, items: list[dict]) -> MediaBatch:
        """Clips (or images) with or without captions: the tokenizer reads pixels only."""
        return MediaBatch.collate(items, unconditional=True)

    def compute_loss(
        self, batch: MediaBatch, ctx: StepContext, group: str
    ) -> tuple[Tensor, dict[str, Tensor | float]]:
        batch = MediaBatch.coerce(batch, unconditional=True)
        if batch.pixels is None:
            raise ValueError("CDT training reads pixels; the batch has cached latents only")
        pixels, ids = batch.pixels, batch.index
        if pixels.ndim == 4:
            pixels = pixels[:, None]  # images are 1-frame clips
        x = (pixels.transpose(1, 2) * 2 - 1).contiguous()  # [B, 3, T, H, W] in [-1, 1]
        model, cfg = self.model, self.config
        latent_noise = None
        if cfg.sample_latent:
            latent_noise = ctx.randn(model.latent_shape(tuple(x.shape))[1:], ids, key="latent_noise").to(
                x.device
            )
        timesteps = noise = None
        if model.is_diffusion:
            num_t = model.config.num_train_timesteps
            u = ctx.rand((), ids, key="t").to(x.device)
            timesteps = (u.pow(1.0 / cfg.time_power) * num_t).long().clamp_(0, num_t - 1)  # [B]
            noise = ctx.randn_like(x, ids, key="noise")
        out = ctx.module("tokenizer")(x, timesteps=timesteps, noise=noise, latent_noise=latent_noise)
        loss, metrics = cdt_loss(
            out.x0_pred,
            x,
            out.mean,
            out.logvar,
            lpips_fn=self.lpips_fn,
            mse_weight=cfg.mse_weight,
            kl_weight=cfg.kl_weight,
            lpips_weight=cfg.lpips_weight,
        )
        metrics["latent_std"] = out.mean.detach().float().std()
        return loss.mean(), metrics


@dataclass(kw_only=True)
class CDTDataConfig:
    """Training clips."""

    source: str = "toy:video"
    """toy:video (the toy world's moving shapes) or a folder of video files."""
    num_frames: int = 9
    """Frames per clip (1 + 4k)."""
    size: int = 32
    """Frame side: the toy render size, or the centre crop of folder videos."""
    num: int = 4096
    """Number of toy clips (ignored for folders)."""
    seed: int = 0
    """Toy stream seed."""


@dataclass(kw_only=True)
class CDTRunConfig:
    """``flowalign train cdt``: model, loss, data and the loop's settings."""

    model: CDTConfig = field(default_factory=CDTConfig.toy)
    """Architecture (``model.decoder_type: vae`` trains the KL-VAE baseline)."""
    loss: CDTLossConfig = field(default_factory=CDTLossConfig)
    """Loss weights."""
    data: CDTDataConfig = field(default_factory=CDTDataConfig)
    """Training clips."""
    lpips: Literal["alex", "vgg", "squeeze", "alex-random", "none"] = "alex"
    """LPIPS backbone ("alex-random": random AlexNet, offline tests and the toy world only)."""
    init_from: Path | None = None
    """Start from a saved tokenizer folder instead of random weights (``model`` is then ignored)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir=Path("runs/cdt")))
    """The loop's settings."""


def build_dataset(cfg: CDTDataConfig) -> Dataset:
    """The clips of ``cfg`` (:func:`flowalign.data.sources.open_source`; ``num`` and ``seed`` are toy only)."""
    return open_source(
        cfg.source, "clips", num=cfg.num, seed=cfg.seed, size=cfg.size, num_frames=cfg.num_frames
    )


def train_cdt(cfg: CDTRunConfig, *, resume: bool | str | os.PathLike = False, progress: bool = True):
    """Build the tokenizer, LPIPS and clips of ``cfg`` and run :func:`flowalign.training.loop.train`.

    The exported model is ``<output_dir>/final/tokenizer`` (a ``from_pretrained`` folder).
    """
    from flowalign.tokenizers.metrics import load_lpips
    from flowalign.training.loop import train

    if cfg.init_from is not None:
        model = ConditionedDiffusionTokenizer.from_pretrained(cfg.init_from)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            model = ConditionedDiffusionTokenizer.from_cdt_config(cfg.model)
    lpips_fn = None
    if cfg.lpips != "none":
        random_backbone = cfg.lpips == "alex-random"
        lpips_fn = load_lpips("alex" if random_backbone else cfg.lpips, random_backbone=random_backbone)
    loss_cfg = cfg.loss
    if lpips_fn is None and loss_cfg.lpips_weight > 0:
        raise ValueError("lpips=none needs loss.lpips_weight=0")
    method = CDTTraining(model, lpips_fn=lpips_fn, config=loss_cfg)
    return train(method, build_dataset(cfg.data), cfg.train, resume=resume, progress=progress, run_config=cfg)
