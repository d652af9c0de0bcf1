"""HunyuanVideo 1.5 text-to-video behind the canonical FlowModel interface.

HunyuanVideo-1.5-only: a Qwen2.5-VL text encoder (a chat template whose system prefix is cropped,
padded tokens masked) and a ByT5 glyph encoder for quoted text (``embeds_2``/``mask_2``); a causal
3-D VAE with 16x spatial and 4x temporal compression, latents ``z = E(2x - 1) * scaling_factor``
``[B, C, (T - 1) / 4 + 1, H / 16, W / 16]``; the transformer takes the latents concatenated on
channels with condition latents and a condition mask (both zero for text-to-video, as
``HunyuanVideo15Pipeline`` passes them) and zero image tokens; timestep = t * 1000. The time grid
is ``linspace(1, 0, N + 1)[:-1]`` shifted by the scheduler's static ``shift``. Classifier-free
guidance is the pipeline's ``guider`` (its scale is the default ``guidance_scale``); a guider
that rescales or limits guidance to part of the trajectory is refused.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import HunyuanVideo15Pipeline
from torch import Tensor, nn

from flowalign.flow import t_to_timesteps
from flowalign.models.base import (
    PromptEmbeds,
    at_least_fp32,
    check_video_size,
    net_dtype,
    register_family,
)
from flowalign.models.media_first_video import MediaFirstVideoModel
from flowalign.models.schedules import scheduler_time_grid


@register_family("HunyuanVideo15Pipeline")
class HunyuanVideo15Model(MediaFirstVideoModel):
    """HunyuanVideo 1.5 adapter. x ``[B, C, T', H/16, W/16]``, t ``[B]`` -> velocity of the same shape."""

    family = "hunyuan_video15"
    pipeline_class = HunyuanVideo15Pipeline
    default_num_inference_steps = 50
    default_guidance_scale = 6.0
    default_height = 480
    default_width = 848

    def __init__(self, pipe: HunyuanVideo15Pipeline, *, compute_dtype: torch.dtype | None = None):
        super().__init__(pipe, compute_dtype=compute_dtype)
        guider = getattr(pipe, "guider", None)
        if guider is not None:
            cfg = guider.config
            unsupported = {
                "guidance_rescale": (cfg.get("guidance_rescale", 0.0), 0.0),
                "use_original_formulation": (cfg.get("use_original_formulation", False), False),
                "start": (cfg.get("start", 0.0), 0.0),
                "stop": (cfg.get("stop", 1.0), 1.0),
            }
            for key, (value, plain) in unsupported.items():
                if value != plain:
                    raise ValueError(
                        f"{self.family}: guider setting {key}={value} is not supported (plain CFG needs {plain})"
                    )
            self.default_guidance_scale = float(cfg.get("guidance_scale", self.default_guidance_scale))

    def encode_prompt(self, prompts, *, negative_prompts=None, with_uncond=False):
        def encode(texts: list[str]) -> PromptEmbeds:
            embeds, mask, embeds_2, mask_2 = self.pipe.encode_prompt(
                prompt=texts, device=self.device, batch_size=len(texts)
            )
            return PromptEmbeds(embeds=embeds, mask=mask, embeds_2=embeds_2, mask_2=mask_2)

        cond = encode(list(prompts))
        uncond = encode(list(negative_prompts or [""] * len(prompts))) if with_uncond else None
        return cond, uncond

    @property
    def temporal_factor(self) -> int:
        return self.pipe.vae_scale_factor_temporal

    @property
    def spatial_factor(self) -> int:
        return self.pipe.vae_scale_factor_spatial * self.transformer.config.patch_size

    def latent_shape(self, batch_size, height, width, num_frames=1):
        f = self.pipe.vae_scale_factor_spatial
        frames = (num_frames - 1) // self.temporal_factor + 1
        return (batch_size, self.pipe.num_channels_latents, frames, height // f, width // f)

    def check_size(self, height, width, num_frames=1):
        check_video_size(
            self.family,
            height,
            width,
            num_frames,
            multiple=self.spatial_factor,
            temporal=self.temporal_factor,
        )

    def encode_media(self, media: Tensor, *, generator=None) -> Tensor:
        vae = self.pipe.vae
        video = (media * 2 - 1).permute(0, 2, 1, 3, 4).to(vae.dtype)  # [B, T, 3, H, W] -> [B, 3, T, H, W]

        def encode_one(v: Tensor) -> Tensor:
            dist = vae.encode(v).latent_dist
            return dist.sample(generator) if generator is not None else dist.mode()

        # one video at a time, as in decode_latents
        z = at_least_fp32(torch.cat([encode_one(video[i : i + 1]) for i in range(len(video))]))
        return z * vae.config.scaling_factor

    def decode_latents(self, latents: Tensor) -> Tensor:
        vae = self.pipe.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor
        # One video at a time: the VAE's causal attention mask broadcasts wrongly for batches > 1
        # (diffusers 0.42, encoder and decoder); each video's pass is independent, so the result is the same.
        video = torch.cat([vae.decode(z[i : i + 1], return_dict=False)[0] for i in range(len(z))])
        video = at_least_fp32(video)  # [B, 3, T, H, W] in [-1, 1]
        return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)

    def time_grid(self, num_inference_steps, *, height, width, num_frames=1, device=None):
        """``linspace(1, 0, N + 1)[:-1]`` through the scheduler's shift, then 0 (as the pipeline sets it)."""
        sigmas = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]
        return scheduler_time_grid(
            self.sampling_scheduler(), num_inference_steps, sigmas=sigmas, device=device
        )

    def velocity(self, x, t, cond, *, guidance=None, net: nn.Module | None = None):
        net = net or self.transformer
        dtype = net_dtype(net)
        b, _, frames, h, w = x.shape
        hidden = torch.cat(
            [x.to(dtype), x.new_zeros((b, x.shape[1] + 1, frames, h, w), dtype=dtype)], dim=1
        )  # latents, zero condition latents, zero condition mask (text-to-video)
        image_embeds = x.new_zeros(
            (b, self.pipe.vision_num_semantic_tokens, self.pipe.vision_states_dim), dtype=dtype
        )
        out = net(
            hidden_states=hidden,
            # t * 1000 in the latents' dtype, as HunyuanVideo15Pipeline passes it
            timestep=t_to_timesteps(t.to(torch.promote_types(dtype, torch.float32))).to(dtype),
            encoder_hidden_states=cond.embeds.to(dtype),
            encoder_attention_mask=cond.mask.to(dtype),
            encoder_hidden_states_2=cond.embeds_2.to(dtype),
            encoder_attention_mask_2=cond.mask_2.to(dtype),
            image_embeds=image_embeds,
            return_dict=False,
        )[0]
        return out.to(x.dtype)
