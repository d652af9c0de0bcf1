"""Causal 3-D building blocks of the CDT tokenizer and the feature cache that makes them chunkable.

Every layer maps ``[B, C, T, H, W]`` to ``[B, C', T', H', W']`` and looks only at the current and
past frames, so a video can be processed in temporal chunks. The state a layer needs from the
previous chunk lives in a :class:`FeatureCache` passed through ``forward`` (the model itself keeps
no state): a causal conv with time kernel k keeps the last k - 1 input frames, the temporal
down-sampler the last frame, the temporal up-sampler only whether it has seen a chunk.
``cache=None`` means "a fresh cache", so a single pass over the whole clip and the first chunk
of a chunked pass behave identically (docs/algorithms.md 4.4).

Normalisation is a per-position channel LayerNorm and attention is per frame: nothing pools over
time, which would break causality and chunking.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CausalConv3d",
    "ChannelLayerNorm",
    "FeatureCache",
    "FrameLinearAttention",
    "ResBlock",
    "SpatialDownsample",
    "SpatialUpsample",
    "TimeDownsample",
    "TimeUpsample",
]

PadMode = Literal["constant", "replicate"]
_INT32_MAX = 2**31 - 1


class FeatureCache:
    """Temporal state of the causal layers while one video is processed chunk by chunk.

    Keys are the layer modules themselves, so one cache serves a whole model; use a fresh cache
    per video (and per network: the encoder, the conditioning decoder and the denoiser each get
    their own in :mod:`flowalign.tokenizers.cdt`). Memory is bounded by (number of causal layers)
    x (at most 2 frames of their input), independent of the video length.
    """

    def __init__(self) -> None:
        self._tails: dict[nn.Module, Tensor] = {}
        self._seen: set[nn.Module] = set()

    def tail(self, layer: nn.Module) -> Tensor | None:
        """The frames ``layer`` kept from the previous chunk, or None before its first chunk."""
        return self._tails.get(layer)

    def set_tail(self, layer: nn.Module, frames: Tensor) -> None:
        """Keep ``frames`` ([B, C, k, H, W], copied) for ``layer``'s next chunk."""
        self._tails[layer] = frames.detach().clone()

    def first_call(self, layer: nn.Module) -> bool:
        """True the first time ``layer`` asks (i.e. on the first chunk), False afterwards."""
        if layer in self._seen:
            return False
        self._seen.add(layer)
        return True

    def num_bytes(self) -> int:
        """Bytes held by the cached frames."""
        return sum(t.numel() * t.element_size() for t in self._tails.values())

    def __len__(self) -> int:
        return len(self._tails)


def _pad_and_cache(
    x: Tensor, layer: nn.Module, cache: FeatureCache | None, *, history: int
) -> tuple[Tensor, int]:
    """Prepend the cached ``history`` frames of ``layer`` to x; return (x, frames still to pad)."""
    if history == 0:
        return x, 0
    prev = cache.tail(layer) if cache is not None else None
    if prev is not None:
        x = torch.cat([prev.to(dtype=x.dtype, device=x.device), x], dim=2)  # [B, C, k + T, H, W]
    if cache is not None:
        cache.set_tail(layer, x[:, :, -history:])
    return x, history - (prev.shape[2] if prev is not None else 0)


class CausalConv3d(nn.Conv3d):
    """3-D convolution padded only on the past side in time (and symmetrically in space).

    Output frame j depends on input frames j - k_t + 1 .. j. With a cache, the missing past comes
    from the previous chunk instead of padding, which makes chunked and single-pass outputs equal.

    Args:
        in_channels, out_channels: channel counts.
        kernel_size: (k_t, k_h, k_w) or an int for all three (spatial kernels odd).
        spatial_stride: stride in H and W (time stride is always 1).
        pad_mode: "constant" (zeros) or "replicate", used for the time and space padding.
        bias: add a bias.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        *,
        spatial_stride: int = 1,
        pad_mode: PadMode = "constant",
        bias: bool = True,
    ) -> None:
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"CausalConv3d needs odd spatial kernels, got {(kt, kh, kw)}")
        if pad_mode not in ("constant", "replicate"):
            raise ValueError(f"pad_mode must be 'constant' or 'replicate', got {pad_mode!r}")
        super().__init__(
            in_channels, out_channels, (kt, kh, kw), stride=(1, spatial_stride, spatial_stride), bias=bias
        )
        self.time_history = kt - 1
        self.pad_mode = pad_mode
        self._space_pad = (kw // 2, kw // 2, kh // 2, kh // 2)

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:  # noqa: D102
        x, pad_t = _pad_and_cache(x, self, cache, history=self.time_history)
        x = F.pad(x, (*self._space_pad, pad_t, 0), mode=self.pad_mode)  # [B, C, T + k_t - 1, H + 2p, W + 2p]
        if x.numel() <= _INT32_MAX:
            return super().forward(x)
        # Kernels index with int32 beyond 2^31 elements: convolve window by window (docs/algorithms.md 4.5).
        kt = self.kernel_size[0]
        return torch.cat(
            [super(CausalConv3d, self).forward(x[:, :, j : j + kt]) for j in range(x.shape[2] - kt + 1)], 2
        )


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of ``[B, C, T, H, W]`` at every position (computed in fp32)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        # channels-last layer_norm: ~3x faster on CPU than a strided reduction over dim 1
        h = F.layer_norm(
            x.movedim(1, -1).float(), (x.shape[1],), self.weight.float(), self.bias.float(), self.eps
        )
        return h.to(x.dtype).movedim(-1, 1)


class ResBlock(nn.Module):
    """Pre-activation residual block of two causal convs, with an optional additive time embedding.

    h = conv1(silu(norm1(x))) [+ W silu(temb)];  out = skip(x) + conv2(silu(norm2(h))).
    conv2 starts at zero, so a new block is the identity (or the 1x1 skip). Supports diffusers'
    gradient checkpointing (recompute in the backward pass) on cache-free training passes.

    Args:
        in_channels, out_channels: channel counts.
        time_dim: width of the time embedding (None = no time input).
        spatial_kernel: spatial kernel of conv1 (7 on the first block, as in the released code).
        pad_mode: causal padding mode.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        time_dim: int | None = None,
        spatial_kernel: int = 3,
        pad_mode: PadMode = "constant",
    ) -> None:
        super().__init__()
        self.norm1 = ChannelLayerNorm(in_channels)
        self.conv1 = CausalConv3d(
            in_channels, out_channels, (3, spatial_kernel, spatial_kernel), pad_mode=pad_mode
        )
        self.time_proj = nn.Linear(time_dim, out_channels) if time_dim is not None else None
        self.norm2 = ChannelLayerNorm(out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, pad_mode=pad_mode)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = (
            CausalConv3d(in_channels, out_channels, 1, pad_mode=pad_mode)
            if in_channels != out_channels
            else None
        )
        # set by diffusers' ModelMixin.enable_gradient_checkpointing (training passes only, no cache)
        self.gradient_checkpointing = False

    def forward(self, x: Tensor, temb: Tensor | None = None, cache: FeatureCache | None = None) -> Tensor:  # noqa: D102
        if self.gradient_checkpointing and torch.is_grad_enabled() and cache is None:
            return self._gradient_checkpointing_func(self._forward, x, temb)
        return self._forward(x, temb, cache)

    def _forward(self, x: Tensor, temb: Tensor | None, cache: FeatureCache | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)
        if self.time_proj is not None:
            if temb is None:
                raise ValueError("this ResBlock has a time input but no time embedding was given")
            h = h + self.time_proj(F.silu(temb)).to(h.dtype)[:, :, None, None, None]
        h = self.conv2(F.silu(self.norm2(h)), cache)
        return (x if self.skip is None else self.skip(x)) + h


class FrameLinearAttention(nn.Module):
    """Pre-norm residual linear attention over the H*W positions of each frame separately.

    q is softmax-normalised over channels and k over positions (Shen et al., efficient attention),
    so the cost is linear in H*W. The output projection starts at zero (the block starts as identity).
    """

    def __init__(self, channels: int, *, heads: int = 1) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels {channels} not divisible by heads {heads}")
        self.heads = heads
        self.norm = ChannelLayerNorm(channels)
        self.to_qkv = nn.Conv3d(channels, 3 * channels, 1, bias=False)
        self.to_out = nn.Conv3d(channels, channels, 1)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        b, c, t, h, w = x.shape
        qkv = self.to_qkv(self.norm(x))  # [B, 3C, T, H, W]
        qkv = qkv.permute(0, 2, 1, 3, 4).reshape(
            b * t, 3, self.heads, c // self.heads, h * w
        )  # [BT, 3, h, d, N]
        q, k, v = qkv.float().unbind(1)  # [BT, heads, d, N] each
        q = q.softmax(dim=-2) * (c // self.heads) ** -0.5
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)  # [BT, heads, d, d]
        out = torch.einsum("bhde,bhdn->bhen", context, q).to(x.dtype)  # [BT, heads, d, N]
        out = out.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)  # [B, C, T, H, W]
        return x + self.to_out(out)


class SpatialDownsample(nn.Module):
    """Halve H and W with a strided (1, 3, 3) conv (per frame, so no temporal state)."""

    def __init__(self, in_channels: int, out_channels: int, *, pad_mode: PadMode = "constant") -> None:
        super().__init__()
        self.conv = CausalConv3d(in_channels, out_channels, (1, 3, 3), spatial_stride=2, pad_mode=pad_mode)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.conv(x)


class SpatialUpsample(nn.Module):
    """Double H and W: nearest-neighbour resize then a (1, 3, 3) conv (per frame)."""

    def __init__(self, in_channels: int, out_channels: int, *, pad_mode: PadMode = "constant") -> None:
        super().__init__()
        self.conv = CausalConv3d(in_channels, out_channels, (1, 3, 3), pad_mode=pad_mode)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # [BT, C, H, W]
        frames = F.interpolate(frames.float(), scale_factor=2.0, mode="nearest").to(x.dtype)
        x = frames.reshape(b, t, c, 2 * h, 2 * w).permute(0, 2, 1, 3, 4)  # [B, C, T, 2H, 2W]
        return self.conv(x)


class TimeDownsample(nn.Module):
    """Halve the frame count causally: output j = conv over input frames 2j - 2, 2j - 1, 2j.

    1 + 2m frames give 1 + m frames (the first frame stays alone). Initialised to the mean of
    frames 2j - 1 and 2j. Chunked use needs a first chunk of odd length and even chunks after it
    (the tokenizer checks this); the cache then holds exactly the last input frame.
    """

    def __init__(self, channels: int, *, pad_mode: PadMode = "constant") -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, (3, 1, 1), stride=(2, 1, 1))
        self.pad_mode = pad_mode
        with torch.no_grad():
            self.conv.weight.zero_()
            eye = torch.eye(channels)
            self.conv.weight[:, :, 1, 0, 0] = 0.5 * eye
            self.conv.weight[:, :, 2, 0, 0] = 0.5 * eye
            self.conv.bias.zero_()

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:  # noqa: D102
        prev = cache.tail(self) if cache is not None else None
        if prev is not None:
            x = torch.cat([prev.to(dtype=x.dtype, device=x.device), x], dim=2)  # [B, C, 1 + T, H, W]
        else:
            x = F.pad(x, (0, 0, 0, 0, 2, 0), mode=self.pad_mode)  # [B, C, 2 + T, H, W]
        if cache is not None:
            cache.set_tail(self, x[:, :, -1:])
        return self.conv(x)


class TimeUpsample(nn.Module):
    """Double the frame count: each frame becomes two (a 1x1x1 conv to 2C channels, interleaved).

    On the first chunk (or a single pass) the first output frame is dropped, so 1 + m frames give
    1 + 2m, mirroring :class:`TimeDownsample`. Initialised to repeat each frame.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, 2 * channels, 1)
        with torch.no_grad():
            weight = torch.zeros(2 * channels, channels)
            weight[0::2] = torch.eye(channels)
            weight[1::2] = torch.eye(channels)
            self.conv.weight.copy_(weight[:, :, None, None, None])
            self.conv.bias.zero_()

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:  # noqa: D102
        b, c, t, h, w = x.shape
        y = (
            self.conv(x).reshape(b, c, 2, t, h, w).transpose(2, 3).reshape(b, c, 2 * t, h, w)
        )  # [B, C, 2T, H, W]
        first = cache.first_call(self) if cache is not None else True
        return y[:, :, 1:] if first else y
