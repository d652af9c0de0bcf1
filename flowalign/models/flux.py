"""FLUX.1 behind the canonical FlowModel interface.

FLUX-only: CLIP (pooled) + T5 (tokens) text encoders and text position ids; 2x2 latent packing
with image position ids; timestep = t itself (the transformer multiplies by 1000 inside); a
resolution-dependent time shift; guidance-distilled checkpoints (FLUX.1-dev) take the guidance
scale as an input embedding instead of running two CFG passes.
"""

from __future__ import annotations

import torch
from diffusers import FluxPipeline
from torch import Tensor, nn

from flowalign.models.base import (
    FlowModel,
    PromptEmbeds,
    check_image_size,
    decode_with_image_vae,
    encode_with_image_vae,
    net_dtype,
    register_family,
)
from flowalign.models.schedules import flux_time_grid


def pack_2x2(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C] (FLUX's token layout)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # [B, H/2, W/2, C, 2, 2]
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_2x2(tokens: Tensor, *, height: int, width: int) -> Tensor:
    """[B, (H/2)(W/2), 4C] -> [B, C, H, W] with H, W the latent size."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(
        0, 3, 1, 4, 2, 5
    )  # [B, C, H/2, 2, W/2, 2]
    return x.reshape(b, c4 // 4, height, width)


def image_position_ids(height: int, width: int, *, device, dtype) -> Tensor:
    """[(H/2)(W/2), 3] ids (0, row, col) of the packed latent tokens."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


@register_family("FluxPipeline")
class FluxModel(FlowModel):
    """FLUX.1 adapter. x ``[B, 16, H/8, W/8]`` (unpacked), t ``[B]`` -> velocity of the same shape."""

    family = "flux"
    pipeline_class = FluxPipeline
    default_num_inference_steps = 28
    default_guidance_scale = 3.5
    optional_components = ("image_encoder", "feature_extractor")
    max_sequence_length = 512

    @property
    def uses_guidance_embedding(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    @property
    def guidance_scale_is_cfg(self) -> bool:
        # FluxPipeline feeds guidance_scale to the guidance embedding (FLUX.1-dev) and ignores it
        # without one (FLUX.1-schnell); two-pass CFG only through true_cfg_scale + a negative prompt.
        return False

    def encode_prompt(self, prompts, *, negative_prompts=None, with_uncond=False):
        def encode(texts: list[str]) -> PromptEmbeds:
            embeds, pooled, text_ids = self.pipe.encode_prompt(
                prompt=texts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
            )
            return PromptEmbeds(embeds=embeds, pooled=pooled, text_ids=text_ids)

        cond = encode(prompts)
        uncond = None
        if with_uncond:
            uncond = encode(negative_prompts if negative_prompts is not None else [""] * len(prompts))
        return cond, uncond

    def latent_shape(self, batch_size, height, width, num_frames=1):
        f = self.pipe.vae_scale_factor
        # packing needs even latent sizes (FluxPipeline.prepare_latents)
        return (
            batch_size,
            self.transformer.config.in_channels // 4,
            2 * (height // (f * 2)),
            2 * (width // (f * 2)),
        )

    def check_size(self, height, width, num_frames=1):
        check_image_size(self.family, height, width, num_frames, multiple=self.pipe.vae_scale_factor * 2)

    def time_grid(self, num_inference_steps, *, height, width, num_frames=1, device=None):
        _, _, h, w = self.latent_shape(1, height, width)
        return flux_time_grid(
            self.sampling_scheduler(), num_inference_steps, image_seq_len=(h // 2) * (w // 2), device=device
        )

    def encode_media(self, media: Tensor, *, generator=None) -> Tensor:
        return encode_with_image_vae(self.pipe.vae, media, generator)

    def decode_latents(self, latents: Tensor) -> Tensor:
        return decode_with_image_vae(self.pipe.vae, latents)

    def velocity(self, x, t, cond, *, guidance=None, net: nn.Module | None = None):
        net = net or self.transformer
        dtype = net_dtype(net)
        b, _, h, w = x.shape
        if self.uses_guidance_embedding:
            scale = 3.5 if guidance is None else guidance
            guidance_in = torch.as_tensor(scale, device=x.device, dtype=torch.float32).expand(b)
        else:
            guidance_in = None
        out = net(
            hidden_states=pack_2x2(x).to(dtype),  # [B, (H/2)(W/2), 4C]
            # not * 1000: the FLUX transformer scales inside (after casting t to its dtype, as
            # FluxPipeline does with its latents' dtype)
            timestep=t.to(dtype),
            guidance=guidance_in,
            pooled_projections=cond.pooled.to(dtype),
            encoder_hidden_states=cond.embeds.to(dtype),
            txt_ids=cond.text_ids,
            img_ids=image_position_ids(h, w, device=x.device, dtype=x.dtype),
            return_dict=False,
        )[0]
        return unpack_2x2(out, height=h, width=w).to(x.dtype)
