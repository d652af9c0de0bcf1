"""Published configurations of the text encoders the pipelines load (their ``text_encoder*/config.json``).

Written out so that planning needs no download; :mod:`flowalign.planning.architectures` counts their
parameters exactly on the ``meta`` device.
"""

from __future__ import annotations

from typing import Any

_CLIP_L = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
_CLIP_G = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
_T5_XXL = {
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "vocab_size": 32128,
    "feed_forward_proj": "gated-gelu",
}

# The chat LLMs of the newer image families, from their checkpoints' text_encoder/config.json
# (Qwen3-4B in FLUX.2 [klein] 4B and Z-Image, Qwen3-8B in [klein] 9B, Qwen2.5-VL-7B-Instruct in
# Qwen-Image, Mistral-Small-3.1-24B in FLUX.2 [dev]); the counts land on the published sizes.
_QWEN3 = {"vocab_size": 151936, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
          "head_dim": 128, "max_position_embeddings": 40960}  # fmt: skip
_QWEN25_VL_7B = {
    "text_config": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                    "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False},
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                      "out_hidden_size": 3584, "fullatt_block_indexes": [7, 15, 23, 31]},
    "vocab_size": 152064,
    "tie_word_embeddings": False,
}  # fmt: skip
_MISTRAL3_24B = {
    "text_config": {"model_type": "mistral", "vocab_size": 131072, "hidden_size": 5120, "intermediate_size": 32768,
                    "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                    "tie_word_embeddings": False},
    "vision_config": {"model_type": "pixtral", "hidden_size": 1024, "intermediate_size": 4096,
                      "num_hidden_layers": 24, "num_attention_heads": 16, "head_dim": 64, "patch_size": 14,
                      "image_size": 1540},
    "spatial_merge_size": 2,
    "tie_word_embeddings": False,
}  # fmt: skip

TEXT_ENCODERS: dict[str, dict[str, Any]] = {
    "clip-l": {"class": "CLIPTextModelWithProjection", "config": _CLIP_L},
    "clip-l-noproj": {"class": "CLIPTextModel", "config": _CLIP_L},
    "clip-g": {"class": "CLIPTextModelWithProjection", "config": _CLIP_G},
    "t5-xxl": {"class": "T5EncoderModel", "config": _T5_XXL},
    "umt5-xxl": {"class": "UMT5EncoderModel", "config": {**_T5_XXL, "vocab_size": 256384}},
    "qwen3-4b": {
        "class": "Qwen3ForCausalLM",
        "config": {**_QWEN3, "hidden_size": 2560, "intermediate_size": 9728, "tie_word_embeddings": True},
    },
    "qwen3-4b-base": {  # Z-Image loads the bare model (no LM head; tied, so the same weights)
        "class": "Qwen3Model",
        "config": {**_QWEN3, "hidden_size": 2560, "intermediate_size": 9728, "tie_word_embeddings": True},
    },
    "qwen3-8b": {
        "class": "Qwen3ForCausalLM",
        "config": {**_QWEN3, "hidden_size": 4096, "intermediate_size": 12288, "tie_word_embeddings": False},
    },
    "qwen2.5-vl-7b": {"class": "Qwen2_5_VLForConditionalGeneration", "config": _QWEN25_VL_7B},
    "mistral-small-3.1": {"class": "Mistral3ForConditionalGeneration", "config": _MISTRAL3_24B},
}
