"""Tiny, offline builders of every supported family (random weights, real diffusers classes).

Tests, examples and CPU benchmarks use these: each builder creates the family's real
transformer, VAE, text encoders and tokenizers from small configs (tokenizers from the CLIP BPE
merges that ship inside ``open_clip``, nothing downloaded), and ``save_tiny_model`` writes the
whole pipeline in diffusers' layout so it loads back through the same ``from_pretrained`` code
users call with hub ids.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

from flowalign.models.tiny_parts import eval_pipeline as _eval
from flowalign.models.tiny_parts import tiny_image_vae

TINY_SD3_TRANSFORMER = dict(
    sample_size=32,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=64,
    caption_projection_dim=64,
    pooled_projection_dim=64,
    pos_embed_max_size=64,
)
"""The tiny SD3 transformer's configuration (also used by the CPU benchmarks)."""

NUM_MERGES = 1000  # 1514 tokens: small embedding tables, every text still encodes by byte fallback


@lru_cache(maxsize=1)
def _clip_bpe() -> tuple[list[str], list[tuple[str, str]]]:
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1][:NUM_MERGES]]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return vocab, merges


def tiny_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A real CLIP BPE tokenizer with the first 1000 merges of the released CLIP vocabulary."""
    vocab, merges = _clip_bpe()
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)}, merges=list(merges), model_max_length=model_max_length
    )


def tiny_t5_tokenizer() -> T5Tokenizer:
    """A Unigram (sentencepiece-style) tokenizer for the T5/UMT5 slots, built from the CLIP merges."""
    vocab, merges = _clip_bpe()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    seen = {p for p, _ in pieces}
    for token in vocab[512:-2]:
        piece = ("\u2581" + token[:-4]) if token.endswith("</w>") else token
        if piece not in seen and piece.strip("\u2581"):
            seen.add(piece)
            pieces.append((piece, -float(len(pieces)) / 100))
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-":
        for piece in (ch, "\u2581" + ch):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -50.0))
    return T5Tokenizer(vocab=pieces, extra_ids=0)


_TINY_T5 = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8)
"""The tiny T5 / UMT5 text encoder of the FLUX and Wan test models (only the vocabulary differs)."""


def _clip_text_config(vocab_size: int, hidden: int = 32, projection: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=projection,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def _tiny_vae(latent_channels: int = 16) -> AutoencoderKL:
    return tiny_image_vae(latent_channels, shift_factor=0.0609, scaling_factor=1.5035)  # SD3's


def tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """SD3 with two tiny CLIP encoders, no T5 (text_encoder_3=None), 16-channel 8x VAE."""
    torch.manual_seed(seed)
    tok = tiny_clip_tokenizer()
    transformer = SD3Transformer2DModel(**TINY_SD3_TRANSFORMER)
    return _eval(
        StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_tiny_vae(),
            text_encoder=CLIPTextModelWithProjection(_clip_text_config(len(tok))),
            tokenizer=tok,
            text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(len(tok))),
            tokenizer_2=tiny_clip_tokenizer(),
            text_encoder_3=None,
            tokenizer_3=None,
        )
    )


def tiny_flux_pipeline(seed: int = 0, *, guidance_embeds: bool = True) -> FluxPipeline:
    """FLUX with a tiny CLIP + T5, guidance embedding on (like FLUX.1-dev) unless told otherwise."""
    torch.manual_seed(seed)
    clip_tok = tiny_clip_tokenizer()
    t5_tok = tiny_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=64,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), **_TINY_T5))
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return _eval(
        FluxPipeline(
            transformer=transformer,
            scheduler=scheduler,
            vae=_tiny_vae(),
            text_encoder=CLIPTextModel(_clip_text_config(len(clip_tok))),
            tokenizer=clip_tok,
            text_encoder_2=t5,
            tokenizer_2=t5_tok,
        )
    )


def tiny_wan_pipeline(seed: int = 0) -> WanPipeline:
    """Wan 2.1-style T2V with a tiny UMT5 encoder and a tiny Wan VAE (4x temporal, 8x spatial)."""
    torch.manual_seed(seed)
    tok = tiny_t5_tokenizer()
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=16,
        out_channels=16,
        text_dim=64,
        freq_dim=64,
        ffn_dim=128,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), **_TINY_T5))
    return _eval(
        WanPipeline(
            transformer=transformer,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tok,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        )
    )


TINY_BUILDERS = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline, "wan": tiny_wan_pipeline}


def save_tiny_model(family: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build the tiny ``family`` pipeline and save it in diffusers' layout (safetensors)."""
    if family not in TINY_BUILDERS:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(TINY_BUILDERS)}")
    out_dir = Path(out_dir)
    TINY_BUILDERS[family](seed).save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


# The newer text-to-image families keep their builders in their own module.
from flowalign.models.tiny_image_families import TINY_IMAGE_BUILDERS  # noqa: E402

TINY_BUILDERS.update(TINY_IMAGE_BUILDERS)

# The newer text-to-video families keep their builders in their own module.
from flowalign.models.tiny_video_families import TINY_VIDEO_BUILDERS  # noqa: E402

TINY_BUILDERS.update(TINY_VIDEO_BUILDERS)

# The image-edit families keep their builders in their own module.
from flowalign.models.tiny_qwen_edit import TINY_EDIT_BUILDERS  # noqa: E402

TINY_BUILDERS.update(TINY_EDIT_BUILDERS)
