"""Helpers of the tokenizer tests: tiny CDT configs with random weights and smooth random clips."""

from __future__ import annotations

import torch

from flowalign.tokenizers.cdt import CDTConfig, ConditionedDiffusionTokenizer


def tiny_config(layout: str = "small", **overrides) -> CDTConfig:
    """A ~140k-parameter CDT with the released small (space down at stages 1-3, replicate
    padding) or base (stages 2-4, zero padding) layout."""
    space = (True, True, True, False) if layout == "small" else (False, True, True, True)
    pad = "replicate" if layout == "small" else "constant"
    return CDTConfig.tiny(
        **{
            "encoder_channels": (4, 8, 8, 8),
            "unet_channels": (8, 8, 8, 8, 8),
            "space_down": space,
            "pad_mode": pad,
            "cond_out_channels": 3,
            **overrides,
        }
    )


def randomized(model: torch.nn.Module, *, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Add N(0, scale^2) noise to every parameter, so zero-initialised branches (which make new
    blocks identities) are active and equivalence tests cannot pass trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def make_model(layout: str = "small", *, seed: int = 0, **overrides) -> ConditionedDiffusionTokenizer:
    torch.manual_seed(seed)
    return randomized(
        ConditionedDiffusionTokenizer.from_cdt_config(tiny_config(layout, **overrides)), seed=seed
    ).eval()


def video(b: int = 1, t: int = 9, h: int = 16, w: int = 16, *, seed: int = 0) -> torch.Tensor:
    """A smooth random clip [B, 3, T, H, W] in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, t, h // 4, w // 4, generator=g)
    x = torch.nn.functional.interpolate(x, size=(t, h, w), mode="trilinear", align_corners=False)
    return x.tanh()
