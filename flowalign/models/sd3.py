"""Stable Diffusion 3 / 3.5 behind the canonical FlowModel interface.

SD3-only: two CLIP encoders + optional T5 (prompt embeds concatenated, pooled from the CLIPs);
VAE latents z = (vae(x) - shift_factor) * scaling_factor; timestep = t * 1000; static time shift
from the scheduler config (3.0 for SD3-medium and SD3.5).
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusion3Pipeline
from torch import Tensor, nn

from flowalign.flow import t_to_timesteps
from flowalign.models.base import (
    FlowModel,
    PromptEmbeds,
    decode_with_image_vae,
    encode_with_image_vae,
    net_dtype,
    register_family,
)


@register_family("StableDiffusion3Pipeline")
class SD3Model(FlowModel):
    """SD3/SD3.5 adapter. x ``[B, 16, H/8, W/8]``, t ``[B]`` -> velocity of the same shape.

    Sampling defaults are FlowModel's: 28 steps at guidance 7.0.
    """

    family = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    optional_components = ("image_encoder", "feature_extractor")
    max_sequence_length = 256

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell times the transformer patch: sizes must be multiples of it."""
        return self.pipe.vae_scale_factor * self.pipe.patch_size

    def encode_prompt(self, prompts, *, negative_prompts=None, with_uncond=False):
        embeds, neg_embeds, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=with_uncond,
            negative_prompt=negative_prompts,
            max_sequence_length=self.max_sequence_length,
        )
        cond = PromptEmbeds(embeds=embeds, pooled=pooled)
        uncond = PromptEmbeds(embeds=neg_embeds, pooled=neg_pooled) if with_uncond else None
        return cond, uncond

    def latent_shape(self, batch_size, height, width, num_frames=1):
        f = self.pipe.vae_scale_factor
        return (batch_size, self.transformer.config.in_channels, height // f, width // f)

    def check_size(self, height, width, num_frames=1):
        m = self.spatial_factor
        most = (getattr(self.transformer.config, "pos_embed_max_size", None) or 0) * m  # its position table
        for name, value in (("height", height), ("width", width)):
            if value < m or value % m:
                raise ValueError(f"{name} must be a positive multiple of {m} for {self.family}, got {value}")
            if most and value > most:
                raise ValueError(f"{name} must be at most {most} for this {self.family} model, got {value}")
        if num_frames != 1:
            raise ValueError(f"{self.family} makes images: num_frames must be 1, got {num_frames}")

    def encode_media(self, media: Tensor, *, generator=None) -> Tensor:
        return encode_with_image_vae(self.pipe.vae, media, generator)

    def decode_latents(self, latents: Tensor) -> Tensor:
        return decode_with_image_vae(self.pipe.vae, latents)

    def velocity(self, x, t, cond, *, guidance=None, net: nn.Module | None = None):
        net = net or self.transformer
        dtype = net_dtype(net)
        out = net(
            hidden_states=x.to(dtype),
            # SD3 takes t * 1000, in fp32 at least (as StableDiffusion3Pipeline passes it)
            timestep=t_to_timesteps(t.to(torch.promote_types(dtype, torch.float32))),
            encoder_hidden_states=cond.embeds.to(dtype),
            pooled_projections=cond.pooled.to(dtype),
            return_dict=False,
        )[0]
        return out.to(x.dtype)
