"""Text-to-image/video generation over any FlowModel, with CFG and velocity-transform hooks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flowalign.models.base import FlowModel, at_least_fp32
from flowalign.sampling.guidance import VelocityTransform, apply_transforms, model_velocity_fn
from flowalign.sampling.samplers import StepCallback, get_sampler, sample_one_step


@dataclass
class GenerationOutput:
    """What a generation call returns.

    Attributes:
        latents: final canonical latents ``[B, ...]``.
        media: decoded media in [0, 1] (``[B, 3, H, W]`` or ``[B, T, 3, H, W]``), or None for
            ``output_type="latent"``.
    """

    latents: Tensor
    media: Tensor | None


def _as_list(prompt: str | list[str], name: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError(f"{name} is empty: give at least one prompt")
    return prompts


def _negatives(negative_prompt: str | list[str] | None, count: int) -> list[str] | None:
    if negative_prompt is None:
        return None
    negatives = [negative_prompt] * count if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != count:
        raise ValueError(f"got {len(negatives)} negative prompts for {count} prompts")
    return negatives


def condition_images(model: FlowModel, image: Any, count: int) -> list | None:
    """One condition image per prompt (a single image serves every prompt), or None without one."""
    if image is None:
        if model.requires_images:
            raise ValueError(f"{model.family} is conditioned on an image: pass image= (generate --image)")
        return None
    if not model.takes_images:
        raise ValueError(f"{model.family} takes no condition image (it is text-conditioned only)")
    images = list(image) if isinstance(image, list | tuple) else [image]
    if len(images) == 1:
        images = images * count
    if len(images) != count:
        raise ValueError(f"got {len(images)} condition images for {count} prompts")
    return images


class FlowPipeline:
    """Generate images or videos from prompts with any :class:`FlowModel`.

    Argument names follow diffusers' pipelines. Guidance: for ordinary models ``guidance_scale``
    is classifier-free guidance (1 = off); for FLUX, as in ``FluxPipeline``, it is the embedded
    guidance input of guidance-distilled models (FLUX.1-dev), unused by FLUX.1-schnell, and
    ``true_cfg_scale`` turns on real CFG with the negative prompt.
    ``image`` is the condition image of image-conditioned families (image-to-video, edit): one per
    prompt or one for all, a PIL image or a float ``[3, H, W]`` tensor in [0, 1].
    ``velocity_transforms`` wrap the guided velocity (reward guidance plugs in here). The model
    computes in the dtype it was loaded in (e.g. bf16); the sampler's latents, the velocities it
    sees and the returned media are at least fp32.
    """

    def __init__(self, model: FlowModel):
        self.model = model

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        *,
        negative_prompt: str | list[str] | None = None,
        image: Any = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_samples_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        sampler: str = "euler",
        one_step: bool = False,
        velocity_transforms: list[VelocityTransform] | None = None,
        callback: StepCallback | None = None,
        output_type: str = "pt",
        progress: bool = False,
        enable_grad: bool = False,
    ) -> GenerationOutput:
        model = self.model
        prompts = _as_list(prompt, "prompt")
        negatives = _negatives(negative_prompt, len(prompts))
        steps = num_inference_steps if num_inference_steps is not None else model.default_num_inference_steps
        if steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
        scale = model.default_guidance_scale if guidance_scale is None else guidance_scale
        height = height or model.default_height
        width = width or model.default_width
        num_frames = num_frames or model.default_num_frames
        model.check_size(height, width, num_frames)
        if output_type not in ("pt", "latent"):
            raise ValueError(f"output_type must be 'pt' or 'latent', got {output_type!r}")

        if not model.guidance_scale_is_cfg:
            embedded = scale if model.uses_guidance_embedding else None
            cfg_scale = true_cfg_scale
            use_cfg = cfg_scale > 1.0 and negatives is not None
        else:
            embedded, cfg_scale = None, scale
            use_cfg = cfg_scale > 1.0
        images = condition_images(model, image, len(prompts))
        size = {"height": height, "width": width, "num_frames": num_frames}
        extra = {} if images is None else {"images": images, **size}
        cond, uncond = model.encode_prompt(prompts, negative_prompts=negatives, with_uncond=use_cfg, **extra)
        if num_samples_per_prompt > 1:
            cond = cond.repeat_interleave(num_samples_per_prompt)
            uncond = None if uncond is None else uncond.repeat_interleave(num_samples_per_prompt)
        batch = len(prompts) * num_samples_per_prompt

        if latents is None:
            latents = model.prepare_noise(
                batch, height=height, width=width, num_frames=num_frames, generator=generator
            )
        latents = at_least_fp32(latents)  # the sampler integrates in fp32 whatever the model's dtype
        v_fn = model_velocity_fn(
            model,
            cond,
            uncond=uncond if use_cfg else None,
            guidance_scale=cfg_scale,
            embedded_guidance=embedded,
        )
        v_fn = apply_transforms(v_fn, velocity_transforms)
        with torch.set_grad_enabled(enable_grad):
            if one_step:
                x0 = sample_one_step(v_fn, latents)
            else:
                ts = model.time_grid(
                    steps, height=height, width=width, num_frames=num_frames, device=latents.device
                )
                x0 = get_sampler(sampler)(v_fn, latents, ts, callback=callback, progress=progress)
            media = None if output_type == "latent" else model.decode_latents(x0)
        return GenerationOutput(latents=x0, media=media)
