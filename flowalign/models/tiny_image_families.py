"""Tiny, offline builders of the newer text-to-image families: FLUX.2 (dev, Klein), Qwen-Image, Z-Image.

Like :mod:`flowalign.models.tiny`, each builder creates the family's real diffusers transformer
and VAE and its real transformers text encoder from small configs with random weights. The
chat-style text encoders (Qwen3, Qwen2.5-VL, Mistral 3) share one tokenizer: a byte-level BPE
with no merges (every UTF-8 byte is a token) plus the chat special tokens, and a small chat
template with the same layout as the released ones. Nothing is downloaded.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM, Qwen3Model

CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# A chat template with the released Qwen layout: "<|im_start|>role\ncontent<|im_end|>\n" per turn,
# the assistant header on add_generation_prompt, and an empty think block unless thinking is on.
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def tiny_chat_tokenizer(cls: type[PreTrainedTokenizerFast] | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (256 byte tokens + chat specials, no merges), padded on the right."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    for tok in CHAT_SPECIALS:
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    cls = cls or Qwen2TokenizerFast
    tok = cls(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=CHAT_SPECIALS[1:],
        padding_side="right",
        model_max_length=4096,
    )
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def _qwen3_config(vocab_size: int, *, layers: int, hidden: int = 16) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden // 2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )


def _tiny_flux2_vae() -> AutoencoderKLFlux2:
    return AutoencoderKLFlux2(
        latent_channels=8,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )


def _randomize_bn(vae: AutoencoderKLFlux2, seed: int) -> AutoencoderKLFlux2:
    """Non-trivial latent batch-norm statistics, so the tests see the normalisation."""
    g = torch.Generator().manual_seed(seed)
    bn = vae.bn
    bn.running_mean.copy_(0.1 * torch.randn(bn.running_mean.shape, generator=g))
    bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=g))
    return vae


def _tiny_flux2_transformer(joint_dim: int, *, guidance_embeds: bool) -> Flux2Transformer2DModel:
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=32,  # 4 x 8 VAE channels (2x2 patchified)
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint_dim,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    )


def _flux2_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # The released FLUX.2 scheduler config: dynamic shifting with mu from the pipeline.
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


def tiny_flux2_klein_pipeline(seed: int = 0) -> Flux2KleinPipeline:
    """FLUX.2 [klein] (base, true CFG) with a 28-layer width-16 Qwen3 text encoder (layers 9, 18, 27 read)."""
    torch.manual_seed(seed)
    tok = tiny_chat_tokenizer()
    text_encoder = Qwen3ForCausalLM(_qwen3_config(len(tok), layers=28))
    from flowalign.models.tiny import _eval

    return _eval(
        Flux2KleinPipeline(
            scheduler=_flux2_scheduler(),
            vae=_randomize_bn(_tiny_flux2_vae(), seed),
            text_encoder=text_encoder,
            tokenizer=tok,
            transformer=_tiny_flux2_transformer(3 * 16, guidance_embeds=False),
            is_distilled=False,
        )
    )


def tiny_z_image_pipeline(seed: int = 0) -> ZImagePipeline:
    """Z-Image with a 3-layer Qwen3 text encoder (the second-to-last hidden state is read)."""
    torch.manual_seed(seed)
    tok = tiny_chat_tokenizer()
    text_encoder = Qwen3Model(_qwen3_config(len(tok), layers=3, hidden=32))
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=32,
        axes_dims=[4, 6, 6],
        axes_lens=[256, 32, 32],
    )
    # Z-Image's released scheduler: static shift 3 (no dynamic shifting).
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False
    )
    from flowalign.models.tiny import _eval, _tiny_vae

    return _eval(
        ZImagePipeline(
            scheduler=scheduler,
            vae=_tiny_vae(),
            text_encoder=text_encoder,
            tokenizer=tok,
            transformer=transformer,
        )
    )


TINY_IMAGE_BUILDERS = {
    "flux2-klein": tiny_flux2_klein_pipeline,
    "z-image": tiny_z_image_pipeline,
}
"""Family name -> tiny builder; merged into :data:`flowalign.models.tiny.TINY_BUILDERS`."""
