"""Z-Image behind the canonical FlowModel interface.

Z-Image-only: a Qwen3 text encoder read at its second-to-last hidden state, with padding tokens
dropped (each prompt keeps its own length; here the padded rows carry a mask); a single-stream
transformer that takes lists of ``[C, 1, H, W]`` latents and of caption features, the reversed
time ``(1000 - 1000 t) / 1000`` (0 = noise) and predicts the negated velocity; 16-channel
latents with the FLUX-style VAE scale and shift; the time grid ``linspace(1, 1/N, N)`` under the
scheduler's shift (static 3 in the released configs; a dynamic mu when the config asks for it).

Guidance: the pipeline's ``guidance_scale`` g means ``v_cond + g (v_cond - v_uncond)``, which is
ordinary CFG at scale ``1 + g``: flowalign's ``guidance_scale`` is the ordinary one, so the
pipeline's default g = 5 is 6 here, and g = 0 (Turbo) is 1. The pipeline's optional CFG
normalisation and truncation (off by default) are not reproduced.
"""

from __future__ import annotations

import torch
from diffusers import ZImagePipeline
from torch import Tensor, nn

from flowalign.flow import flux_mu, t_to_timesteps
from flowalign.models.base import (
    FlowModel,
    PromptEmbeds,
    check_image_size,
    decode_with_image_vae,
    encode_with_image_vae,
    net_dtype,
    register_family,
)
from flowalign.models.schedules import scheduler_time_grid


def pad_rows(rows: list[Tensor], length: int) -> tuple[Tensor, Tensor]:
    """Variable-length rows ``[L_i, D]`` -> zero-padded ``[B, length, D]`` and the bool mask ``[B, length]``."""
    out = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
    mask = torch.zeros(len(rows), length, dtype=torch.bool, device=rows[0].device)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
        mask[i, : len(row)] = True
    return out, mask


def unpad_rows(cond: PromptEmbeds, dtype: torch.dtype) -> list[Tensor]:
    """The real tokens of each row (``cond.mask``), as the list the transformer takes."""
    embeds = cond.embeds.to(dtype)
    if cond.mask is None:
        return list(embeds.unbind(0))
    return [row[m] for row, m in zip(embeds, cond.mask, strict=True)]


@register_family("ZImagePipeline")
class ZImageModel(FlowModel):
    """Z-Image adapter. x ``[B, 16, H/8, W/8]``, t ``[B]`` -> velocity of the same shape."""

    family = "z-image"
    pipeline_class = ZImagePipeline
    default_num_inference_steps = 50
    default_guidance_scale = 6.0  # the pipeline's guidance_scale=5 (see the module docstring)
    max_sequence_length = 512

    def encode_prompt(self, prompts, *, negative_prompts=None, with_uncond=False):
        def encode(texts: list[str]) -> PromptEmbeds:
            rows, _ = self.pipe.encode_prompt(
                prompt=list(texts),
                device=self.device,
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )
            embeds, mask = pad_rows(rows, self.max_sequence_length)
            return PromptEmbeds(embeds=embeds, mask=mask)

        cond = encode(prompts)
        uncond = None
        if with_uncond:
            uncond = encode(negative_prompts if negative_prompts is not None else [""] * len(prompts))
        return cond, uncond

    def latent_shape(self, batch_size, height, width, num_frames=1):
        f = 2 * self.pipe.vae_scale_factor
        return (batch_size, self.transformer.config.in_channels, 2 * (height // f), 2 * (width // f))

    def check_size(self, height, width, num_frames=1):
        check_image_size(self.family, height, width, num_frames, multiple=self.pipe.vae_scale_factor * 2)

    def time_grid(self, num_inference_steps, *, height, width, num_frames=1, device=None):
        _, _, h, w = self.latent_shape(1, height, width)
        scheduler = self.sampling_scheduler()
        config = scheduler.config
        mu = flux_mu(
            (h // 2) * (w // 2),
            base_seq_len=config.get("base_image_seq_len", 256),
            max_seq_len=config.get("max_image_seq_len", 4096),
            base_shift=config.get("base_shift", 0.5),
            max_shift=config.get("max_shift", 1.15),
        )
        sigmas = torch.linspace(1.0, 1 / num_inference_steps, num_inference_steps).tolist()  # as the pipeline
        return scheduler_time_grid(scheduler, num_inference_steps, mu=mu, sigmas=sigmas, device=device)

    def encode_media(self, media: Tensor, *, generator=None) -> Tensor:
        return encode_with_image_vae(self.pipe.vae, media, generator)

    def decode_latents(self, latents: Tensor) -> Tensor:
        return decode_with_image_vae(self.pipe.vae, latents)

    def velocity(self, x, t, cond, *, guidance=None, net: nn.Module | None = None):
        net = net or self.transformer
        dtype = net_dtype(net)
        out = net(
            list(x.to(dtype).unsqueeze(2).unbind(0)),  # B x [C, 1, H, W]
            (1000 - t_to_timesteps(t.to(torch.float32))) / 1000,  # 0 = noise, 1 = clean
            unpad_rows(cond, dtype),
            return_dict=False,
        )[0]
        return -torch.stack(out).squeeze(2).to(x.dtype)  # the network predicts x0 - noise
