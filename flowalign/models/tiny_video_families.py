"""Tiny, offline builders of the newer text-to-video families: HunyuanVideo 1.5 and LTX-2.

Like :mod:`flowalign.models.tiny`, each builder creates the family's real diffusers transformer,
VAE and text encoders (transformers' Qwen2.5-VL + ByT5 for HunyuanVideo 1.5, Gemma 3 + the text
connectors for LTX-2) from small configs with random weights. The chat-style encoders get a
byte-level BPE tokenizer whose merges are learned from the family's fixed prompt text, so any
prompt still encodes (by byte fallback). Nothing is downloaded.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo15,
    ClassifierFreeGuidance,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
)
from transformers import (
    ByT5Tokenizer,
    PreTrainedTokenizerFast,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLTextModel,
    T5Config,
    T5EncoderModel,
)

_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""The Qwen chat layout, ``<|im_start|>role\\ncontent<|im_end|>\\n`` per turn."""


def _bpe_tokenizer(corpus: str, specials: list[str], **kwargs) -> PreTrainedTokenizerFast:
    """Byte-level BPE: the 256 byte tokens, ``specials`` and merges learned from ``corpus``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator([corpus], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, **kwargs)


def _eval(pipe):
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------- HunyuanVideo 1.5
def _hunyuan15_tokenizer() -> PreTrainedTokenizerFast:
    from transformers import Qwen2TokenizerFast

    system = inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters["system_message"]
    corpus = "system\nuser\nassistant\n" + system.default  # the fixed prefix: learned as whole words
    base = _bpe_tokenizer(corpus, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = Qwen2TokenizerFast(
        tokenizer_object=base.backend_tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        padding_side="right",
        model_max_length=2048,
    )
    tok.chat_template = _CHAT_TEMPLATE
    return tok


def tiny_hunyuan_video15_pipeline(seed: int = 0) -> HunyuanVideo15Pipeline:
    """HunyuanVideo 1.5 T2V: 2-layer Qwen2.5-VL text model + 1-layer ByT5, 16x spatial / 4x temporal VAE."""
    torch.manual_seed(seed)
    tok = _hunyuan15_tokenizer()
    text_encoder = Qwen2_5_VLTextModel(
        Qwen2_5_VLTextConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=2048,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    byt5_tok = ByT5Tokenizer()
    byt5 = T5EncoderModel(
        T5Config(
            vocab_size=len(byt5_tok),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
        )
    )
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=2 * 8 + 1,
        out_channels=8,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        text_embed_dim=32,
        text_embed_2_dim=32,
        image_embed_dim=16,
        rope_axes_dim=(4, 6, 6),
        target_size=64,
        task_type="t2v",
    )
    vae = AutoencoderKLHunyuanVideo15(
        latent_channels=8,
        block_out_channels=(8, 8, 16, 16, 16),
        layers_per_block=1,
        spatial_compression_ratio=16,
        temporal_compression_ratio=4,
    )
    return _eval(
        HunyuanVideo15Pipeline(
            text_encoder=text_encoder,
            tokenizer=tok,
            transformer=transformer,
            vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
            text_encoder_2=byt5,
            tokenizer_2=byt5_tok,
            guider=ClassifierFreeGuidance(guidance_scale=6.0),
        )
    )


TINY_VIDEO_BUILDERS = {"hunyuan_video15": tiny_hunyuan_video15_pipeline}
"""Family name -> tiny builder, merged into :data:`flowalign.models.tiny.TINY_BUILDERS`."""
