"""LTX-2 text-to-video (the video stream) behind the canonical FlowModel interface.

LTX-2-only: a Gemma 3 text encoder whose hidden states of every layer are stacked and passed
through the text connectors (``LTX2TextConnectors``, learnable registers in place of padding); a
causal video VAE with 32x spatial and 8x temporal compression whose latents are normalised per
channel, ``z = (E(2x - 1) - mean) * scaling_factor / std``; the transformer reads the latents as a
token sequence ``[B, T' H' W', C]`` (patch 1); timestep = t * 1000; the time grid is
``linspace(1, 1/N, N)`` shifted by ``mu`` of the video token count (``use_dynamic_shifting``, with
the config's terminal stretch), as ``LTX2Pipeline`` sets it.

The audio stream is left out. LTX-2's transformer is joint: each block lets video attend to audio
(a2v) and audio to video (v2a). flowalign runs it with ``isolate_modalities=True`` (the pipeline's
own setting for its modality-isolation guidance branch), where the video prediction reads no
audio, and feeds the audio branch a one-token placeholder. So our video equals what
``LTX2Pipeline`` makes with modality isolation on, and differs from its default joint
audio-video sampling; LTX-2's extra guidance terms (spatio-temporal guidance, modality guidance,
x0-space guidance rescale) are not reproduced: classifier-free guidance is the plain one (which
equals the pipeline's x0-space CFG). Audio options (:data:`AUDIO_OPTIONS`) are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from diffusers import LTX2Pipeline
from torch import Tensor, nn

from flowalign.flow import flux_mu, t_to_timesteps
from flowalign.models.base import (
    PromptEmbeds,
    at_least_fp32,
    check_video_size,
    net_dtype,
    register_family,
)
from flowalign.models.media_first_video import MediaFirstVideoModel
from flowalign.models.schedules import scheduler_time_grid

AUDIO_OPTIONS = (
    "audio_latents",
    "audio_guidance_scale",
    "audio_stg_scale",
    "audio_modality_scale",
    "audio_guidance_rescale",
    "with_audio",
)
"""``LTX2Pipeline`` arguments of the audio stream, which flowalign leaves out."""


def refuse_audio_options(options: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first audio option in ``options`` (flowalign's LTX-2 is video only)."""
    given = [name for name in AUDIO_OPTIONS if name in options]
    if given:
        raise ValueError(
            f"ltx2: {given[0]} is an audio option; flowalign adapts LTX-2's video stream only "
            "(the audio stream is left out, see docs/families.md)"
        )


@register_family("LTX2Pipeline")
class LTX2Model(MediaFirstVideoModel):
    """LTX-2 video adapter. x ``[B, C, T', H/32, W/32]``, t ``[B]`` -> velocity of the same shape."""

    family = "ltx2"
    pipeline_class = LTX2Pipeline
    default_num_inference_steps = 30
    default_guidance_scale = 3.0
    default_height = 512
    default_width = 768
    optional_components = ("processor", "prompt_enhancer", "duration_head")
    max_sequence_length = 1024
    frame_rate = 24.0
    """Frames per second the transformer's positions are conditioned on (the pipeline's default)."""

    def encode_prompt(self, prompts, *, negative_prompts=None, with_uncond=False):
        def encode(texts: list[str]) -> PromptEmbeds:
            embeds, mask, _, _ = self.pipe.encode_prompt(
                prompt=texts,
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
                device=self.device,
            )
            padding_side = getattr(self.pipe.tokenizer, "padding_side", "left")
            video, _, video_mask = self.pipe.connectors(embeds, mask, padding_side=padding_side)
            return PromptEmbeds(embeds=video, mask=video_mask)

        cond = encode(list(prompts))
        uncond = encode(list(negative_prompts or [""] * len(prompts))) if with_uncond else None
        return cond, uncond

    @property
    def temporal_factor(self) -> int:
        return self.pipe.vae_temporal_compression_ratio

    @property
    def spatial_factor(self) -> int:
        return self.pipe.vae_spatial_compression_ratio * self.pipe.transformer_spatial_patch_size

    def latent_shape(self, batch_size, height, width, num_frames=1):
        f = self.pipe.vae_spatial_compression_ratio
        frames = (num_frames - 1) // self.temporal_factor + 1
        return (batch_size, self.transformer.config.in_channels, frames, height // f, width // f)

    def check_size(self, height, width, num_frames=1):
        check_video_size(
            self.family,
            height,
            width,
            num_frames,
            multiple=self.spatial_factor,
            temporal=self.temporal_factor,
        )

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor, float]:
        vae = self.pipe.vae
        shape = (1, -1, 1, 1, 1)
        mean = vae.latents_mean.view(shape).to(like.device, like.dtype)
        std = vae.latents_std.view(shape).to(like.device, like.dtype)
        return mean, std, vae.config.scaling_factor

    def encode_media(self, media: Tensor, *, generator=None) -> Tensor:
        vae = self.pipe.vae
        video = (media * 2 - 1).permute(0, 2, 1, 3, 4).to(vae.dtype)  # [B, T, 3, H, W] -> [B, 3, T, H, W]
        dist = vae.encode(video).latent_dist
        z = at_least_fp32(dist.sample(generator) if generator is not None else dist.mode())
        mean, std, scale = self._stats(z)
        return (z - mean) * scale / std

    def decode_latents(self, latents: Tensor) -> Tensor:
        vae = self.pipe.vae
        mean, std, scale = self._stats(latents)
        z = (latents * std / scale + mean).to(vae.dtype)  # as LTX2Pipeline denormalises
        # decode_timestep 0 and no decode noise, as the pipeline's defaults
        temb = (
            torch.zeros(len(z), device=z.device, dtype=z.dtype) if vae.config.timestep_conditioning else None
        )
        video = at_least_fp32(vae.decode(z, temb, return_dict=False)[0])  # [B, 3, T, H, W] in [-1, 1]
        return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)

    def time_grid(self, num_inference_steps, *, height, width, num_frames=1, device=None):
        """``linspace(1, 1/N, N)`` shifted by ``mu`` of the video token count, then 0 (as LTX2Pipeline)."""
        _, _, frames, h, w = self.latent_shape(1, height, width, num_frames)
        p, pt = self.pipe.transformer_spatial_patch_size, self.pipe.transformer_temporal_patch_size
        tokens = (frames // pt) * (h // p) * (w // p)
        cfg = self.pipe.scheduler.config
        mu = flux_mu(
            tokens,
            base_seq_len=cfg.get("base_image_seq_len", 1024),
            max_seq_len=cfg.get("max_image_seq_len", 4096),
            base_shift=cfg.get("base_shift", 0.95),
            max_shift=cfg.get("max_shift", 2.05),
        )
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        return scheduler_time_grid(
            self.sampling_scheduler(), num_inference_steps, mu=mu, sigmas=sigmas, device=device
        )

    def _pack(self, x: Tensor) -> Tensor:
        p, pt = self.pipe.transformer_spatial_patch_size, self.pipe.transformer_temporal_patch_size
        return self.pipe._pack_latents(x, p, pt)

    def _unpack(self, tokens: Tensor, frames: int, height: int, width: int) -> Tensor:
        p, pt = self.pipe.transformer_spatial_patch_size, self.pipe.transformer_temporal_patch_size
        return self.pipe._unpack_latents(tokens, frames // pt, height // p, width // p, p, pt)

    def velocity(self, x, t, cond, *, guidance=None, net: nn.Module | None = None):
        net = net or self.transformer
        dtype = net_dtype(net)
        b, _, frames, h, w = x.shape
        config = self.transformer.config
        timestep = t_to_timesteps(t.to(torch.promote_types(dtype, torch.float32)))  # fp32, as the pipeline
        # The audio branch runs on a one-token placeholder; isolated, the video never reads it.
        audio = x.new_zeros((b, 1, config.audio_in_channels), dtype=dtype)
        audio_text = x.new_zeros((b, 1, cond.embeds.shape[-1]), dtype=dtype)
        p, pt = self.pipe.transformer_spatial_patch_size, self.pipe.transformer_temporal_patch_size
        out = net(
            hidden_states=self._pack(x).to(dtype),
            audio_hidden_states=audio,
            encoder_hidden_states=cond.embeds.to(dtype),
            audio_encoder_hidden_states=audio_text,
            timestep=timestep,
            sigma=timestep,
            encoder_attention_mask=cond.mask,
            num_frames=frames // pt,
            height=h // p,
            width=w // p,
            fps=self.frame_rate,
            audio_num_frames=1,
            isolate_modalities=True,
            use_cross_timestep=True,
            return_dict=False,
        )[0]
        return self._unpack(out, frames, h, w).to(x.dtype)
