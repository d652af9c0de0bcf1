"""Qwen-Image behind the canonical FlowModel interface.

Qwen-Image-only: a Qwen2.5-VL text encoder read at its last hidden state, the fixed system
prompt's tokens dropped, padding masked (``encoder_hidden_states_mask``); here every prompt is
padded to ``max_sequence_length`` with a mask, which leaves the real tokens' outputs unchanged
(the transformer's text positions start at the same index whatever the padding, masked keys
get zero attention), so cached rows of any batch stack. Latents come from a causal 3-D VAE
used on one frame, normalised per channel by ``latents_mean``/``latents_std`` (canonical
``[B, 16, H/8, W/8]``); 2x2 packing into tokens as in FLUX; the transformer takes t itself.
Time grid ``linspace(1, 1/N, N)`` shifted by the token-count mu of the scheduler config
(exponential shift, stretched to ``shift_terminal`` in the released config).

Guidance is "true CFG" against a negative prompt (the model card uses a single space),
``v = v_u + w (v_c - v_u)``, then rescaled per token to the conditional prediction's norm:
``v * |v_c| / |v|`` with norms over each packed 2x2 token (64 values).
"""

from __future__ import annotations

import torch
from diffusers import QwenImagePipeline
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
from flowalign.models.flux import pack_2x2, unpack_2x2
from flowalign.models.schedules import flux_time_grid


@register_family("QwenImagePipeline")
class QwenImageModel(FlowModel):
    """Qwen-Image adapter. x ``[B, 16, H/8, W/8]``, t ``[B]`` -> velocity of the same shape."""

    family = "qwen-image"
    pipeline_class = QwenImagePipeline
    default_num_inference_steps = 50
    default_guidance_scale = 4.0  # the pipeline's true_cfg_scale
    max_sequence_length = 512
    negative_prompt = " "  # the model card's negative prompt when none is given

    @property
    def uses_guidance_embedding(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    def encode_prompt(self, prompts, *, negative_prompts=None, with_uncond=False):
        def encode(texts: list[str]) -> PromptEmbeds:
            embeds, mask = self.pipe.encode_prompt(
                prompt=list(texts), device=self.device, max_sequence_length=self.max_sequence_length
            )
            b, n, d = embeds.shape
            length = self.max_sequence_length
            padded = embeds.new_zeros(b, length, d)
            padded[:, :n] = embeds
            full = torch.zeros(b, length, dtype=torch.bool, device=embeds.device)
            full[:, :n] = True if mask is None else mask.bool()
            return PromptEmbeds(embeds=padded, mask=full)

        cond = encode(prompts)
        uncond = None
        if with_uncond:
            negatives = (
                negative_prompts if negative_prompts is not None else [self.negative_prompt] * len(prompts)
            )
            uncond = encode(negatives)
        return cond, uncond

    def latent_shape(self, batch_size, height, width, num_frames=1):
        f = 2 * self.pipe.vae_scale_factor
        return (batch_size, self.transformer.config.in_channels // 4, 2 * (height // f), 2 * (width // f))

    def check_size(self, height, width, num_frames=1):
        check_image_size(self.family, height, width, num_frames, multiple=self.pipe.vae_scale_factor * 2)

    def time_grid(self, num_inference_steps, *, height, width, num_frames=1, device=None):
        _, _, h, w = self.latent_shape(1, height, width)
        return flux_time_grid(
            self.sampling_scheduler(), num_inference_steps, image_seq_len=(h // 2) * (w // 2), device=device
        )

    def _latent_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.pipe.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1).to(like.device, like.dtype)
        std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1).to(like.device, like.dtype)
        return mean, std

    def encode_media(self, media: Tensor, *, generator=None) -> Tensor:
        vae = self.pipe.vae
        dist = vae.encode((media * 2 - 1).unsqueeze(2).to(vae.dtype)).latent_dist  # one frame [B, 3, 1, H, W]
        z = at_least_fp32(dist.sample(generator) if generator is not None else dist.mode())[:, :, 0]
        mean, std = self._latent_stats(z)
        return (z - mean) / std

    def decode_latents(self, latents: Tensor) -> Tensor:
        vae = self.pipe.vae
        mean, std = self._latent_stats(latents.to(vae.dtype))
        z = latents.to(vae.dtype) / (1.0 / std) + mean  # the pipeline's arithmetic
        image = at_least_fp32(vae.decode(z.unsqueeze(2), return_dict=False)[0][:, :, 0])
        return (image / 2 + 0.5).clamp(0, 1)

    def combine_guidance(self, v_uncond: Tensor, v_cond: Tensor, scale: float) -> Tensor:
        """True CFG rescaled per token: ``v = v_u + w (v_c - v_u)``, then ``v |v_c| / |v|`` (2x2 tokens)."""
        guided = v_uncond + scale * (v_cond - v_uncond)
        h, w = v_cond.shape[-2:]
        cond_norm = pack_2x2(v_cond).norm(dim=-1, keepdim=True)
        guided_norm = pack_2x2(guided).norm(dim=-1, keepdim=True)
        return unpack_2x2(pack_2x2(guided) * (cond_norm / guided_norm), height=h, width=w)

    def velocity(self, x, t, cond, *, guidance=None, net: nn.Module | None = None):
        net = net or self.transformer
        dtype = net_dtype(net)
        b, _, h, w = x.shape
        guidance_in = None
        if self.uses_guidance_embedding:
            scale = 1.0 if guidance is None else guidance
            guidance_in = torch.as_tensor(scale, device=x.device, dtype=torch.float32).expand(b)
        tokens, shapes = self.image_tokens(x, cond)
        out = net(
            hidden_states=tokens.to(dtype),
            # the pipeline passes scheduler timesteps / 1000 (the transformer takes t itself)
            timestep=t_to_timesteps(t).to(dtype) / 1000,
            guidance=guidance_in,
            encoder_hidden_states=cond.embeds.to(dtype),
            encoder_hidden_states_mask=cond.mask,
            img_shapes=[shapes] * b,
            return_dict=False,
        )[0]
        out = out[:, : (h // 2) * (w // 2)]  # the noisy latents' tokens come first
        return unpack_2x2(out, height=h, width=w).to(x.dtype)

    def image_tokens(self, x: Tensor, cond: PromptEmbeds) -> tuple[Tensor, list[tuple[int, int, int]]]:
        """The transformer's image stream: packed latents ``[B, (H/2)(W/2), 4C]`` and their (frames,
        rows, columns) of 2x2 tokens; the edit families append their condition image's tokens."""
        h, w = x.shape[-2:]
        return pack_2x2(x), [(1, h // 2, w // 2)]
