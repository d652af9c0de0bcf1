"""Tiny, offline builders of the Wan 2.2 and image-conditioned families (random weights, real classes).

Like :mod:`flowalign.models.tiny`: small configs of the real diffusers/transformers classes, the
tokenizer built from the CLIP merges shipped in ``open_clip``, nothing downloaded.

- ``wan22``: Wan 2.2 A14B text-to-video layout: two experts, ``boundary_ratio`` 0.875;
- ``wan22-ti2v``: Wan 2.2 TI2V-5B layout: the 48-channel residual VAE with 2x2 patchify (16x
  spatial), ``expand_timesteps``; text-to-video and, with an image, image-to-video;
- ``wan-i2v``: Wan 2.1 I2V: 36 input channels (16 noisy + 4 mask + 16 condition) and a CLIP vision
  encoder feeding image cross-attention;
- ``wan22-i2v``: Wan 2.2 I2V A14B: two 36-channel experts, ``boundary_ratio`` 0.9, no CLIP.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

from flowalign.models.tiny import _TINY_T5, _eval, tiny_t5_tokenizer

TINY_CLIP_IMAGE = 32
"""Side of the tiny CLIP vision encoder's input (16 patches of 8 px + the class token)."""


def _transformer(in_channels: int, out_channels: int = 16, **extra) -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=in_channels,
        out_channels=out_channels,
        text_dim=64,
        freq_dim=64,
        ffn_dim=128,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
        **extra,
    )


def _vae() -> AutoencoderKLWan:
    return AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )


def _text() -> dict:
    tok = tiny_t5_tokenizer()
    return {"tokenizer": tok, "text_encoder": UMT5EncoderModel(UMT5Config(vocab_size=len(tok), **_TINY_T5))}


def _two_experts(pipeline_class, in_channels: int, *, shift: float, boundary: float, seed: int):
    """A Wan 2.2 A14B layout: high-noise ``transformer`` and low-noise ``transformer_2`` switched at
    ``boundary`` (``boundary_ratio``), no image encoder."""
    torch.manual_seed(seed)
    high, low = _transformer(in_channels), _transformer(in_channels)
    return _eval(
        pipeline_class(
            transformer=high,
            transformer_2=low,
            vae=_vae(),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
            boundary_ratio=boundary,
            **_text(),
        )
    )


def tiny_wan22_pipeline(seed: int = 0) -> WanPipeline:
    """Wan 2.2 A14B T2V: two 16-channel experts, boundary 0.875."""
    return _two_experts(WanPipeline, 16, shift=3.0, boundary=0.875, seed=seed)


def tiny_wan22_ti2v_pipeline(seed: int = 0) -> WanPipeline:
    """Wan 2.2 TI2V-5B: 48-channel residual VAE (2x2 patchify inside, 16x spatial), per-token timesteps."""
    torch.manual_seed(seed)
    z = 48
    generator = torch.Generator().manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=z,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        is_residual=True,
        in_channels=12,  # 3 colours x the 2x2 patch folded into channels before the encoder
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
        latents_mean=(torch.randn(z, generator=generator) * 0.5).tolist(),
        latents_std=(torch.rand(z, generator=generator) + 0.5).tolist(),
    )
    return _eval(
        WanPipeline(
            transformer=_transformer(z, z),
            vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
            expand_timesteps=True,
            **_text(),
        )
    )


def _clip_vision() -> tuple[CLIPVisionModel, CLIPImageProcessor]:
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=TINY_CLIP_IMAGE,
        patch_size=8,
        projection_dim=32,
    )
    side = {"height": TINY_CLIP_IMAGE, "width": TINY_CLIP_IMAGE}
    processor = CLIPImageProcessor(size={"shortest_edge": TINY_CLIP_IMAGE}, crop_size=side)
    return CLIPVisionModel(config), processor


def tiny_wan_i2v_pipeline(seed: int = 0) -> WanImageToVideoPipeline:
    """Wan 2.1 I2V: 36 input channels and CLIP image tokens (image_dim 32) in cross-attention."""
    torch.manual_seed(seed)
    encoder, processor = _clip_vision()
    return _eval(
        WanImageToVideoPipeline(
            transformer=_transformer(36, image_dim=32, added_kv_proj_dim=64),
            vae=_vae(),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            image_encoder=encoder,
            image_processor=processor,
            **_text(),
        )
    )


def tiny_wan22_i2v_pipeline(seed: int = 0) -> WanImageToVideoPipeline:
    """Wan 2.2 I2V A14B: two 36-channel experts, boundary 0.9, no image encoder."""
    return _two_experts(WanImageToVideoPipeline, 36, shift=5.0, boundary=0.9, seed=seed)


CONDITIONED_BUILDERS = {
    "wan22": tiny_wan22_pipeline,
    "wan22-ti2v": tiny_wan22_ti2v_pipeline,
    "wan-i2v": tiny_wan_i2v_pipeline,
    "wan22-i2v": tiny_wan22_i2v_pipeline,
}


def save_tiny_conditioned(name: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build the tiny ``name`` pipeline and save it in diffusers' layout (safetensors)."""
    if name not in CONDITIONED_BUILDERS:
        raise ValueError(f"unknown tiny model {name!r}; expected one of {sorted(CONDITIONED_BUILDERS)}")
    out_dir = Path(out_dir)
    CONDITIONED_BUILDERS[name](seed).save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
