"""Wan 2.1 / 2.2 image-to-video behind the canonical FlowModel interface.

Everything of :class:`~flowalign.models.wan.WanModel` (text, VAE, time grid, the 2.2 A14B expert
switch) plus the condition image of :mod:`flowalign.models.wan_condition`: the transformer reads
``concat([x_t, m, z], channels)`` (first-frame mask m and the latents z of the image followed by
empty frames), and Wan 2.1 I2V also its CLIP image tokens (``image_encoder``; diffusers computes
them only when the pipeline has neither ``boundary_ratio`` nor ``expand_timesteps``). Canonical
latents keep the VAE's channels (``z_dim``), not the transformer's input channels.
A TI2V-5B folder loaded as an image-to-video pipeline pins the first frame as in ``wan.py``.
"""

from __future__ import annotations

import torch
from diffusers import WanImageToVideoPipeline
from torch import Tensor

from flowalign.models.base import PromptEmbeds, register_family
from flowalign.models.wan import WanModel
from flowalign.models.wan_condition import clip_image_tokens, condition_latents, first_frame_mask


@register_family("WanImageToVideoPipeline")
class WanI2VModel(WanModel):
    """Wan image-to-video adapter: ``encode_prompt(prompts, images=...)`` is required."""

    family = "wan-i2v"
    pipeline_class = WanImageToVideoPipeline
    optional_components = ("transformer_2", "image_encoder", "image_processor")

    @property
    def takes_images(self) -> bool:
        return True

    @property
    def requires_images(self) -> bool:
        return True

    @property
    def uses_clip_image(self) -> bool:
        """Wan 2.1 I2V: CLIP image tokens go to the transformer's image cross-attention."""
        config = self.pipe.config
        return (
            self.pipe.image_encoder is not None
            and config.get("boundary_ratio") is None
            and not config.get("expand_timesteps", False)
        )

    def encode_prompt(self, prompts, *, images=None, **kwargs):
        if images is None:
            raise ValueError(f"{self.family} makes video from an image: give one condition image per prompt")
        return super().encode_prompt(prompts, images=images, **kwargs)

    def encode_text(self, prompts) -> PromptEmbeds:
        """The text embeddings alone (the image fields come from :meth:`encode_images`)."""
        return WanModel.encode_prompt(self, list(prompts))[0]

    def encode_images(self, images, height: int, width: int, num_frames: int) -> dict[str, Tensor]:
        if self.pins_first_frame:
            return super().encode_images(images, height, width, num_frames)
        latents = condition_latents(
            self.pipe, images, height=height, width=width, num_frames=num_frames, whole_clip=True
        )
        mask = first_frame_mask(len(images), self.temporal_factor, latents)
        fields = {"image_latents": torch.cat([mask, latents], dim=1).to(self.device)}
        if self.uses_clip_image:
            fields["image_embeds"] = clip_image_tokens(self.pipe, images).to(self.device)
        return fields

    def net_inputs(self, x: Tensor, timestep: Tensor, cond: PromptEmbeds, dtype) -> dict[str, Tensor]:
        if self.pins_first_frame:
            return super().net_inputs(x, timestep, cond, dtype)
        if cond.image_latents is None:
            raise ValueError(f"{self.family}: the conditioning has no image (encode_prompt(..., images=...))")
        hidden = torch.cat([x, cond.image_latents.to(x.dtype)], dim=1)
        inputs = {"hidden_states": hidden.to(dtype), "timestep": timestep}
        if cond.image_embeds is not None:
            inputs["encoder_hidden_states_image"] = cond.image_embeds.to(dtype)
        return inputs
