"""The toy family: tiny text-conditioned flow transformers in pixel space, a regular diffusers family.

Images use a small ``SD3Transformer2DModel`` and videos a small ``WanTransformer3DModel``, both on
pixels scaled to [-1, 1] (no VAE: the "latent" is the picture itself), conditioned by a small
``CLIPTextModelWithProjection`` trained jointly with a word-level tokenizer (built with the
``tokenizers`` library from the toy captions). The folder layout is diffusers' own
(model_index.json naming ``ToyFlowPipeline``), so it saves, loads, LoRA-adapts and trains through
the same code as SD3/FLUX/Wan.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    ModelMixin,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)
from diffusers.models.embeddings import get_3d_sincos_pos_embed
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

from flowalign.flow import t_to_timesteps
from flowalign.models.base import FlowModel, PromptEmbeds, net_dtype, register_family

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
TOY_MAX_TOKENS = 16


def build_word_tokenizer(corpus: list[str], *, max_length: int = TOY_MAX_TOKENS) -> PreTrainedTokenizerFast:
    """Train a word-level tokenizer on ``corpus`` (lower-cased, split on spaces and punctuation)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer

    tok = Tokenizer(WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, WordLevelTrainer(special_tokens=[PAD, UNK, BOS, EOS]))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=max_length,
    )


class PatchEmbedWithPositions(nn.Conv3d):
    """Wan's patch embedding followed by a fixed 3D sin-cos position embedding added to every token.

    The embedding is CogVideoX's (a quarter of the channels for the frame index, the rest for the 2D
    grid), computed for the grid of each input, so it has no weights and any size works.
    """

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        _, channels, frames, height, width = out.shape
        pos = get_3d_sincos_pos_embed(channels, (width, height), frames, device=out.device)  # [F, H*W, C]
        return out + pos.reshape(frames, height, width, channels).permute(3, 0, 1, 2).to(out.dtype)


class ToyWanTransformer3DModel(WanTransformer3DModel):
    """``WanTransformer3DModel`` whose tokens also carry their absolute frame, row and column.

    Wan positions tokens only through RoPE in self-attention, which is relative: the network is
    translation-equivariant up to the frame's borders, and the toy video base (3,000 steps) never
    learnt where "the top left" is (held-out position accuracy 0.16, chance 0.20; 0.996 with these
    positions). SD3 adds absolute sin-cos positions to its patches; this adds them to Wan's. Weights,
    config and state-dict keys are Wan's own (the embedding has no parameters), so LoRA, saving and
    loading work unchanged.
    """

    @functools.wraps(WanTransformer3DModel.__init__)  # diffusers reads the config keys off this signature
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        conv = self.patch_embedding
        self.patch_embedding = PatchEmbedWithPositions(
            conv.in_channels, conv.out_channels, kernel_size=conv.kernel_size, stride=conv.stride
        )


class ToyFlowPipeline(DiffusionPipeline):
    """Container of the toy family's components (diffusers layout); generation goes through FlowPipeline."""

    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(
        self,
        # diffusers' loader finds a component's loading methods through the base classes in the
        # component's own module: ModelMixin must be importable from here for ToyWanTransformer3DModel
        transformer: ModelMixin,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: PreTrainedTokenizerFast,
        scheduler: FlowMatchEulerDiscreteScheduler,
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
        )


@register_family("ToyFlowPipeline")
class ToyModel(FlowModel):
    """Toy adapter. Images: x ``[B, 3, H, W]``; videos: x ``[B, 3, T, H, W]``; pixels in [-1, 1]."""

    family = "toy"
    pipeline_class = ToyFlowPipeline
    default_num_inference_steps = 20
    default_guidance_scale = 3.0
    default_height = 32
    default_width = 32

    @property
    def is_video(self) -> bool:  # type: ignore[override]
        return isinstance(self.transformer, WanTransformer3DModel)

    @property
    def default_num_frames(self) -> int:  # type: ignore[override]
        return 8 if self.is_video else 1

    @property
    def patch(self) -> tuple[int, int]:
        """(temporal, spatial) patch size."""
        p = self.transformer.config.patch_size
        return (p[0], p[1]) if isinstance(p, (tuple, list)) else (1, p)

    def encode_prompt(self, prompts, *, negative_prompts=None, with_uncond=False):
        def encode(texts: list[str]) -> PromptEmbeds:
            tok = self.pipe.tokenizer(
                texts,
                padding="max_length",
                truncation=True,
                return_tensors="pt",
                max_length=self.pipe.tokenizer.model_max_length,
            )
            out = self.pipe.text_encoder(tok.input_ids.to(self.device), attention_mask=None)
            return PromptEmbeds(embeds=out.last_hidden_state, pooled=out.text_embeds)

        cond = encode(list(prompts))
        uncond = None
        if with_uncond:
            uncond = encode(list(negative_prompts) if negative_prompts is not None else [""] * len(prompts))
        return cond, uncond

    def latent_shape(self, batch_size, height, width, num_frames=1):
        if self.is_video:
            return (batch_size, 3, num_frames, height, width)
        return (batch_size, 3, height, width)

    def check_size(self, height, width, num_frames=1):
        t_patch, s_patch = self.patch
        for name, value in (("height", height), ("width", width)):
            if value < s_patch or value % s_patch:
                raise ValueError(
                    f"{name} must be a positive multiple of {s_patch} for toy models, got {value}"
                )
        if self.is_video:
            if num_frames < 1 or num_frames % t_patch:
                raise ValueError(
                    f"num_frames must be a positive multiple of {t_patch} for the toy video model, "
                    f"got {num_frames}"
                )
        elif num_frames != 1:
            raise ValueError(f"the toy image model makes images: num_frames must be 1, got {num_frames}")

    def encode_media(self, media: Tensor, *, generator=None) -> Tensor:
        x = media * 2 - 1
        return x.permute(0, 2, 1, 3, 4) if self.is_video else x  # [B, T, 3, H, W] -> [B, 3, T, H, W]

    def decode_latents(self, latents: Tensor) -> Tensor:
        x = ((latents.float() + 1) / 2).clamp(0, 1)
        return x.permute(0, 2, 1, 3, 4) if self.is_video else x  # back to [B, T, 3, H, W]

    def velocity(self, x, t, cond, *, guidance=None, net: nn.Module | None = None):
        net = net or self.transformer
        dtype = net_dtype(net)
        timestep = t_to_timesteps(t.to(torch.promote_types(dtype, torch.float32)))
        if self.is_video:
            out = net(
                hidden_states=x.to(dtype),
                timestep=timestep,
                encoder_hidden_states=cond.embeds.to(dtype),
                return_dict=False,
            )[0]
        else:
            out = net(
                hidden_states=x.to(dtype),
                timestep=timestep,
                encoder_hidden_states=cond.embeds.to(dtype),
                pooled_projections=cond.pooled.to(dtype),
                return_dict=False,
            )[0]
        return out.to(x.dtype)


def toy_corpus() -> list[str]:
    """Every caption of the toy world (both kinds, both splits): the tokenizer's training text."""
    from flowalign.toy.world import toy_prompts

    return [
        p for kind in ("image", "video") for split in ("train", "heldout") for p in toy_prompts(split, kind)
    ]


def _toy_text_encoder(tokenizer, text_width: int) -> CLIPTextModelWithProjection:
    """The toy model's 2-layer CLIP text encoder over the toy vocabulary (initialised from torch's RNG)."""
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_width,
            intermediate_size=text_width * 2,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=TOY_MAX_TOKENS,
            projection_dim=text_width,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_toy_pipeline(
    kind: str = "image",
    *,
    size: int = 32,
    num_frames: int = 8,
    width: int = 128,
    num_layers: int = 4,
    text_width: int = 64,
    patch_size: int = 4,
    absolute_positions: bool = False,
    seed: int = 0,
) -> ToyFlowPipeline:
    """A freshly initialised toy model (2.3M parameters for images at the defaults).

    The defaults follow the measured configuration in the project's toy feasibility study:
    4 layers, 4 heads x 32, patch 4 (64 image tokens at 32x32), text width 64.
    ``absolute_positions`` (videos only) builds a :class:`ToyWanTransformer3DModel`, whose tokens
    know their absolute place like SD3's do, instead of a plain ``WanTransformer3DModel``.
    """
    if kind not in ("image", "video"):
        raise ValueError(f"kind must be 'image' or 'video', got {kind!r}")
    if absolute_positions and kind == "image":
        raise ValueError("absolute_positions is for the video model: the image model (SD3) has them already")
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(toy_corpus())
    text_encoder = _toy_text_encoder(tokenizer, text_width)
    heads = max(1, width // 32)
    if kind == "image":
        transformer = SD3Transformer2DModel(
            sample_size=size,
            patch_size=patch_size,
            in_channels=3,
            out_channels=3,
            num_layers=num_layers,
            attention_head_dim=width // heads,
            num_attention_heads=heads,
            joint_attention_dim=text_width,
            caption_projection_dim=width,
            pooled_projection_dim=text_width,
            pos_embed_max_size=size // patch_size,
        )
    else:
        wan_class = ToyWanTransformer3DModel if absolute_positions else WanTransformer3DModel
        transformer = wan_class(
            patch_size=(2, patch_size, patch_size),
            num_attention_heads=heads,
            attention_head_dim=width // heads,
            in_channels=3,
            out_channels=3,
            text_dim=text_width,
            freq_dim=64,
            ffn_dim=width * 2,
            num_layers=num_layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=max(64, num_frames),
        )
    pipe = ToyFlowPipeline(
        transformer=transformer,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
    )
    for module in (transformer, text_encoder):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_toy_model(out_dir: str | Path, kind: str = "image", **kwargs) -> Path:
    """Build a fresh toy model and save it in diffusers' layout."""
    out_dir = Path(out_dir)
    build_toy_pipeline(kind, **kwargs).save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
