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
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
)
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from flowalign.models.tiny_image_families import (
    CHAT_CORPUS,
    QWEN_CHAT_TEMPLATE,
    qwen25_vl,
    qwen_image_networks,
    tiny_chat_tokenizer,
)
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


def _vision_token_ids(tok: PreTrainedTokenizerFast) -> dict[str, int]:
    """The Qwen2.5-VL config's vision token ids, pointing at the tiny tokenizer's vision specials."""
    return {
        name: tok.convert_tokens_to_ids(token)
        for name, token in zip(
            ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
            VISION_SPECIALS,
            strict=True,
        )
    }


def _components(seed: int) -> dict:
    """Qwen-Image's tiny networks and a 2-layer Qwen2.5-VL whose vision tower reads the condition image."""
    torch.manual_seed(seed)
    processor = tiny_vl_processor()
    networks = qwen_image_networks(seed)
    tok = processor.tokenizer
    return dict(
        text_encoder=qwen25_vl(tok, **_vision_token_ids(tok)), tokenizer=tok, processor=processor, **networks
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
