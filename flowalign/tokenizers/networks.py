"""The three networks of CDT (docs/algorithms.md 4.1): encoder, conditioning decoder, causal U-Net denoiser.

Shapes (video ``[B, 3, 1 + 4k, H, W]``, 4 stages with 8x space and 4x time compression)::

    Encoder            [B, 3, 1+4k, H, W]      -> moments [B, 2*16, 1+k, H/8, W/8]  (mean, log-variance)
    ConditionDecoder   z [B, 16, 1+k, H/8, W/8] -> pyramid, finest first: level i has the resolution of
                                                  encoder stage i's input (level 0 = [B, C_out, 1+4k, H, W])
    Denoiser           x_t [B, 3, 1+4k, H, W], t [B], pyramid -> x0 prediction [B, 3, 1+4k, H, W]

The denoiser's first levels down-sample exactly like the encoder stages, so pyramid level i has
the resolution of the denoiser's level-i input and is concatenated to it. Every layer is causal
(see :mod:`flowalign.tokenizers.layers`); each network takes an optional :class:`FeatureCache`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowalign.tokenizers.layers import (
    CausalConv3d,
    ChannelLayerNorm,
    FeatureCache,
    FrameLinearAttention,
    PadMode,
    ResBlock,
    SpatialDownsample,
    SpatialUpsample,
    TimeDownsample,
    TimeUpsample,
)

__all__ = ["ConditionDecoder", "Denoiser", "Encoder"]


class _EncoderStage(nn.Module):
    def __init__(
        self, c_in: int, c_out: int, *, space: bool, time: bool, first: bool, pad_mode: PadMode
    ) -> None:
        super().__init__()
        self.res = ResBlock(c_in, c_out, spatial_kernel=7 if first else 3, pad_mode=pad_mode)
        self.down = SpatialDownsample(c_out, c_out, pad_mode=pad_mode) if space else None
        self.time_down = TimeDownsample(c_out, pad_mode=pad_mode) if time else None

    def forward(self, x: Tensor, cache: FeatureCache | None) -> Tensor:
        x = self.res(x, cache=cache)
        if self.down is not None:
            x = self.down(x)
        if self.time_down is not None:
            x = self.time_down(x, cache)
        return x


class Encoder(nn.Module):
    """Causal 3-D conv encoder to the moments of a diagonal Gaussian posterior.

    Args:
        in_channels: 3 for RGB.
        channels: width of each stage (the released base uses 128 x (1, 2, 3, 4)).
        space_down, time_down: per stage, whether it halves H, W / the frame count.
        latent_channels: C_z of the latent.
        pad_mode: causal padding mode.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        channels: Sequence[int],
        space_down: Sequence[bool],
        time_down: Sequence[bool],
        latent_channels: int,
        pad_mode: PadMode,
    ) -> None:
        super().__init__()
        widths = [in_channels, *channels]
        self.stages = nn.ModuleList(
            _EncoderStage(
                widths[i],
                widths[i + 1],
                space=space_down[i],
                time=time_down[i],
                first=i == 0,
                pad_mode=pad_mode,
            )
            for i in range(len(channels))
        )
        c = channels[-1]
        self.head_proj = CausalConv3d(c, 2 * latent_channels, 1, pad_mode=pad_mode)
        self.head_res = ResBlock(c, c, pad_mode=pad_mode)
        self.head_out = CausalConv3d(c, 2 * latent_channels, 1, pad_mode=pad_mode)

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        """x [B, 3, T, H, W] in [-1, 1] -> moments [B, 2 C_z, T', H', W'] (mean first, then log-variance)."""
        for stage in self.stages:
            x = stage(x, cache)
        return self.head_proj(x) + self.head_out(self.head_res(x, cache=cache), cache)


class _DecoderStage(nn.Module):
    def __init__(self, c_in: int, c_out: int, *, space: bool, time: bool, pad_mode: PadMode) -> None:
        super().__init__()
        self.res = ResBlock(c_in, c_out, pad_mode=pad_mode)
        self.up = SpatialUpsample(c_out, c_out, pad_mode=pad_mode) if space else None
        self.time_up = TimeUpsample(c_out) if time else None

    def forward(self, x: Tensor, cache: FeatureCache | None) -> Tensor:
        x = self.res(x, cache=cache)
        if self.up is not None:
            x = self.up(x)
        if self.time_up is not None:
            x = self.time_up(x, cache)
        return x


class ConditionDecoder(nn.Module):
    """Maps a latent to the feature pyramid that conditions the denoiser (the encoder mirrored).

    Pyramid level i (finest first) has the resolution of encoder stage i's input; its channels are
    ``out_channels`` for level 0 and ``channels[i - 1]`` above (see :meth:`pyramid_channels`).
    """

    def __init__(
        self,
        *,
        latent_channels: int,
        channels: Sequence[int],
        space_down: Sequence[bool],
        time_down: Sequence[bool],
        out_channels: int,
        pad_mode: PadMode,
    ) -> None:
        super().__init__()
        c = channels[-1]
        self.in_proj = CausalConv3d(latent_channels, c, 1, pad_mode=pad_mode)
        self.in_res = ResBlock(c, c, pad_mode=pad_mode)
        levels = len(channels)
        self.stages = nn.ModuleList()
        for s in reversed(range(levels)):  # undo encoder stage s
            c_out = channels[s - 1] if s > 0 else out_channels
            self.stages.append(
                _DecoderStage(channels[s], c_out, space=space_down[s], time=time_down[s], pad_mode=pad_mode)
            )
        self._pyramid_channels = (out_channels, *channels[:-1])

    def pyramid_channels(self) -> tuple[int, ...]:
        """Channels of the pyramid levels, finest first."""
        return self._pyramid_channels

    def forward(self, z: Tensor, cache: FeatureCache | None = None) -> list[Tensor]:
        """z [B, C_z, T', H', W'] -> list of L feature maps, finest (level 0) first."""
        x = self.in_proj(z, cache)
        x = self.in_res(x, cache=cache)
        outs = []
        for stage in self.stages:
            x = stage(x, cache)
            outs.append(x)
        return outs[::-1]


class _UNetLevel(nn.Module):
    def __init__(
        self, c_in: int, c_out: int, *, time_dim: int | None, attention: bool, first: bool, pad_mode: PadMode
    ) -> None:
        super().__init__()
        self.res1 = ResBlock(
            c_in, c_out, time_dim=time_dim, spatial_kernel=7 if first else 3, pad_mode=pad_mode
        )
        self.res2 = ResBlock(c_out, c_out, time_dim=time_dim, pad_mode=pad_mode)
        self.attn = FrameLinearAttention(c_out) if attention else None

    def forward(self, x: Tensor, temb: Tensor | None, cache: FeatureCache | None) -> Tensor:
        x = self.res1(x, temb, cache)
        x = self.res2(x, temb, cache)
        return self.attn(x) if self.attn is not None else x


class Denoiser(nn.Module):
    """Causal 3-D U-Net predicting the clean video x0 from (x_t, t, condition pyramid).

    Level i: [concat pyramid level i if i < len(cond_channels)] -> 2 ResBlocks (+ time embedding)
    -> per-frame linear attention -> skip -> down-sample (space/time flags of level i). Then a
    middle block and the mirrored up path with skip concatenation, a final norm and a causal conv
    to ``out_channels``. With ``in_channels = 0`` and ``use_time = False`` it is a deterministic
    decoder of (almost) the same size: the KL-VAE baseline.

    Args:
        channels: width per level (released: 64 x (1, 2, 3, 4, 5, 6)).
        space_down, time_down: per level; the last level must not down-sample.
        cond_channels: pyramid channels for the first len(cond_channels) levels.
        attention: per level, whether it has an attention block (the middle block always has one).
        in_channels: channels of x_t (3), or 0 for the deterministic baseline.
        out_channels: 3.
        use_time: add the time embedding (MLP on the scalar t in [0, 1]).
        pad_mode: causal padding mode.
    """

    def __init__(
        self,
        *,
        channels: Sequence[int],
        space_down: Sequence[bool],
        time_down: Sequence[bool],
        cond_channels: Sequence[int],
        attention: Sequence[bool],
        in_channels: int = 3,
        out_channels: int = 3,
        use_time: bool = True,
        pad_mode: PadMode = "constant",
    ) -> None:
        super().__init__()
        levels = len(channels)
        if space_down[-1] or time_down[-1]:
            raise ValueError("the denoiser's last level must not down-sample")
        if len(cond_channels) > levels:
            raise ValueError(f"{len(cond_channels)} condition levels but only {levels} denoiser levels")
        self.in_channels = in_channels
        self.space_down, self.time_down = tuple(space_down), tuple(time_down)
        time_dim = 4 * channels[0] if use_time else None
        self.time_mlp = (
            nn.Sequential(nn.Linear(1, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
            if use_time
            else None
        )
        self.downs = nn.ModuleList()
        self.down_space = nn.ModuleList()
        self.down_time = nn.ModuleList()
        c_prev = in_channels
        for i, c in enumerate(channels):
            c_in = c_prev + (cond_channels[i] if i < len(cond_channels) else 0)
            self.downs.append(
                _UNetLevel(
                    c_in, c, time_dim=time_dim, attention=attention[i], first=i == 0, pad_mode=pad_mode
                )
            )
            self.down_space.append(
                SpatialDownsample(c, c, pad_mode=pad_mode) if space_down[i] else nn.Identity()
            )
            self.down_time.append(TimeDownsample(c, pad_mode=pad_mode) if time_down[i] else nn.Identity())
            c_prev = c
        self.mid1 = ResBlock(c_prev, c_prev, time_dim=time_dim, pad_mode=pad_mode)
        self.mid_attn = FrameLinearAttention(c_prev)
        self.mid2 = ResBlock(c_prev, c_prev, time_dim=time_dim, pad_mode=pad_mode)
        self.ups = nn.ModuleList()
        self.up_space = nn.ModuleList()
        self.up_time = nn.ModuleList()
        for i in reversed(range(levels)):
            self.ups.append(
                _UNetLevel(
                    c_prev + channels[i],
                    channels[i],
                    time_dim=time_dim,
                    attention=attention[i],
                    first=False,
                    pad_mode=pad_mode,
                )
            )
            c_prev = channels[i]
            has_up = i > 0 and space_down[i - 1]
            self.up_space.append(
                SpatialUpsample(c_prev, c_prev, pad_mode=pad_mode) if has_up else nn.Identity()
            )
            self.up_time.append(TimeUpsample(c_prev) if i > 0 and time_down[i - 1] else nn.Identity())
        self.out_norm = ChannelLayerNorm(channels[0])
        self.out_conv = CausalConv3d(channels[0], out_channels, 3, pad_mode=pad_mode)

    def forward(
        self, x_t: Tensor | None, t: Tensor | None, cond: Sequence[Tensor], cache: FeatureCache | None = None
    ) -> Tensor:
        """Predict x0.

        Args:
            x_t: noisy video [B, 3, T, H, W] (None when ``in_channels == 0``).
            t: [B] diffusion time in [0, 1] (index / num_train_timesteps); ignored without time input.
            cond: the pyramid from :class:`ConditionDecoder`, finest first.
            cache: feature cache for chunked inference.

        Returns:
            x0 prediction [B, out_channels, T, H, W].
        """
        temb = None
        if self.time_mlp is not None:
            if t is None:
                raise ValueError("the denoiser needs t")
            temb = self.time_mlp(t.reshape(-1, 1).to(self.time_mlp[0].weight.dtype))  # [B, 4 C_0]
        x = x_t if self.in_channels > 0 else None
        skips = []
        for i, level in enumerate(self.downs):
            if i < len(cond):
                x = (
                    cond[i] if x is None else torch.cat([x, cond[i].to(x.dtype)], dim=1)
                )  # [B, C + C_cond, T, H, W]
            x = level(x, temb, cache)
            skips.append(x)
            x = self.down_space[i](x)
            x = self.down_time[i](x, cache) if self.time_down[i] else x
        x = self.mid2(self.mid_attn(self.mid1(x, temb, cache)), temb, cache)
        for j, level in enumerate(self.ups):
            skip = skips.pop()
            if x.shape[-2:] != skip.shape[-2:]:  # odd sizes: 2 * ceil(H / 2) != H
                b, c, t_, h, w = x.shape
                frames = F.interpolate(
                    x.transpose(1, 2).reshape(b * t_, c, h, w).float(), size=skip.shape[-2:], mode="nearest"
                ).to(x.dtype)
                x = frames.reshape(b, t_, c, *skip.shape[-2:]).transpose(1, 2)  # [B, C, T, H_skip, W_skip]
            x = level(torch.cat([x, skip], dim=1), temb, cache)
            x = self.up_space[j](x)
            x = self.up_time[j](x, cache) if isinstance(self.up_time[j], TimeUpsample) else x
        return self.out_conv(F.silu(self.out_norm(x)), cache)
