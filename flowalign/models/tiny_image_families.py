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
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE as FLUX2_SYSTEM_MESSAGE
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PixtralImageProcessor,
    PixtralProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
)

from flowalign.models.tiny_parts import eval_pipeline as _eval
from flowalign.models.tiny_parts import qwen25_vl_text_config, tiny_image_vae

CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
IMAGE_SPECIALS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]  # Pixtral's image tokens (FLUX.2 [dev]'s processor)

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


# The released chat layout's role words and the families' fixed system prompts (Qwen-Image's,
# FLUX.2 [dev]'s): the tiny tokenizer learns them as whole words, so Qwen-Image's prefix is 34
# tokens, as with the released tokenizer (the pipeline drops exactly 34), and FLUX.2's system
# message leaves room for the prompt in a short test sequence.
CHAT_CORPUS = (
    "system\nuser\nassistant\nDescribe the image by detailing the color, shape, size, texture, quantity, "
    "text, spatial relationships of the objects and background:\n" + FLUX2_SYSTEM_MESSAGE
)


def tiny_chat_tokenizer(
    cls: type[PreTrainedTokenizerFast] | None = None,
    *,
    corpus: str = CHAT_CORPUS,
    extra_specials: tuple[str, ...] = (),
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer: 256 byte tokens, the chat specials (then ``extra_specials``) and the
    words of ``corpus`` (BPE trained on that text); any other text falls back to bytes. Padded right."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,  # more than the corpus can fill: training stops when every word is one token
        special_tokens=CHAT_SPECIALS + IMAGE_SPECIALS + list(extra_specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator([corpus], trainer=trainer)
    cls = cls or Qwen2TokenizerFast
    tok = cls(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=CHAT_SPECIALS[1:] + IMAGE_SPECIALS + list(extra_specials),
        padding_side="right",
        model_max_length=4096,
    )
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def _tiny_flux_vae() -> AutoencoderKL:
    """The 16-channel 8x image VAE with FLUX.1's scale and shift (Z-Image uses FLUX.1's VAE)."""
    return tiny_image_vae(16, shift_factor=0.1159, scaling_factor=0.3611)


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


def _mistral3(tok: PreTrainedTokenizerFast, image_token_id: int, hidden: int = 16):
    """A 30-layer width-16 Mistral 3 (hidden states 10, 20, 30 are read) with a 1-layer Pixtral tower."""
    config = Mistral3Config(
        text_config=dict(
            model_type="mistral",
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=30,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=hidden // 2,
            max_position_embeddings=1024,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            model_type="pixtral",
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            head_dim=8,
            patch_size=14,
            image_size=56,
        ),
        image_token_index=image_token_id,
    )
    return Mistral3ForConditionalGeneration(config)


def tiny_flux2_pipeline(seed: int = 0) -> Flux2Pipeline:
    """FLUX.2 [dev] (guidance-distilled) with a tiny Mistral 3 text encoder behind a Pixtral processor."""
    torch.manual_seed(seed)
    tok = tiny_chat_tokenizer()
    processor = PixtralProcessor(
        image_processor=PixtralImageProcessor(),
        tokenizer=tok,
        chat_template=QWEN_CHAT_TEMPLATE,
        patch_size=14,
    )
    return _eval(
        Flux2Pipeline(
            scheduler=_flux2_scheduler(),
            vae=_randomize_bn(_tiny_flux2_vae(), seed),
            text_encoder=_mistral3(tok, processor.image_token_id),
            tokenizer=processor,
            transformer=_tiny_flux2_transformer(3 * 16, guidance_embeds=True),
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
    return _eval(
        ZImagePipeline(
            scheduler=scheduler,
            vae=_tiny_flux_vae(),
            text_encoder=text_encoder,
            tokenizer=tok,
            transformer=transformer,
        )
    )


def qwen25_vl(
    tok: PreTrainedTokenizerFast, hidden: int = 32, **token_ids: int
) -> Qwen2_5_VLForConditionalGeneration:
    """A 2-layer Qwen2.5-VL (multimodal RoPE sections sum to head_dim / 2) with a 1-block vision tower.

    The tower has patch 14 and a 2x2 merge; ``token_ids`` (``image_token_id``,
    ``vision_start_token_id``, ...) point the model at a tokenizer's vision tokens where it has them.
    """
    specials = dict(bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.eos_token_id)
    config = Qwen2_5_VLConfig(
        text_config=qwen25_vl_text_config(tok, hidden=hidden, **specials),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=hidden,
            fullatt_block_indexes=[0],
        ),
        vocab_size=len(tok),
        **token_ids,
        **specials,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def qwen_image_networks(seed: int) -> dict:
    """The tiny Qwen-Image transformer and single-frame VAE with the released scheduler config.

    The VAE's per-channel latent statistics are drawn from ``seed``; the weights from the global
    generator, which the caller seeds (the Qwen-Image and Qwen-Image-Edit builders share these parts).
    """
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
    # The released Qwen-Image scheduler config (Qwen-Image-Edit's is the same): exponential dynamic
    # shift, stretched to a 0.02 terminal.
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
    return dict(scheduler=scheduler, vae=vae, transformer=transformer)


def tiny_qwen_image_pipeline(seed: int = 0) -> QwenImagePipeline:
    """Qwen-Image with a tiny Qwen2.5-VL text encoder and a tiny single-frame Qwen-Image VAE."""
    torch.manual_seed(seed)
    tok = tiny_chat_tokenizer()
    networks = qwen_image_networks(seed)
    return _eval(QwenImagePipeline(text_encoder=qwen25_vl(tok), tokenizer=tok, **networks))


TINY_IMAGE_BUILDERS = {
    "flux2": tiny_flux2_pipeline,
    "flux2-klein": tiny_flux2_klein_pipeline,
    "z-image": tiny_z_image_pipeline,
    "qwen-image": tiny_qwen_image_pipeline,
}
"""Family name -> tiny builder; merged into :data:`flowalign.models.tiny.TINY_BUILDERS`."""
