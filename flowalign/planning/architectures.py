"""Published configurations of the real transformers, text encoders and VAEs, and exact parameter counts.

The dicts below are the constructor arguments of the diffusers / transformers classes as published with
each checkpoint (``transformer/config.json``, ``text_encoder*/config.json``, ``vae/config.json``), written
out so that planning needs no download. :func:`param_count` builds the class on the ``meta`` device (no
memory, no initialisation) and sums its parameters, so every count is exact for the configuration.

Each transformer entry also carries the latent geometry the planner needs: VAE channels and strides,
the patch size and the default number of text tokens the pipeline feeds the transformer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from flowalign.planning.text_encoders import TEXT_ENCODERS as TEXT_ENCODERS  # re-exported

_SD3_DUAL = list(range(13))  # SD3.5-Medium: MMDiT-X self-attention in the first 13 blocks

SD3_VAE = {
    "class": "AutoencoderKL",
    "config": {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 16,
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    },
}
WAN_VAE = {
    "class": "AutoencoderKLWan",
    "config": {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2},
}
# Wan2.2-TI2V-5B-Diffusers vae/config.json: the 48-channel residual VAE; its 2x2 patchify (12 = 3 x 2 x 2
# input channels) on top of the 8x convolutional downsampling makes latents 16x smaller per side.
WAN22_VAE = {
    "class": "AutoencoderKLWan",
    "config": {
        "base_dim": 160,
        "decoder_base_dim": 256,
        "z_dim": 48,
        "dim_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "temperal_downsample": [False, True, True],
        "is_residual": True,
        "in_channels": 12,
        "out_channels": 12,
        "patch_size": 2,
        "scale_factor_spatial": 16,
        "scale_factor_temporal": 4,
        "latents_mean": [0.0] * 48,  # the published 48 statistics; they carry no parameters
        "latents_std": [1.0] * 48,
    },
}


@dataclass(frozen=True)
class Architecture:
    """One published model: its transformer config plus the geometry and components around it."""

    name: str
    family: str
    """"sd3", "flux" or "wan": selects the transformer class and its block structure."""
    transformer: dict[str, Any]
    text_encoders: tuple[str, ...]
    """Keys of :data:`TEXT_ENCODERS` the pipeline loads."""
    text_tokens: int
    """Text tokens the transformer attends to per sample (after the encoders, padded as the pipeline pads)."""
    vae: dict[str, Any] = field(default_factory=lambda: SD3_VAE)
    vae_dtype: str = "bf16"
    """The dtype the reference pipelines keep the VAE in (diffusers keeps Wan's VAE in fp32)."""
    spatial_stride: int = 8
    temporal_stride: int = 1
    """Frames per latent frame after the first (Wan: 4; images: 1)."""
    latent_channels: int = 16
    experts: int = 1
    """Transformers of this config the pipeline holds (Wan 2.2 A14B: 2, switched at the boundary
    timestep; ``transformer`` above is each expert's config and the counts are per expert)."""

    @property
    def hidden(self) -> int:
        t = self.transformer
        if "dim" in t:  # Z-Image names its width
            return t["dim"]
        return t["num_attention_heads"] * t["attention_head_dim"]

    @property
    def patch(self) -> tuple[int, int, int]:
        """(frames, height, width) latent patch that becomes one token."""
        if self.family in ("flux", "flux2"):
            return (1, 2, 2)  # the pipeline packs 2x2 latent patches into the input channels
        if "all_patch_size" in self.transformer:  # Z-Image
            p, f = self.transformer["all_patch_size"][0], self.transformer["all_f_patch_size"][0]
            return (f, p, p)
        p = self.transformer.get("patch_size", 1)
        return tuple(p) if isinstance(p, list | tuple) else (1, p, p)

    def latent_shape(self, height: int, width: int, frames: int = 1) -> tuple[int, int, int, int]:
        """(channels, latent frames, latent height, latent width) of a ``frames`` x ``height`` x ``width`` sample."""
        s = self.spatial_stride
        if height % s or width % s:
            raise ValueError(f"{self.name}: height and width must be multiples of {s}, got {height}x{width}")
        lf = 1 + (frames - 1) // self.temporal_stride if self.temporal_stride > 1 else frames
        return (self.latent_channels, lf, height // s, width // s)

    def image_tokens(self, height: int, width: int, frames: int = 1) -> int:
        """Transformer tokens of one sample's latent (after patchify)."""
        _, lf, lh, lw = self.latent_shape(height, width, frames)
        pf, ph, pw = self.patch
        if lh % ph or lw % pw or lf % pf:
            raise ValueError(f"{self.name}: latent {lf}x{lh}x{lw} is not divisible by the patch {self.patch}")
        return (lf // pf) * (lh // ph) * (lw // pw)


_SD3_COMMON = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "attention_head_dim": 64,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 2048,
    "qk_norm": "rms_norm",
}
_FLUX_COMMON = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "axes_dims_rope": [16, 56, 56],
}
_WAN_COMMON = {"patch_size": [1, 2, 2], "attention_head_dim": 128, "in_channels": 16, "out_channels": 16,
               "text_dim": 4096, "freq_dim": 256, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
               "eps": 1e-6, "rope_max_seq_len": 1024}  # fmt: skip
_WAN_14B = {"num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}


def _wan(name: str, config: dict[str, Any], **options: Any) -> Architecture:
    """A Wan entry: the shared transformer settings updated by ``config``, UMT5-XXL text (512 tokens),
    the Wan VAE kept in fp32 and a 4x temporal stride (``options`` override the geometry)."""
    options = {"vae": WAN_VAE, "vae_dtype": "fp32", "temporal_stride": 4, **options}
    return Architecture(name, "wan", {**_WAN_COMMON, **config}, ("umt5-xxl",), text_tokens=512, **options)


_SD3_TEXT = ("clip-l", "clip-g", "t5-xxl")
_FLUX_TEXT = ("clip-l-noproj", "t5-xxl")

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture(
            "sd35m",
            "sd3",
            {
                **_SD3_COMMON,
                "num_layers": 24,
                "num_attention_heads": 24,
                "caption_projection_dim": 1536,
                "pos_embed_max_size": 384,
                "dual_attention_layers": _SD3_DUAL,
            },
            _SD3_TEXT,
            text_tokens=77 + 256,
        ),
        Architecture(
            "sd35l",
            "sd3",
            {
                **_SD3_COMMON,
                "num_layers": 38,
                "num_attention_heads": 38,
                "caption_projection_dim": 2432,
                "pos_embed_max_size": 192,
            },
            _SD3_TEXT,
            text_tokens=77 + 256,
        ),
        Architecture(
            "flux-dev",
            "flux",
            {**_FLUX_COMMON, "guidance_embeds": True},
            _FLUX_TEXT,
            text_tokens=512,
        ),
        Architecture(
            "flux-schnell",
            "flux",
            {**_FLUX_COMMON, "guidance_embeds": False},
            _FLUX_TEXT,
            text_tokens=256,
        ),
        _wan("wan-1.3b", {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}),
        _wan("wan-14b", _WAN_14B),
        # Wan 2.2 and image-to-video, from the ``transformer/config.json`` (and ``model_index.json``) of
        # Wan-AI/Wan2.2-T2V-A14B-Diffusers, Wan2.2-I2V-A14B-Diffusers, Wan2.1-I2V-14B-480P-Diffusers and
        # Wan2.2-TI2V-5B-Diffusers.
        _wan(
            "wan2.2-t2v-a14b", _WAN_14B, experts=2
        ),  # boundary_ratio 0.875; transformer_2 has the same config
        # boundary_ratio 0.9; 36 = 16 noisy + 4 mask + 16 condition channels
        _wan("wan2.2-i2v-a14b", {**_WAN_14B, "in_channels": 36}, experts=2),
        # plus a CLIP ViT-H/14 image encoder (its 257 tokens of width 1280), not counted
        _wan("wan2.1-i2v-14b", {**_WAN_14B, "in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120}),
        _wan(  # expand_timesteps: per-token timesteps, text- and image-to-video
            "wan2.2-ti2v-5b",
            {
                "num_attention_heads": 24,
                "ffn_dim": 14336,
                "num_layers": 30,
                "in_channels": 48,
                "out_channels": 48,
            },
            vae=WAN22_VAE,
            spatial_stride=16,
            latent_channels=48,
        ),
    )
}

# The newer image families. Transformer configs: FLUX.2 [dev], Qwen-Image and Z-Image are the
# defaults of diffusers' Flux2Transformer2DModel, QwenImageTransformer2DModel and
# ZImageTransformer2DModel (written out; they are the released transformer/config.json values), and
# FLUX.2 [klein] 4B / 9B the released checkpoints' shapes: 5 + 20 blocks of width 3072 (4B) and
# 24 single blocks of width 4096 (9B), text width 3 x the Qwen3 width; the 9B's 8 double blocks are
# the count that gives its published size (6 would give 8.2B). Meta-built counts: 32.2B, 3.9B, 9.1B,
# 20.4B, 6.2B. FLUX.2's and Qwen-Image's block activations are modelled (flowalign/planning/activations.py);
# Z-Image's not yet (:data:`SIZED_ONLY`).
_FLUX2_COMMON = {"patch_size": 1, "in_channels": 128, "attention_head_dim": 128, "timestep_guidance_channels": 256,
                 "mlp_ratio": 3.0, "axes_dims_rope": [32, 32, 32, 32], "rope_theta": 2000}  # fmt: skip
FLUX2_VAE = {
    "class": "AutoencoderKLFlux2",
    "config": {"latent_channels": 32, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2},
}
QWEN_IMAGE_VAE = {
    "class": "AutoencoderKLQwenImage",
    "config": {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2},
}


def _flux2(name: str, layers: int, singles: int, heads: int, text_dim: int, encoder: str, guidance: bool):
    t = dict(_FLUX2_COMMON, num_layers=layers, num_single_layers=singles, num_attention_heads=heads,
             joint_attention_dim=text_dim, guidance_embeds=guidance)  # fmt: skip
    return Architecture(name, "flux2", t, (encoder,), text_tokens=512, vae=FLUX2_VAE, latent_channels=32)


_QWEN_IMAGE = {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
               "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False,
               "axes_dims_rope": [16, 56, 56]}  # fmt: skip
_Z_IMAGE = {"all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16, "dim": 3840, "n_layers": 30,
            "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True,
            "cap_feat_dim": 2560, "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [32, 48, 48],
            "axes_lens": [1024, 512, 512]}  # fmt: skip
SIZED_ONLY: dict[str, Architecture] = {
    a.name: a
    for a in (
        _flux2("flux2-dev", 8, 48, 48, 15360, "mistral-small-3.1", guidance=True),
        _flux2("flux2-klein-4b", 5, 20, 24, 7680, "qwen3-4b", guidance=False),
        _flux2("flux2-klein-9b", 8, 24, 32, 12288, "qwen3-8b", guidance=False),
        Architecture(
            "qwen-image", "qwen-image", _QWEN_IMAGE, ("qwen2.5-vl-7b",), text_tokens=512, vae=QWEN_IMAGE_VAE
        ),
        Architecture("z-image", "z-image", _Z_IMAGE, ("qwen3-4b-base",), text_tokens=512),
        # Qwen-Image-Edit and Edit-Plus (2509): Qwen-Image's transformer and Qwen2.5-VL-7B (which also reads
        # the condition image); the transformer attends to the condition's tokens besides the output's.
        *(
            Architecture(
                name, "qwen-image", _QWEN_IMAGE, ("qwen2.5-vl-7b",), text_tokens=512, vae=QWEN_IMAGE_VAE
            )
            for name in ("qwen-image-edit", "qwen-image-edit-plus")
        ),
    )
}
"""Published configurations of the newer image families: the planner knows their size (weights, LoRA,
optimizer state); :mod:`flowalign.planning.activations` models FLUX.2's and Qwen-Image's block
activations, not yet Z-Image's (a plan for it stops with one error line)."""

_TRANSFORMER_CLASS = {
    "sd3": "SD3Transformer2DModel",
    "flux": "FluxTransformer2DModel",
    "wan": "WanTransformer3DModel",
    "flux2": "Flux2Transformer2DModel",
    "qwen-image": "QwenImageTransformer2DModel",
    "z-image": "ZImageTransformer2DModel",
}


def get_architecture(name: str) -> Architecture:
    """The architecture called ``name`` (from :data:`ARCHITECTURES` or :data:`SIZED_ONLY`).

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    if name in SIZED_ONLY:
        return SIZED_ONLY[name]
    raise ValueError(f"unknown model {name!r}; known: {', '.join([*ARCHITECTURES, *SIZED_ONLY])}")


_CONFIG_CLASS = {
    "CLIPTextModel": "CLIPTextConfig",
    "CLIPTextModelWithProjection": "CLIPTextConfig",
    "T5EncoderModel": "T5Config",
    "UMT5EncoderModel": "UMT5Config",
    "Qwen3Model": "Qwen3Config",
    "Qwen3ForCausalLM": "Qwen3Config",
    "Qwen2_5_VLForConditionalGeneration": "Qwen2_5_VLConfig",
    "Mistral3ForConditionalGeneration": "Mistral3Config",
}


def _class(name: str):
    import diffusers
    import diffusers.pipelines.ltx2  # LTX2TextConnectors is not exported at the top level
    import transformers

    return (
        getattr(diffusers, name, None)
        or getattr(diffusers.pipelines.ltx2, name, None)
        or getattr(transformers, name)
    )


def build(class_name: str, config: dict[str, Any], device: str | torch.device = "meta") -> torch.nn.Module:
    """Instantiate ``class_name`` (a diffusers or transformers model class) from ``config`` on ``device``."""
    cls = _class(class_name)
    config_class = _CONFIG_CLASS.get(class_name)
    with torch.device(device):
        if config_class is not None:
            return cls(_class(config_class)(**config))
        return cls(**config)


def build_transformer(arch: Architecture, device: str | torch.device = "meta") -> torch.nn.Module:
    """The architecture's diffusers transformer class built from its published config on ``device``."""
    return build(_TRANSFORMER_CLASS[arch.family], arch.transformer, device)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


_CACHE: dict[tuple, int] = {}


def _key(arch: Architecture) -> tuple:
    return (arch.name, repr(sorted(arch.transformer.items())))


def param_count(component: str | Architecture) -> int:
    """Exact parameter count of a component, built on the meta device (cached).

    ``component`` is an :class:`Architecture` or its name (its transformer), ``"vae:<arch>"`` or a
    text-encoder key.
    """
    if isinstance(component, Architecture):
        key = ("transformer", *_key(component))
        if key not in _CACHE:
            _CACHE[key] = _count(build_transformer(component))
        return _CACHE[key]
    if component.startswith("vae:"):
        return vae_param_count(get_architecture(component[4:]))
    if component in TEXT_ENCODERS:
        if (component,) not in _CACHE:
            enc = TEXT_ENCODERS[component]
            _CACHE[(component,)] = _count(build(enc["class"], enc["config"]))
        return _CACHE[(component,)]
    return param_count(get_architecture(component))


def buffer_count(arch: Architecture) -> int:
    """Elements of the transformer's buffers (position tables such as SD3's sin-cos table), meta-built."""
    key = ("buffers", *_key(arch))
    if key not in _CACHE:
        _CACHE[key] = sum(b.numel() for b in build_transformer(arch).buffers())
    return _CACHE[key]


def vae_param_count(arch: Architecture) -> int:
    """Exact parameter count of ``arch``'s VAE (meta-built, cached)."""
    vae = arch.vae
    key = ("vae", vae["class"], repr(sorted(vae["config"].items())))
    if key not in _CACHE:
        _CACHE[key] = _count(build(vae["class"], vae["config"]))
    return _CACHE[key]


def lora_param_count(arch: str | Architecture, rank: int, targets: tuple[str, ...]) -> int:
    """Parameters of rank-``rank`` LoRA adapters on every linear layer of the transformer whose name ends
    with one of ``targets``: r (in + out) per adapted layer, counted on the meta-built model."""
    arch = get_architecture(arch) if isinstance(arch, str) else arch
    key = ("lora", *_key(arch), tuple(targets))
    if key not in _CACHE:
        net = build_transformer(arch)
        _CACHE[key] = sum(
            m.in_features + m.out_features
            for name, m in net.named_modules()
            if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
        )
    return rank * _CACHE[key]


def shrunk(arch: Architecture, layers: int, single_layers: int | None = None) -> Architecture:
    """``arch`` with only its first ``layers`` blocks (and ``single_layers`` FLUX single blocks); every
    other setting, dual-attention layers below ``layers`` included, is kept."""
    t = dict(arch.transformer, num_layers=layers)
    if "dual_attention_layers" in t:
        t["dual_attention_layers"] = [i for i in t["dual_attention_layers"] if i < layers]
    if single_layers is not None:
        t["num_single_layers"] = single_layers
    return dataclasses.replace(arch, name=f"{arch.name}-{layers}l", transformer=t)


# HunyuanVideo 1.5 and LTX-2 keep their configurations in their own module.
from flowalign.planning.architectures_video import (  # noqa: E402
    VIDEO_CONFIG_CLASS,
    VIDEO_TEXT_ENCODERS,
    VIDEO_TRANSFORMER_CLASS,
    video_architectures,
)

TEXT_ENCODERS.update(VIDEO_TEXT_ENCODERS)
ARCHITECTURES.update({a.name: a for a in video_architectures(Architecture)})
_TRANSFORMER_CLASS.update(VIDEO_TRANSFORMER_CLASS)
_CONFIG_CLASS.update(VIDEO_CONFIG_CLASS)
