"""FLUX.2 [dev] and FLUX.2 [klein] behind the canonical FlowModel interface.

FLUX.2-only: the diffusion state is the VAE latent patchified 2x2 into channels
(``[B, 4C, H/16, W/16]``) and normalised by the VAE's latent batch-norm statistics
(``(z - running_mean) / sqrt(running_var + eps)``); that state is the canonical latent here,
so noise, velocities and rewards live where the transformer works. Tokens are its pixels in
row-major order with 4-axis position ids (t, h, w, l); text position ids are (0, 0, 0, l).
The transformer takes t itself (it multiplies by 1000 inside). The time grid is
``linspace(1, 1/N, N)`` shifted by an empirical mu that depends on the token count and on N.

- [dev] (``Flux2Pipeline``, Mistral 3 text encoder) is guidance-distilled: the guidance scale
  is an input embedding, there is no CFG pass.
- [klein] (``Flux2KleinPipeline``, Qwen3 text encoder): the base checkpoints use true CFG with
  an empty negative prompt; the step-distilled ones (``is_distilled``) use neither.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from torch import Tensor, nn

from flowalign.flow import t_to_timesteps
from flowalign.models.base import (
    FlowModel,
    PromptEmbeds,
    at_least_fp32,
    check_image_size,
    net_dtype,
    register_family,
)
from flowalign.models.schedules import scheduler_time_grid


def flux2_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's empirical time shift: linear in the token count, interpolated in the step count.

    mu = a(N) + ... fitted at N = 10 and N = 200 steps; above 4300 tokens only the 200-step line.
    """
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    m_200 = a2 * image_seq_len + b2
    if image_seq_len > 4300:
        return float(m_200)
    m_10 = a1 * image_seq_len + b1
    slope = (m_200 - m_10) / 190.0
    return float(slope * num_steps + m_200 - 200.0 * slope)


def patchify_2x2(z: Tensor) -> Tensor:
    """VAE latents [B, C, H, W] -> [B, 4C, H/2, W/2] (channel-major, then the 2x2 offsets)."""
    b, c, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return z.reshape(b, c * 4, h // 2, w // 2)


def unpatchify_2x2(x: Tensor) -> Tensor:
    """The inverse of :func:`patchify_2x2`."""
    b, c4, h, w = x.shape
    x = x.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, h * 2, w * 2)


def latent_position_ids(height: int, width: int, *, device) -> Tensor:
    """[H W, 4] ids (0, row, col, 0) of the latent tokens in row-major order."""
    one = torch.arange(1)
    return torch.cartesian_prod(one, torch.arange(height), torch.arange(width), one).to(device)


class _Flux2Base(FlowModel):
    """Shared FLUX.2 adapter. x ``[B, 4C, H/16, W/16]``, t ``[B]`` -> velocity of the same shape."""

    default_num_inference_steps = 50
    default_guidance_scale = 4.0
    max_sequence_length = 512
    text_encoder_out_layers: tuple[int, ...] = ()

    def encode_prompt(self, prompts, *, negative_prompts=None, with_uncond=False):
        def encode(texts: list[str]) -> PromptEmbeds:
            embeds, text_ids = self.pipe.encode_prompt(
                prompt=list(texts),
                device=self.device,
                max_sequence_length=self.max_sequence_length,
                text_encoder_out_layers=self.text_encoder_out_layers,
            )
            return PromptEmbeds(embeds=embeds, text_ids=text_ids[0])  # ids are the same for every row

        cond = encode(prompts)
        uncond = None
        if with_uncond:
            uncond = encode(negative_prompts if negative_prompts is not None else [""] * len(prompts))
        return cond, uncond

    def latent_shape(self, batch_size, height, width, num_frames=1):
        f = 2 * self.pipe.vae_scale_factor
        return (batch_size, self.transformer.config.in_channels, height // f, width // f)

    def check_size(self, height, width, num_frames=1):
        check_image_size(self.family, height, width, num_frames, multiple=self.pipe.vae_scale_factor * 2)

    def time_grid(self, num_inference_steps, *, height, width, num_frames=1, device=None):
        _, _, h, w = self.latent_shape(1, height, width)
        scheduler = self.sampling_scheduler()
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if scheduler.config.get("use_flow_sigmas", False):
            sigmas = None
        mu = flux2_mu(h * w, num_inference_steps)
        return scheduler_time_grid(scheduler, num_inference_steps, mu=mu, sigmas=sigmas, device=device)

    def _bn_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        vae = self.pipe.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(
            like.device, like.dtype
        )
        return mean, std

    def encode_media(self, media: Tensor, *, generator=None) -> Tensor:
        vae = self.pipe.vae
        dist = vae.encode((media * 2 - 1).to(vae.dtype)).latent_dist
        z = patchify_2x2(at_least_fp32(dist.sample(generator) if generator is not None else dist.mode()))
        mean, std = self._bn_stats(z)
        return (z - mean) / std

    def to_vae_latents(self, latents: Tensor) -> Tensor:
        """Canonical latents -> the VAE's latents ``[B, C, H/8, W/8]`` (what the pipeline's "latent" output is)."""
        mean, std = self._bn_stats(latents)
        return unpatchify_2x2(latents * std + mean)

    def decode_latents(self, latents: Tensor) -> Tensor:
        vae = self.pipe.vae
        image = at_least_fp32(vae.decode(self.to_vae_latents(latents).to(vae.dtype), return_dict=False)[0])
        return (image / 2 + 0.5).clamp(0, 1)

    def velocity(self, x, t, cond, *, guidance=None, net: nn.Module | None = None):
        net = net or self.transformer
        dtype = net_dtype(net)
        b, c, h, w = x.shape
        if self.uses_guidance_embedding:
            scale = self.default_guidance_scale if guidance is None else guidance
            guidance_in = torch.as_tensor(scale, device=x.device, dtype=torch.float32).expand(b)
        else:
            guidance_in = None
        out = net(
            hidden_states=x.reshape(b, c, h * w).permute(0, 2, 1).to(dtype),  # [B, H W, 4C]
            # the pipeline passes scheduler timesteps / 1000 (the transformer multiplies by 1000 again)
            timestep=t_to_timesteps(t).to(dtype) / 1000,
            guidance=guidance_in,
            encoder_hidden_states=cond.embeds.to(dtype),
            txt_ids=cond.text_ids,
            img_ids=latent_position_ids(h, w, device=x.device),
            return_dict=False,
        )[0]
        return out.permute(0, 2, 1).reshape(b, c, h, w).to(x.dtype)


@register_family("Flux2Pipeline")
class Flux2Model(_Flux2Base):
    """FLUX.2 [dev]: Mistral 3 text encoder (hidden states 10, 20, 30), embedded guidance (default 4)."""

    family = "flux2"
    pipeline_class = Flux2Pipeline
    text_encoder_out_layers = (10, 20, 30)

    @property
    def uses_guidance_embedding(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)


@register_family("Flux2KleinPipeline")
class Flux2KleinModel(_Flux2Base):
    """FLUX.2 [klein]: Qwen3 text encoder (hidden states 9, 18, 27); true CFG unless step-distilled."""

    family = "flux2-klein"
    pipeline_class = Flux2KleinPipeline
    text_encoder_out_layers = (9, 18, 27)

    @property
    def is_distilled(self) -> bool:
        return bool(self.pipe.config.get("is_distilled", False))

    @property
    def default_guidance_scale(self) -> float:  # the pipeline ignores guidance for distilled checkpoints
        return 1.0 if self.is_distilled else 4.0

    @property
    def default_num_inference_steps(self) -> int:
        return 4 if self.is_distilled else 50
