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
    LTX2Pipeline,
    LTX2VideoTransformer3DModel,
)
from diffusers.models.autoencoders import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video
from diffusers.pipelines.ltx2 import LTX2TextConnectors, LTX2Vocoder
from transformers import (
    ByT5Tokenizer,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    GemmaTokenizerFast,
    PreTrainedTokenizerFast,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLTextModel,
    T5Config,
    T5EncoderModel,
)

from flowalign.models.tiny_parts import eval_pipeline as _eval
from flowalign.models.tiny_parts import qwen25_vl_text_config

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
    text_config = qwen25_vl_text_config(
        tok, layers=3, bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
    )
    text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(**text_config))
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


# ---------------------------------------------------------------------- LTX-2
_LTX2_TEXT = (
    32  # Gemma hidden size = the connectors' width (heads x head_dim) = the transformer's caption_channels
)
_LTX2_LAYERS = 2


def _gemma3(tok: PreTrainedTokenizerFast) -> Gemma3ForConditionalGeneration:
    """A 2-layer Gemma 3 with a 1-layer SigLIP tower (the released encoder is multimodal; LTX-2 reads its text states)."""
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = Gemma3Config(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=_LTX2_TEXT,
            intermediate_size=2 * _LTX2_TEXT,
            num_hidden_layers=_LTX2_LAYERS,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=2048,
            sliding_window=64,
            **ids,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        mm_tokens_per_image=4,
        boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
        **ids,
    )
    return Gemma3ForConditionalGeneration(config)


def _ltx2_tokenizer() -> PreTrainedTokenizerFast:
    specials = [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<start_of_image>",
        "<end_of_image>",
        "<image_soft_token>",
    ]
    base = _bpe_tokenizer("a video of the red ball rolls left sign that reads", specials)
    tok = GemmaTokenizerFast(
        tokenizer_object=base.backend_tokenizer,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        additional_special_tokens=specials[4:],
        padding_side="left",
        model_max_length=1024,
    )
    return tok


def _ltx2_networks() -> dict:
    """The tiny LTX-2 connectors, transformer, video and audio VAEs and vocoder (random weights)."""
    # The video and audio connectors are alike: one attention layer, 2 heads of 16, 8 registers.
    connector = dict(num_attention_heads=2, attention_head_dim=16, num_layers=1, num_learnable_registers=8)
    connectors = LTX2TextConnectors(
        caption_channels=_LTX2_TEXT,
        text_proj_in_factor=_LTX2_LAYERS + 1,
        **{
            f"{stream}_connector_{key}": value
            for stream in ("video", "audio")
            for key, value in connector.items()
        },
    )
    # The joint transformer's two streams: video (16 latent channels) and audio (8), 2 heads each.
    video = dict(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32
    )
    audio = dict(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16
    )
    transformer = LTX2VideoTransformer3DModel(
        num_layers=2,
        caption_channels=_LTX2_TEXT,
        **video,
        **{f"audio_{key}": value for key, value in audio.items()},
    )
    vae = AutoencoderKLLTX2Video(
        latent_channels=16,
        block_out_channels=(8, 16, 32, 64),
        decoder_block_out_channels=(8, 16, 32),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, True),
        decoder_spatio_temporal_scaling=(True, True, True),
        decoder_inject_noise=(False, False, False, False),
        upsample_residual=(True, True, True),
        upsample_factor=(2, 2, 2),
        patch_size=4,
        spatial_compression_ratio=32,  # patch 4 x three spatial 2x stages, as the released VAE
        temporal_compression_ratio=8,
    )
    with torch.no_grad():  # non-trivial per-channel latent statistics, so the normalisation is exercised
        vae.latents_mean.normal_(0.0, 0.2)
        vae.latents_std.uniform_(0.5, 1.5)
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=8, ch_mult=(1, 2), num_res_blocks=1, latent_channels=2, mel_bins=16, resolution=16
    )
    vocoder = LTX2Vocoder(
        in_channels=2 * 16,
        hidden_channels=16,
        upsample_kernel_sizes=[4, 4],
        upsample_factors=[2, 2],
        resnet_kernel_sizes=[3],
        resnet_dilations=[[1]],
        output_sampling_rate=16000,
    )
    return dict(connectors=connectors, transformer=transformer, vae=vae, audio_vae=audio_vae, vocoder=vocoder)


def tiny_ltx2_pipeline(seed: int = 0) -> LTX2Pipeline:
    """LTX-2 with a tiny Gemma 3 + text connectors, a 32x spatial / 8x temporal video VAE and a tiny audio stream."""
    torch.manual_seed(seed)
    tok = _ltx2_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )
    return _eval(
        LTX2Pipeline(
            scheduler=scheduler,
            text_encoder=_gemma3(tok),
            tokenizer=tok,
            **_ltx2_networks(),
        )
    )


TINY_VIDEO_BUILDERS = {"hunyuan_video15": tiny_hunyuan_video15_pipeline, "ltx2": tiny_ltx2_pipeline}
"""Family name -> tiny builder, merged into :data:`flowalign.models.tiny.TINY_BUILDERS`."""
