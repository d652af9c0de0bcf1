"""Wan 2.x text-to-video (2.1, 2.2 A14B, 2.2 TI2V-5B) behind the canonical FlowModel interface.

Wan-only: UMT5 text encoder; 5-D latents [B, C, T', H/s, W/s] with T' = (T - 1) / 4 + 1 (s = 8, or
16 with the 48-channel TI2V-5B VAE); VAE latents normalised per channel by ``latents_mean``/
``latents_std``; timestep = t * 1000; CFG as two passes in diffusers (here one batched pass, same
result). flowalign samples Wan with its flow Euler/Heun samplers on the shifted grid (``flow_shift``
of the scheduler config); the multistep UniPC solver of the released configs is not reproduced.

Wan 2.2 A14B (``transformer_2`` and ``boundary_ratio`` in the pipeline config) runs its two experts
as one :class:`~flowalign.models.wan_experts.TwoExpertTransformer` (high-noise expert at timesteps
>= boundary_ratio * 1000); ``set_train_expert`` picks which experts training adapts. The low-noise
stage's own CFG scale (diffusers' ``guidance_scale_2``) is not separate here: one scale for both.

Wan 2.2 TI2V-5B (``expand_timesteps`` in the config) takes per-token timesteps and is both
text-to-video and image-to-video: a condition image pins the first latent frame
(:mod:`flowalign.models.wan_condition`); its velocity there is (x_t - z) / t, the flow velocity
whose endpoint is the condition itself, so the sampler ends on the condition and the training
loss on that frame is zero.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from diffusers import WanPipeline
from torch import Tensor, nn

from flowalign.flow import t_to_timesteps
from flowalign.models.base import (
    FlowModel,
    PromptEmbeds,
    at_least_fp32,
    check_video_size,
    net_dtype,
    register_family,
)
from flowalign.models.lora import _unwrap
from flowalign.models.wan_condition import check_images, condition_latents
from flowalign.models.wan_experts import TrainExpert, TwoExpertTransformer


@register_family("WanPipeline")
class WanModel(FlowModel):
    """Wan adapter. x ``[B, C, T', H', W']``, t ``[B]`` -> velocity of the same shape."""

    family = "wan"
    pipeline_class = WanPipeline
    is_video = True
    default_num_inference_steps = 50
    default_guidance_scale = 5.0
    default_height = 480
    default_width = 832
    default_num_frames = 81
    optional_components = ("transformer_2",)
    fp32_components = ("vae",)  # as WanPipeline's model cards load it: the causal 3-D VAE stays fp32
    max_sequence_length = 512

    def __init__(self, pipe, *, compute_dtype: torch.dtype | None = None):
        super().__init__(pipe, compute_dtype=compute_dtype)
        self._experts: nn.Module | None = None
        if self.two_experts:
            self.set_train_expert("both")

    # ------------------------------------------------------------------ Wan 2.2 A14B experts
    @property
    def two_experts(self) -> bool:
        """Wan 2.2 A14B: a high-noise and a low-noise expert switched at the boundary timestep."""
        return getattr(self.pipe, "transformer_2", None) is not None and self.boundary_timestep is not None

    @property
    def boundary_timestep(self) -> float | None:
        """``boundary_ratio * num_train_timesteps``, as diffusers' Wan pipelines compute it."""
        ratio = self.pipe.config.get("boundary_ratio")
        return None if ratio is None else ratio * self.pipe.scheduler.config.num_train_timesteps

    def set_train_expert(self, which: TrainExpert) -> None:
        """Which experts training adapts: "high", "low" or "both" (before LoRA is attached)."""
        if not self.two_experts:
            if which != "both":
                raise ValueError(f"train_expert={which!r} needs a two-expert Wan 2.2 A14B model")
            return
        self._experts = TwoExpertTransformer(
            self.pipe.transformer, self.pipe.transformer_2, self.boundary_timestep, which
        )

    @property
    def training_t_span(self) -> tuple[float, float]:
        """Training one expert draws t in its range: [b, 1] (high) or [0, b] (low), b = boundary / 1000."""
        if self._experts is None or _unwrap(self._experts).train_expert == "both":
            return (0.0, 1.0)
        b = self.boundary_timestep / self.pipe.scheduler.config.num_train_timesteps
        return (b, 1.0) if _unwrap(self._experts).train_expert == "high" else (0.0, b)

    @property
    def transformer(self) -> nn.Module:
        return self._experts if self._experts is not None else self.pipe.transformer

    def modules(self) -> dict[str, nn.Module]:
        found = super().modules()
        if self._experts is None:
            return found
        experts = _unwrap(self._experts)
        found.pop("transformer_2", None)
        found["transformer"] = self._experts
        for name in ("high", "low"):
            if name not in experts.trained:
                found[f"transformer_{name}_frozen"] = experts.expert(name)
        return found

    @contextmanager
    def swapped(self, **modules: nn.Module) -> Iterator[FlowModel]:
        new = modules.get("transformer")
        if self._experts is None or new is None:
            with super().swapped(**modules) as model:
                yield model
            return
        rest = {k: v for k, v in modules.items() if k != "transformer"}
        inner = _unwrap(new)
        if isinstance(inner, TwoExpertTransformer):
            rest.update(transformer=inner.expert("high"), transformer_2=inner.expert("low"))
        old = self._experts
        self._experts = new
        try:
            with super().swapped(**rest) as model:
                yield model
        finally:
            self._experts = old

    # ------------------------------------------------------------------ conditioning
    @property
    def pins_first_frame(self) -> bool:
        """TI2V-5B (``expand_timesteps``): per-token timesteps, a condition image pins the first frame."""
        return bool(self.pipe.config.get("expand_timesteps", False))

    @property
    def takes_images(self) -> bool:
        """TI2V-5B also makes video from a first frame."""
        return self.pins_first_frame

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
        """Text embeddings; with ``images`` (one per prompt, families with :attr:`takes_images`) also
        the condition images' latents for a video of ``height`` x ``width`` x ``num_frames``."""
        embeds, neg_embeds = self.pipe.encode_prompt(
            prompt=prompts,
            negative_prompt=negative_prompts,
            do_classifier_free_guidance=with_uncond,
            max_sequence_length=self.max_sequence_length,
            device=self.device,
        )
        cond = PromptEmbeds(embeds=embeds)
        uncond = PromptEmbeds(embeds=neg_embeds) if with_uncond else None
        if images is None:
            return cond, uncond
        if not self.takes_images:
            raise ValueError(f"this {self.family} model is text-to-video: it takes no condition image")
        height, width = height or self.default_height, width or self.default_width
        num_frames = num_frames or self.default_num_frames
        self.check_size(height, width, num_frames)
        fields = self.encode_images(check_images(images, len(prompts)), height, width, num_frames)
        return replace(cond, **fields), None if uncond is None else replace(uncond, **fields)

    def encode_images(self, images, height: int, width: int, num_frames: int) -> dict[str, Tensor]:
        """The PromptEmbeds image fields of the condition images (TI2V-5B: the first frame's latents)."""
        latents = condition_latents(
            self.pipe, images, height=height, width=width, num_frames=num_frames, whole_clip=False
        )
        return {"image_latents": latents.to(self.device)}

    @property
    def temporal_factor(self) -> int:
        return self.pipe.vae_scale_factor_temporal

    def media_size(self, latent_shape) -> tuple[int, int, int]:
        """(height, width, num_frames) of the media whose latents have ``latent_shape``."""
        f = self.pipe.vae_scale_factor_spatial
        frames, h, w = latent_shape[-3:]
        return h * f, w * f, (frames - 1) * self.temporal_factor + 1

    def latent_shape(self, batch_size, height, width, num_frames=1):
        f = self.pipe.vae_scale_factor_spatial
        frames = (num_frames - 1) // self.temporal_factor + 1
        return (batch_size, self.pipe.vae.config.z_dim, frames, height // f, width // f)

    def check_size(self, height, width, num_frames=1):
        check_video_size(
            self.family,
            height,
            width,
            num_frames,
            multiple=self.pipe.vae_scale_factor_spatial * self.transformer.config.patch_size[1],
            temporal=self.temporal_factor,
        )

    def _latent_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.pipe.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(like.device, like.dtype)
        std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(like.device, like.dtype)
        return mean, std

    def encode_media(self, media: Tensor, *, generator=None) -> Tensor:
        vae = self.pipe.vae
        video = (media * 2 - 1).permute(0, 2, 1, 3, 4).to(vae.dtype)  # [B, T, 3, H, W] -> [B, 3, T, H, W]
        dist = vae.encode(video).latent_dist
        z = at_least_fp32(dist.sample(generator) if generator is not None else dist.mode())
        mean, std = self._latent_stats(z)
        return (z - mean) / std

    def decode_latents(self, latents: Tensor) -> Tensor:
        vae = self.pipe.vae
        mean, std = self._latent_stats(latents.to(vae.dtype))
        # same arithmetic as WanPipeline: latents / (1 / std) + mean
        z = latents.to(vae.dtype) / (1.0 / std) + mean
        video = at_least_fp32(vae.decode(z, return_dict=False)[0])  # [B, 3, T, H, W] in [-1, 1]
        return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)  # [B, T, 3, H, W]

    # ------------------------------------------------------------------ velocity
    def net_inputs(self, x: Tensor, timestep: Tensor, cond: PromptEmbeds, dtype) -> dict[str, Tensor]:
        """The transformer's inputs: latents (and per-token timesteps for TI2V-5B)."""
        if not self.pins_first_frame:
            return {"hidden_states": x.to(dtype), "timestep": timestep}
        keep = torch.ones(1, 1, *x.shape[2:], dtype=torch.float32, device=x.device)  # M
        hidden = x
        if cond.image_latents is not None:  # the first latent frame pinned to the condition
            keep[:, :, 0] = 0.0
            hidden = (1 - keep) * cond.image_latents.to(x.dtype) + keep * x
        p = self.transformer.config.patch_size
        tokens = keep[0, 0][:: p[0], :: p[1], :: p[2]].flatten().to(timestep.dtype)
        return {"hidden_states": hidden.to(dtype), "timestep": tokens.unsqueeze(0) * timestep.unsqueeze(1)}

    def velocity(self, x, t, cond, *, guidance=None, net: nn.Module | None = None):
        net = net or self.transformer
        dtype = net_dtype(net)
        # Wan takes t * 1000, in fp32 at least (as WanPipeline passes it)
        t_wide = t.to(torch.promote_types(dtype, torch.float32))
        inputs = self.net_inputs(x, t_to_timesteps(t_wide), cond, dtype)
        out = net(encoder_hidden_states=cond.embeds.to(dtype), return_dict=False, **inputs)[0].to(x.dtype)
        if self.pins_first_frame and cond.image_latents is not None:
            # the first latent frame is the condition: velocity (x_t - z) / t ends there at t = 0
            z = cond.image_latents.to(x.dtype)
            tt = t.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
            pinned = torch.where(tt > 0, (x[:, :, :1] - z) / tt.clamp_min(torch.finfo(x.dtype).tiny), 0.0)
            out = torch.cat([pinned.to(out.dtype), out[:, :, 1:]], dim=2)
        return out
