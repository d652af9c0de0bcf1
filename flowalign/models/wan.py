"""Wan 2.x text-to-video behind the canonical FlowModel interface.

Wan-only: UMT5 text encoder; 5-D latents [B, C, T', H/8, W/8] with T' = (T - 1) / 4 + 1; VAE
latents normalised per channel by ``latents_mean``/``latents_std``; timestep = t * 1000; CFG as
two passes in diffusers (here one batched pass, same result). flowalign samples Wan with its
flow Euler/Heun samplers on the shifted grid (``flow_shift`` of the scheduler config); the
multistep UniPC solver of the released configs is not reproduced. Wan 2.2's two-expert
(``transformer_2``) checkpoints are not supported yet.
"""

from __future__ import annotations

import torch
from diffusers import WanPipeline
from torch import Tensor, nn

from flowalign.flow import t_to_timesteps
from flowalign.models.base import FlowModel, PromptEmbeds, at_least_fp32, net_dtype, register_family


@register_family("WanPipeline")
class WanModel(FlowModel):
    """Wan adapter. x ``[B, C, T', H', W']``, t ``[B]`` -> velocity of the same shape."""

    family = "wan"
    pipeline_class = WanPipeline
    is_video = True
    default_num_inference_steps = 50
    default_guidance_scale = 5.0
    default_height = 480
    default_width = 832
    default_num_frames = 81
    optional_components = ("transformer_2",)
    fp32_components = ("vae",)  # as WanPipeline's model cards load it: the causal 3-D VAE stays fp32
    max_sequence_length = 512

    def encode_prompt(self, prompts, *, negative_prompts=None, with_uncond=False):
        embeds, neg_embeds = self.pipe.encode_prompt(
            prompt=prompts,
            negative_prompt=negative_prompts,
            do_classifier_free_guidance=with_uncond,
            max_sequence_length=self.max_sequence_length,
            device=self.device,
        )
        cond = PromptEmbeds(embeds=embeds)
        uncond = PromptEmbeds(embeds=neg_embeds) if with_uncond else None
        return cond, uncond

    @property
    def temporal_factor(self) -> int:
        return self.pipe.vae_scale_factor_temporal

    def latent_shape(self, batch_size, height, width, num_frames=1):
        f = self.pipe.vae_scale_factor_spatial
        frames = (num_frames - 1) // self.temporal_factor + 1
        return (batch_size, self.transformer.config.in_channels, frames, height // f, width // f)

    def check_size(self, height, width, num_frames=1):
        m = self.pipe.vae_scale_factor_spatial * self.transformer.config.patch_size[1]
        for name, value in (("height", height), ("width", width)):
            if value < m or value % m:
                raise ValueError(f"{name} must be a positive multiple of {m} for {self.family}, got {value}")
        k = self.temporal_factor
        if num_frames < 1 or (num_frames - 1) % k:
            raise ValueError(f"num_frames must be 1 + a multiple of {k} for {self.family}, got {num_frames}")

    def _latent_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.pipe.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(like.device, like.dtype)
        std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(like.device, like.dtype)
        return mean, std

    def encode_media(self, media: Tensor, *, generator=None) -> Tensor:
        vae = self.pipe.vae
        video = (media * 2 - 1).permute(0, 2, 1, 3, 4).to(vae.dtype)  # [B, T, 3, H, W] -> [B, 3, T, H, W]
        dist = vae.encode(video).latent_dist
        z = at_least_fp32(dist.sample(generator) if generator is not None else dist.mode())
        mean, std = self._latent_stats(z)
        return (z - mean) / std

    def decode_latents(self, latents: Tensor) -> Tensor:
        vae = self.pipe.vae
        mean, std = self._latent_stats(latents.to(vae.dtype))
        # same arithmetic as WanPipeline: latents / (1 / std) + mean
        z = latents.to(vae.dtype) / (1.0 / std) + mean
        video = at_least_fp32(vae.decode(z, return_dict=False)[0])  # [B, 3, T, H, W] in [-1, 1]
        return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)  # [B, T, 3, H, W]

    def velocity(self, x, t, cond, *, guidance=None, net: nn.Module | None = None):
        net = net or self.transformer
        dtype = net_dtype(net)
        out = net(
            hidden_states=x.to(dtype),
            # Wan takes t * 1000, in fp32 at least (as WanPipeline passes it)
            timestep=t_to_timesteps(t.to(torch.promote_types(dtype, torch.float32))),
            encoder_hidden_states=cond.embeds.to(dtype),
            return_dict=False,
        )[0]
        return out.to(x.dtype)
