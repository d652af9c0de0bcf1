"""Tiny, offline builders of Qwen-Image-Edit and Qwen-Image-Edit-Plus (random weights, real classes).

Like :mod:`flowalign.models.tiny_image_families`: the Qwen-Image transformer, VAE and a 2-layer
Qwen2.5-VL, here with a working vision tower, because the edit pipelines show the condition image
to the text encoder. The processor is the real ``Qwen2VLProcessor``, built from parts made here:

- ``Qwen2VLImageProcessor`` and ``Qwen2VLVideoProcessor`` from their defaults (patch 14, merge 2,
  the released normalisation constants are the classes' defaults), nothing read from the hub;
- the byte-level BPE chat tokenizer of the other tiny families plus the vision specials
  (``<|vision_start|>``, ``<|image_pad|>``, ...), trained also on the edit pipelines' system prompt
  so that the prefix the pipelines drop is 64 tokens, as with the released tokenizer.

The text encoder's ``image_token_id`` / ``vision_start_token_id`` point at the tiny tokenizer's ids.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImageTransformer2DModel,
)
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from flowalign.models.tiny_image_families import CHAT_CORPUS, QWEN_CHAT_TEMPLATE, tiny_chat_tokenizer
from flowalign.models.tiny_parts import eval_pipeline as _eval

VISION_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

EDIT_SYSTEM_PROMPT = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), "
    "then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate."
)
"""The system prompt of diffusers' Qwen-Image-Edit pipelines (learned as words by the tiny tokenizer)."""


def tiny_vl_processor() -> Qwen2VLProcessor:
    """``Qwen2VLProcessor`` over the tiny chat tokenizer with the vision specials (no file read)."""
    tok = tiny_chat_tokenizer(corpus=CHAT_CORPUS + "\n" + EDIT_SYSTEM_PROMPT, extra_specials=VISION_SPECIALS)
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def _qwen25_vl_with_vision(
    tok: PreTrainedTokenizerFast, hidden: int = 32
) -> Qwen2_5_VLForConditionalGeneration:
    """A 2-layer Qwen2.5-VL whose 1-block vision tower (patch 14, 2x2 merge) reads the condition image."""
    ids = {
        name: tok.convert_tokens_to_ids(token)
        for name, token in zip(
            ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
            VISION_SPECIALS,
            strict=True,
        )
    }
    specials = dict(bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.eos_token_id)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=2048,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            pad_token_id=tok.pad_token_id,
            **specials,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=hidden,
            fullatt_block_indexes=[0],
        ),
        vocab_size=len(tok),
        **ids,
        **specials,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _components(seed: int) -> dict:
    torch.manual_seed(seed)
    processor = tiny_vl_processor()
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    g = torch.Generator().manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=(0.1 * torch.randn(16, generator=g)).tolist(),
        latents_std=(0.5 + torch.rand(16, generator=g)).tolist(),
    )
    # The released Qwen-Image-Edit scheduler config (the same as Qwen-Image's).
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    return dict(
        scheduler=scheduler,
        vae=vae,
        text_encoder=_qwen25_vl_with_vision(processor.tokenizer),
        tokenizer=processor.tokenizer,
        processor=processor,
        transformer=transformer,
    )


def tiny_qwen_image_edit_plus_pipeline(seed: int = 0) -> QwenImageEditPlusPipeline:
    """Qwen-Image-Edit-Plus (2509 layout) with a tiny Qwen2.5-VL that sees the condition image."""
    return _eval(QwenImageEditPlusPipeline(**_components(seed)))


def tiny_qwen_image_edit_pipeline(seed: int = 0) -> QwenImageEditPipeline:
    """Qwen-Image-Edit (first release) with the same tiny parts."""
    return _eval(QwenImageEditPipeline(**_components(seed)))


TINY_EDIT_BUILDERS = {
    "qwen-image-edit-plus": tiny_qwen_image_edit_plus_pipeline,
    "qwen-image-edit": tiny_qwen_image_edit_pipeline,
}
"""Family name -> tiny builder; merged into :data:`flowalign.models.tiny.TINY_BUILDERS`."""
