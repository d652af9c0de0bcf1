"""Stable Diffusion 3 / 3.5 behind the canonical FlowModel interface.

SD3-only: two CLIP encoders + optional T5 (prompt embeds concatenated, pooled from the CLIPs);
VAE latents z = (vae(x) - shift_factor) * scaling_factor; timestep = t * 1000; static time shift
from the scheduler config (3.0 for SD3-medium and SD3.5).

Without T5 (:func:`without_t5`, ``model.drop_t5`` / ``--no-t5``) the pipeline loads with
``text_encoder_3=None, tokenizer_3=None`` and, as diffusers does, feeds the transformer zeros in
place of the T5 tokens: the prompt embeddings keep their shape ``[B, 77 + max_sequence_length, D]``,
so the transformer's compute is unchanged while T5's weights (4.76B parameters for SD3.5's T5-XXL)
are never read.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline
from torch import Tensor, nn

from flowalign.flow import t_to_timesteps
from flowalign.models.base import (
    FlowModel,
    ModelLoadError,
    PromptEmbeds,
    decode_with_image_vae,
    encode_with_image_vae,
    net_dtype,
    register_family,
)

T5_COMPONENTS = ("text_encoder_3", "tokenizer_3")
"""SD3's optional T5 encoder and its tokenizer (pipeline component names)."""


def without_t5(family: type[FlowModel], source: str, components: dict[str, Any]) -> dict[str, Any]:
    """``components`` with SD3's T5 encoder and tokenizer set to None, for ``family.from_pretrained``.

    Raises:
        ModelLoadError: ``family`` is not SD3 (FLUX and Wan cannot work without their T5 / UMT5 encoder),
            or ``components`` already passes a T5 encoder.
    """
    if not issubclass(family, SD3Model):
        raise ModelLoadError(
            f"{source}: drop_t5 (--no-t5) applies to SD3 / SD3.5 models, whose T5 encoder is optional; "
            f"a {family.family} model needs its T5 text encoder"
        )
    given = [name for name in T5_COMPONENTS if components.get(name) is not None]
    if given:
        raise ModelLoadError(f"{source}: drop_t5 conflicts with the {' and '.join(given)} passed in")
    return {**components, **dict.fromkeys(T5_COMPONENTS)}


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
