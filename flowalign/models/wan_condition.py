"""Condition images of Wan's image-to-video models, prepared the way diffusers' Wan pipelines do.

A condition image enters at the port as a PIL image or a float ``[3, H, W]`` tensor in [0, 1]
(turned into an 8-bit PIL image, exact for media read from 8-bit files). Per image:

- it is resized to the target size and scaled to [-1, 1] by the pipeline's video processor;
- Wan 2.1 / 2.2 I2V (channel concat): the clip ``[image, 0, ..., 0]`` of ``num_frames`` frames is
  encoded by the VAE (distribution mode), normalised z = (z - mean) / std, and preceded on the
  channel axis by the first-frame mask m (1 on the first latent frame's ``vae_scale_factor_temporal``
  mask channels, 0 elsewhere): the transformer reads ``concat([x_t, m, z], channels)``;
- Wan 2.2 TI2V-5B (first-frame pinning): only the image is encoded, ``[B, C, 1, H', W']``; the
  transformer reads ``(1 - M) z + M x_t`` with M = 0 on the first latent frame, and the first
  frame's tokens take timestep 0;
- Wan 2.1 I2V also reads CLIP image tokens: the penultimate hidden states of its image encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import PIL.Image
import torch
from torch import Tensor

from flowalign.models.base import at_least_fp32


def as_pil(image: Any, *, where: str = "condition image") -> PIL.Image.Image:
    """A PIL RGB image from a PIL image or a float ``[3, H, W]`` tensor in [0, 1]."""
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    if isinstance(image, Tensor) and image.ndim == 3 and image.shape[0] == 3 and image.is_floating_point():
        pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        return PIL.Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())
    shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
    raise ValueError(f"{where} must be a PIL image or a float [3, H, W] tensor in [0, 1], got {shape}")


def check_images(images: Sequence[Any], count: int) -> list[PIL.Image.Image]:
    """One PIL image per prompt (errors name the position)."""
    images = list(images)
    if len(images) != count:
        raise ValueError(f"got {len(images)} condition images for {count} prompts")
    return [as_pil(image, where=f"condition image {i}") for i, image in enumerate(images)]


def _latent_stats(vae, like: Tensor) -> tuple[Tensor, Tensor]:
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(like.device, like.dtype)
    std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(like.device, like.dtype)
    return mean, std


@torch.no_grad()
def condition_latents(
    pipe, images: list[PIL.Image.Image], *, height: int, width: int, num_frames: int, whole_clip: bool
) -> Tensor:
    """Normalised VAE latents of each image: of the zero-padded clip (``whole_clip``, ``[B, C, T', H', W']``)
    or of the image alone (``[B, C, 1, H', W']``); fp32."""
    vae = pipe.vae
    device = vae.device
    out = []
    for image in images:  # one by one, as the pipeline encodes its one image
        pixels = pipe.video_processor.preprocess(image, height=height, width=width).to(device, torch.float32)
        clip = pixels.unsqueeze(2)  # [1, 3, 1, H, W]
        if whole_clip:
            clip = torch.cat([clip, clip.new_zeros(1, 3, num_frames - 1, height, width)], dim=2)
        z = at_least_fp32(vae.encode(clip.to(vae.dtype)).latent_dist.mode()).float()
        mean, std = _latent_stats(vae, z)
        out.append((z - mean) * (1.0 / std))
    return torch.cat(out)


def first_frame_mask(batch: int, temporal_factor: int, latent: Tensor) -> Tensor:
    """The I2V mask channels ``[B, temporal_factor, T', H', W']``: 1 on the first latent frame, else 0."""
    _, _, frames, h, w = latent.shape
    mask = latent.new_zeros(batch, temporal_factor, frames, h, w)
    mask[:, :, 0] = 1.0
    return mask


@torch.no_grad()
def clip_image_tokens(pipe, images: list[PIL.Image.Image]) -> Tensor:
    """Penultimate hidden states of the pipeline's CLIP vision encoder ``[B, L, D]`` (Wan 2.1 I2V)."""
    encoder = pipe.image_encoder
    inputs = pipe.image_processor(images=images, return_tensors="pt").to(encoder.device)
    return encoder(**inputs, output_hidden_states=True).hidden_states[-2]
