"""Qwen-Image-Edit and Qwen-Image-Edit-Plus (2509) behind the canonical FlowModel interface.

Everything of :class:`~flowalign.models.qwen_image.QwenImageModel` (VAE, 2x2 packing, time grid,
true CFG with the per-token norm rescale) plus the edit source image, one per prompt, which enters
twice, as diffusers' edit pipelines feed it:

- to the Qwen2.5-VL text encoder with the prompt: Plus resizes the image to an area of 384 x 384 at
  its own aspect ratio (sides rounded to 32) and writes ``"Picture 1: <|vision_start|><|image_pad|>
  <|vision_end|>" + prompt`` into the edit chat template; the first release shows the image at the
  VAE size below. The system prefix (64 tokens) is dropped; what is left, image tokens included,
  is ``PromptEmbeds.embeds`` padded to ``max_sequence_length`` with its mask, as for Qwen-Image;
- to the VAE at an area of 1024 x 1024 at its aspect ratio (sides rounded to 32), normalised per
  channel z = (E(2x - 1) - mean) / std: ``PromptEmbeds.image_latents`` ``[B, 16, H_c/8, W_c/8]``,
  independent of the output size. The transformer reads the packed noisy tokens followed by the
  condition's packed tokens (``img_shapes`` names both grids) and the velocity is the output's
  first ``(H/16)(W/16)`` tokens.

CFG keeps the image in the negative branch too (the pipelines encode the negative prompt with the
same image). Differences from the pipelines: a batch may hold several prompts, each with its own
image (the Plus pipeline takes one prompt per call), but their condition images must give one
latent size; the output size defaults to 1024 x 1024, not to the image's aspect ratio; Plus's
several images per prompt are not supported (one condition image per prompt).
"""

from __future__ import annotations

from typing import ClassVar

import PIL.Image
import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit_module
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus_module
from torch import Tensor

from flowalign.models.base import PromptEmbeds, at_least_fp32, register_family
from flowalign.models.flux import pack_2x2
from flowalign.models.qwen_image import QwenImageModel
from flowalign.models.wan_condition import check_images


def _side_sizes(area: int, image: PIL.Image.Image) -> tuple[int, int]:
    """(width, height) of ``area`` pixels at the image's aspect ratio, sides rounded to 32 (as diffusers)."""
    width, height = plus_module.calculate_dimensions(area, image.width / image.height)
    return int(width), int(height)


@register_family("QwenImageEditPlusPipeline")
class QwenImageEditPlusModel(QwenImageModel):
    """Qwen-Image-Edit-Plus adapter: ``encode_prompt(prompts, images=...)`` is required."""

    family = "qwen-image-edit-plus"
    pipeline_class = QwenImageEditPlusPipeline

    @property
    def takes_images(self) -> bool:
        return True

    @property
    def requires_images(self) -> bool:
        return True

    @property
    def text_reads_image(self) -> bool:
        return True

    # ------------------------------------------------------------------ the condition image
    def condition_inputs(self, image: PIL.Image.Image) -> tuple[PIL.Image.Image, Tensor]:
        """What the pipeline makes of one image: the text encoder's image and the VAE's pixels
        ``[1, 3, 1, H_c, W_c]`` in [-1, 1]. The areas are read from diffusers at call time."""
        processor = self.pipe.image_processor
        cw, ch = _side_sizes(plus_module.CONDITION_IMAGE_SIZE, image)
        vw, vh = _side_sizes(plus_module.VAE_IMAGE_SIZE, image)
        return processor.resize(image, ch, cw), processor.preprocess(image, vh, vw).unsqueeze(2)

    def _text_embeds(self, prompt: str, image: PIL.Image.Image) -> tuple[Tensor, Tensor]:
        return self.pipe._get_qwen_prompt_embeds(prompt=[prompt], image=[image], device=self.device)

    # ------------------------------------------------------------------ encoding
    def encode_prompt(
        self,
        prompts,
        *,
        negative_prompts=None,
        with_uncond=False,
        images=None,
        height=None,
        width=None,
        num_frames=None,
    ):
        """Prompt-and-image embeddings and the condition latents; both branches share the images."""
        if images is None:
            raise ValueError(f"{self.family} edits an image: give one condition image per prompt")
        if height is not None and width is not None:
            self.check_size(height, width, num_frames or 1)
        pil = check_images(images, len(prompts))
        inputs = [self.condition_inputs(image) for image in pil]
        latents = self._condition_latents([pixels for _, pixels in inputs], pil)
        shown = [vl_image for vl_image, _ in inputs]
        cond = PromptEmbeds(**self._encode_rows(list(prompts), shown), image_latents=latents)
        uncond = None
        if with_uncond:
            negatives = (
                negative_prompts if negative_prompts is not None else [self.negative_prompt] * len(prompts)
            )
            uncond = PromptEmbeds(**self._encode_rows(list(negatives), shown), image_latents=latents)
        return cond, uncond

    def _encode_rows(self, prompts: list[str], images: list[PIL.Image.Image]) -> dict[str, Tensor]:
        """Each prompt with its image, one at a time as the pipeline encodes them, padded to
        ``max_sequence_length`` with a mask (errors name the prompt that does not fit)."""
        length = self.max_sequence_length
        rows, masks = [], []
        with torch.no_grad():
            for i, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
                embeds, mask = self._text_embeds(prompt, image)
                n = embeds.shape[1]
                if n > length:
                    raise ValueError(
                        f"prompt {i} with its condition image is {n} tokens, more than max_sequence_length "
                        f"{length} of {self.family}: shorten the prompt or raise max_sequence_length"
                    )
                padded = embeds.new_zeros(1, length, embeds.shape[2])
                padded[:, :n] = embeds
                full = torch.zeros(1, length, dtype=torch.bool, device=embeds.device)
                full[:, :n] = mask.bool()
                rows.append(padded)
                masks.append(full)
        return {"embeds": torch.cat(rows), "mask": torch.cat(masks)}

    def _condition_latents(self, pixels: list[Tensor], images: list[PIL.Image.Image]) -> Tensor:
        """Normalised VAE latents of each condition image ``[B, 16, H_c/8, W_c/8]`` (distribution mode)."""
        vae = self.pipe.vae
        sizes = [tuple(p.shape[-2:]) for p in pixels]
        if len(set(sizes)) > 1:
            j = next(k for k, size in enumerate(sizes) if size != sizes[0])
            raise ValueError(
                f"condition images 0 ({images[0].width}x{images[0].height}) and {j} ({images[j].width}x"
                f"{images[j].height}) have different aspect ratios, so different condition sizes "
                f"({sizes[0][1]}x{sizes[0][0]} vs {sizes[j][1]}x{sizes[j][0]}); one batch needs one aspect ratio"
            )
        out = []
        with torch.no_grad():
            for p in pixels:  # one by one, as the pipeline encodes its image
                z = self.pipe._encode_vae_image(p.to(vae.device, vae.dtype), generator=None)
                out.append(at_least_fp32(z)[:, :, 0])
        return torch.cat(out).to(self.device)

    def media_size(self, latent_shape) -> tuple[int, int, int]:
        """(height, width, num_frames) of the images whose latents have ``latent_shape``."""
        f = self.pipe.vae_scale_factor
        return latent_shape[-2] * f, latent_shape[-1] * f, 1

    def image_tokens(self, x: Tensor, cond: PromptEmbeds) -> tuple[Tensor, list[tuple[int, int, int]]]:
        if cond.image_latents is None:
            raise ValueError(f"{self.family}: the conditioning has no image (encode_prompt(..., images=...))")
        h, w = x.shape[-2:]
        z = cond.image_latents.to(x.dtype)
        hc, wc = z.shape[-2:]
        tokens = torch.cat([pack_2x2(x), pack_2x2(z)], dim=1)
        return tokens, [(1, h // 2, w // 2), (1, hc // 2, wc // 2)]


@register_family("QwenImageEditPipeline")
class QwenImageEditModel(QwenImageEditPlusModel):
    """Qwen-Image-Edit (first release): one image at the VAE size serves both the text encoder and the VAE."""

    family = "qwen-image-edit"
    pipeline_class = QwenImageEditPipeline
    vae_image_area: ClassVar[int] = 1024 * 1024  # fixed in QwenImageEditPipeline.__call__

    def condition_inputs(self, image: PIL.Image.Image) -> tuple[PIL.Image.Image, Tensor]:
        width, height, _ = edit_module.calculate_dimensions(self.vae_image_area, image.width / image.height)
        resized = self.pipe.image_processor.resize(image, height, width)
        return resized, self.pipe.image_processor.preprocess(resized, height, width).unsqueeze(2)

    def _text_embeds(self, prompt: str, image: PIL.Image.Image) -> tuple[Tensor, Tensor]:
        return self.pipe._get_qwen_prompt_embeds(prompt=[prompt], image=image, device=self.device)
