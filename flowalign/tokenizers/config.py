"""Configuration of the CDT tokenizer: architecture, schedule and sampling, with released presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["CDTConfig"]


@dataclass(kw_only=True)
class CDTConfig:
    """Architecture and sampling settings of :class:`ConditionedDiffusionTokenizer` (defaults: CDT-base)."""

    in_channels: int = 3
    """Video channels."""
    latent_channels: int = 16
    """C_z, channels of the latent."""
    encoder_channels: tuple[int, ...] = (128, 256, 384, 512)
    """Width of each encoder stage (base: 128 x (1, 2, 3, 4); small: 64 x (1, 2, 3, 4))."""
    space_down: tuple[bool, ...] = (False, True, True, True)
    """Per encoder stage, halve H and W (base: stages 2-4; small: stages 1-3). 3 of them = 8x."""
    time_down: tuple[bool, ...] = (False, False, True, True)
    """Per encoder stage, halve the frame count causally (2 of them = 4x: 1 + 4k -> 1 + k)."""
    cond_out_channels: int = 16
    """Channels of the finest condition level (base 16, small 3)."""
    unet_channels: tuple[int, ...] = (64, 128, 192, 256, 320, 384)
    """Width per denoiser level; levels past the encoder stages down-sample space only, the last none."""
    unet_attention: tuple[bool, ...] | None = None
    """Per denoiser level, a per-frame linear attention block (None = every level)."""
    decoder_type: Literal["diffusion", "vae"] = "diffusion"
    """"diffusion" = CDT; "vae" = the deterministic baseline (same U-Net without x_t and t inputs)."""
    num_train_timesteps: int = 8192
    """T of the discrete cosine schedule."""
    cosine_s: float = 0.008
    """Offset s of the cosine schedule."""
    sample_gamma: float = 0.8
    """Scale of the initial noise at decoding (released code: 0.8)."""
    pad_mode: Literal["constant", "replicate"] = "constant"
    """Causal padding: zeros (base) or replicate (small)."""
    logvar_min: float = -30.0
    """Lower clamp of the posterior log-variance."""
    logvar_max: float = 20.0
    """Upper clamp of the posterior log-variance."""
    scaling_factor: float = 1.3
    """Latent scale for a downstream latent generator (released ``latent_scale``); not used inside."""

    def __post_init__(self) -> None:
        n = len(self.encoder_channels)
        for key in ("space_down", "time_down"):
            if len(getattr(self, key)) != n:
                raise ValueError(
                    f"CDTConfig.{key} has {len(getattr(self, key))} entries, expected {n} (one per stage)"
                )
        if len(self.unet_channels) < n:
            raise ValueError(
                f"CDTConfig.unet_channels needs >= {n} levels (one per encoder stage), got {self.unet_channels}"
            )
        if self.unet_attention is not None and len(self.unet_attention) != len(self.unet_channels):
            raise ValueError(
                f"CDTConfig.unet_attention needs {len(self.unet_channels)} entries, got {self.unet_attention}"
            )
        if self.decoder_type not in ("diffusion", "vae"):
            raise ValueError(
                f"CDTConfig.decoder_type must be 'diffusion' or 'vae', got {self.decoder_type!r}"
            )
        if self.num_train_timesteps < 2:
            raise ValueError(f"CDTConfig.num_train_timesteps must be >= 2, got {self.num_train_timesteps}")

    @classmethod
    def base(cls, **overrides) -> CDTConfig:
        """CDT-base of the released code (C_e = 128, space down at stages 2-4, zero padding)."""
        return cls(**overrides)

    @classmethod
    def small(cls, **overrides) -> CDTConfig:
        """CDT-small of the released code (C_e = 64, space down at stages 1-3, replicate padding)."""
        return cls(
            **{
                "encoder_channels": (64, 128, 192, 256),
                "space_down": (True, True, True, False),
                "cond_out_channels": 3,
                "pad_mode": "replicate",
                **overrides,
            }
        )

    @classmethod
    def toy(cls, **overrides) -> CDTConfig:
        """CPU size for the 32x32 toy world (~2.7 M parameters, ~0.25 s per 4-clip step on 2 cores)."""
        return cls(
            **{
                "encoder_channels": (16, 24, 32, 48),
                "space_down": (True, True, True, False),
                "cond_out_channels": 8,
                "unet_channels": (16, 24, 32, 48, 48),
                "unet_attention": (False, False, False, True, True),
                "latent_channels": 8,
                "num_train_timesteps": 1000,
                **overrides,
            }
        )

    @classmethod
    def tiny(cls, **overrides) -> CDTConfig:
        """Test size (a few thousand parameters, milliseconds per call)."""
        return cls(
            **{
                "encoder_channels": (8, 8, 16, 16),
                "space_down": (True, True, True, False),
                "cond_out_channels": 4,
                "unet_channels": (8, 8, 16, 16, 16),
                "latent_channels": 4,
                "num_train_timesteps": 1000,
                **overrides,
            }
        )
