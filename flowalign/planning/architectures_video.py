"""Published configurations of HunyuanVideo 1.5 and LTX-2, merged into :mod:`flowalign.planning.architectures`.

Sources: the transformer, VAE and connector values are the constructor defaults of the diffusers 0.42
classes, which diffusers took from the released checkpoints (``HunyuanVideo15Transformer3DModel``:
the HunyuanVideo-1.5 480p/720p T2V transformer, 8.33B parameters meta-built, the model card's
"8.3B"; ``LTX2VideoTransformer3DModel``: LTX-2's joint audio-video transformer, 18.88B meta-built,
the "19B" of the model card, of which the audio stream and the audio-video cross-attention are about
5.75B); the text encoders are the published ``config.json`` of Qwen2.5-VL-7B-Instruct (its text
model), ByT5-small (the glyph encoder, width 1472 as the transformer's ``text_embed_2_dim``) and
Gemma-3-12B (text model and SigLIP tower: LTX-2 loads ``Gemma3ForConditionalGeneration``).

The planner's text-encoding peak reads the language models; LTX-2's stack of Gemma's 49 hidden states
(49 x 3840 values per token, about 0.4 GB per prompt at 1024 tokens in bf16) is not in it.

flowalign runs LTX-2's video stream only, but the joint transformer is loaded whole (the audio
branch runs on one placeholder token), so its weights count in full.
"""

from __future__ import annotations

from typing import Any

from flowalign.planning.text_encoders import _QWEN25_VL_7B  # the same Qwen2.5-VL-7B-Instruct checkpoint

_BYT5_SMALL = {
    "vocab_size": 384,
    "d_model": 1472,
    "d_ff": 3584,
    "d_kv": 64,
    "num_heads": 6,
    "num_layers": 12,
    "feed_forward_proj": "gated-gelu",
}
_GEMMA3_12B = {
    "text_config": {
        "vocab_size": 262208,
        "hidden_size": 3840,
        "intermediate_size": 15360,
        "num_hidden_layers": 48,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 256,
        "sliding_window": 1024,
    },
    "vision_config": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "image_size": 896,
        "patch_size": 14,
    },
    "mm_tokens_per_image": 256,
}

VIDEO_TEXT_ENCODERS: dict[str, dict[str, Any]] = {
    "qwen2.5-vl-7b-text": {"class": "Qwen2_5_VLTextModel", "config": _QWEN25_VL_7B["text_config"]},
    "byt5-small-glyph": {"class": "T5EncoderModel", "config": _BYT5_SMALL},
    "gemma-3-12b": {"class": "Gemma3ForConditionalGeneration", "config": _GEMMA3_12B},
    # LTX-2's text connectors sit between Gemma and the transformer (trained with it, frozen here)
    "ltx2-connectors": {"class": "LTX2TextConnectors", "config": {}},
}

HUNYUAN_VIDEO15_TRANSFORMER = {
    "in_channels": 65,  # 32 latent + 32 condition-latent channels + 1 condition mask
    "out_channels": 32,
    "num_attention_heads": 16,
    "attention_head_dim": 128,
    "num_layers": 54,
    "num_refiner_layers": 2,
    "mlp_ratio": 4.0,
    "patch_size": 1,
    "patch_size_t": 1,
    "text_embed_dim": 3584,
    "text_embed_2_dim": 1472,
    "image_embed_dim": 1152,
    "rope_axes_dim": [16, 56, 56],
}
LTX2_TRANSFORMER = {
    "in_channels": 128,
    "out_channels": 128,
    "patch_size": 1,
    "patch_size_t": 1,
    "num_attention_heads": 32,
    "attention_head_dim": 128,
    "cross_attention_dim": 4096,
    "audio_in_channels": 128,
    "audio_out_channels": 128,
    "audio_num_attention_heads": 32,
    "audio_attention_head_dim": 64,
    "audio_cross_attention_dim": 2048,
    "num_layers": 48,
    "caption_channels": 3840,
}

VIDEO_TRANSFORMER_CLASS = {
    "hunyuan_video15": "HunyuanVideo15Transformer3DModel",
    "ltx2": "LTX2VideoTransformer3DModel",
}
VIDEO_CONFIG_CLASS = {
    "Qwen2_5_VLTextModel": "Qwen2_5_VLTextConfig",
    "Gemma3ForConditionalGeneration": "Gemma3Config",
}
VIDEO_HUB_IDS = {
    "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v": "hunyuan-video-1.5",
    "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-720p_t2v": "hunyuan-video-1.5",
    "Lightricks/LTX-2": "ltx-2",
}


def video_architectures(architecture_class) -> list:
    """The :class:`~flowalign.planning.architectures.Architecture` entries of the two families."""
    return [
        architecture_class(
            "hunyuan-video-1.5",
            "hunyuan_video15",
            HUNYUAN_VIDEO15_TRANSFORMER,
            ("qwen2.5-vl-7b-text", "byt5-small-glyph"),
            text_tokens=1000 + 256 + 729,  # Qwen tokens + ByT5 tokens + the (zero, masked) image tokens
            vae={
                "class": "AutoencoderKLHunyuanVideo15",
                "config": {"block_out_channels": [128, 256, 512, 1024, 1024]},
            },
            spatial_stride=16,
            temporal_stride=4,
            latent_channels=32,
        ),
        architecture_class(
            "ltx-2",
            "ltx2",
            LTX2_TRANSFORMER,
            ("gemma-3-12b", "ltx2-connectors"),
            text_tokens=1024,  # the connectors' output, padding replaced by registers
            vae={"class": "AutoencoderKLLTX2Video", "config": {"block_out_channels": [256, 512, 1024, 2048]}},
            spatial_stride=32,
            temporal_stride=8,
            latent_channels=128,
        ),
    ]
