"""Parts the tiny offline builders share: the 8x image VAE, the Qwen2.5-VL text config, the eval switch."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from transformers import PreTrainedTokenizerBase


def tiny_image_vae(latent_channels: int, *, shift_factor: float, scaling_factor: float) -> AutoencoderKL:
    """A four-level ``AutoencoderKL`` of 8 to 32 channels with the family's latent scale and shift."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    )


def qwen25_vl_text_config(
    tok: PreTrainedTokenizerBase, *, hidden: int = 32, layers: int = 2, **token_ids: int
) -> dict:
    """The text half of a tiny Qwen2.5-VL: ``layers`` layers of width ``hidden``, 2 heads, 1 KV head.

    The multimodal RoPE sections 2 + 3 + 3 sum to half the head dim (16 at width 32); the pad id is
    the tokenizer's, the other special ids (``bos_token_id``, ``eos_token_id``) come in ``token_ids``.
    """
    return dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        pad_token_id=tok.pad_token_id,
        **token_ids,
    )


def eval_pipeline(pipe):
    """Eval mode (components built from config start in train mode) and no progress bars."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
