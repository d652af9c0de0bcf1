"""Published architectures shrunk for tests: fewer and narrower blocks, every architectural switch kept.

:func:`shrink_transformer` takes a transformer config of :data:`~flowalign.planning.architectures.ARCHITECTURES`
(the single copy of the published configs) and changes only its sizes:

- depth: ``num_layers`` (and FLUX's ``num_single_layers``); SD3.5's MMDiT-X ``dual_attention_layers`` keep
  their place (the first blocks) and their share of the depth, so a model that mixes dual and plain blocks
  still mixes them;
- width: ``num_attention_heads`` and ``attention_head_dim``, with everything tied to them (SD3's
  ``caption_projection_dim`` = heads x head dim, FLUX's rotary ``axes_dims_rope`` scaled to sum to the head
  dim, Wan's ``ffn_dim`` at the published ratio to the hidden size); the text widths
  (``joint_attention_dim``, ``pooled_projection_dim``, ``text_dim``) become those of the tiny text
  encoders; SD3's position table and sample size shrink 8x.

Every other key (``qk_norm``, ``guidance_embeds``, ``cross_attn_norm``, ``patch_size``, channels, ``eps``,
rope lengths, ...) is copied unchanged. :func:`shrunk_pipeline` puts the shrunk transformer into a pipeline
with the tiny text encoders and VAE of :mod:`flowalign.models.tiny` (SD3.5 with its third, T5, encoder, as
published) and :func:`save_shrunk_model` writes it in diffusers' layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flowalign.planning.architectures import get_architecture

__all__ = ["DEPTH_KEYS", "WIDTH_KEYS", "save_shrunk_model", "shrink_transformer", "shrunk_pipeline"]

DEPTH_KEYS = ("num_layers", "num_single_layers", "dual_attention_layers")
WIDTH_KEYS = (
    "num_attention_heads",
    "attention_head_dim",
    "caption_projection_dim",
    "joint_attention_dim",
    "pooled_projection_dim",
    "axes_dims_rope",
    "ffn_dim",
    "text_dim",
    "pos_embed_max_size",
    "sample_size",
)
"""The keys :func:`shrink_transformer` may change; every other key of the published config is kept."""

_HEAD_DIM = {"sd3": 16, "flux": 32, "wan": 16}
"""Default shrunk head dims: FLUX's rotary axes (16, 56, 56) of 128 scale by 1/4 to even sizes (4, 14, 14)."""


def _dual_layers(published: list[int], layers: int, published_layers: int) -> list[int]:
    """The first ``n`` blocks, ``n`` the published share of dual blocks, at least one of each kind when the
    published model has both."""
    if not published:
        return []
    n = round(len(published) * layers / published_layers)
    most = layers - 1 if len(published) < published_layers else layers
    return list(range(max(1, min(n, most))))


def _scaled_axes(axes: list[int], head_dim: int, published_head_dim: int) -> list[int]:
    if (head_dim * sum(axes)) % published_head_dim:
        raise ValueError(f"head_dim {head_dim} does not scale the rotary axes {axes} of {published_head_dim}")
    out = [a * head_dim // published_head_dim for a in axes]
    if any(a % 2 or a == 0 for a in out) or sum(out) != head_dim:
        raise ValueError(
            f"head_dim {head_dim} scales the rotary axes {axes} to {out}: each must be even and > 0"
        )
    return out


def shrink_transformer(
    name: str,
    *,
    layers: int = 2,
    single_layers: int = 2,
    heads: int = 2,
    head_dim: int | None = None,
    text_dim: int = 64,
    pooled_dim: int = 64,
) -> dict[str, Any]:
    """The published transformer config of architecture ``name``, shrunk (see the module docstring).

    Args:
        layers, single_layers: blocks (FLUX: double-stream and single-stream blocks).
        heads, head_dim: attention heads and their width (default per family, see :data:`_HEAD_DIM`).
        text_dim: width of the text tokens the transformer takes (the tiny T5 / UMT5 width).
        pooled_dim: width of the pooled text embedding (SD3, FLUX).

    Raises:
        ValueError: an unknown name, or sizes the architecture cannot take.
    """
    arch = get_architecture(name)
    pub = dict(arch.transformer)
    head_dim = head_dim or _HEAD_DIM[arch.family]
    if min(layers, single_layers, heads, head_dim) < 1:
        raise ValueError(f"{name}: layers, single_layers, heads and head_dim must be >= 1")
    hidden = heads * head_dim
    out = dict(pub, num_layers=layers, num_attention_heads=heads, attention_head_dim=head_dim)
    if arch.family == "sd3":
        out.update(
            caption_projection_dim=hidden, joint_attention_dim=text_dim, pooled_projection_dim=pooled_dim
        )
        out.update(pos_embed_max_size=pub["pos_embed_max_size"] // 8, sample_size=pub["sample_size"] // 8)
        if "dual_attention_layers" in pub:
            out["dual_attention_layers"] = _dual_layers(
                pub["dual_attention_layers"], layers, pub["num_layers"]
            )
    elif arch.family == "flux":
        out.update(
            num_single_layers=single_layers, joint_attention_dim=text_dim, pooled_projection_dim=pooled_dim
        )
        out["axes_dims_rope"] = _scaled_axes(list(pub["axes_dims_rope"]), head_dim, pub["attention_head_dim"])
    else:  # wan
        published_hidden = pub["num_attention_heads"] * pub["attention_head_dim"]
        out.update(ffn_dim=round(pub["ffn_dim"] * hidden / published_hidden), text_dim=text_dim)
    return out


def shrunk_pipeline(name: str, *, seed: int = 0, **sizes: Any):
    """A diffusers pipeline of architecture ``name``: its shrunk transformer (``sizes`` as in
    :func:`shrink_transformer`) with the tiny text encoders and VAE of the family, in eval mode."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, WanTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    from flowalign.models import tiny

    family = get_architecture(name).family
    base = tiny.TINY_BUILDERS[family](seed)  # every component but the transformer is kept
    tc = base.transformer.config
    if family == "wan":
        dims = {"text_dim": tc.text_dim}
    else:
        dims = {"text_dim": tc.joint_attention_dim, "pooled_dim": tc.pooled_projection_dim}
    config = shrink_transformer(name, **dims, **sizes)
    cls = {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel, "wan": WanTransformer3DModel}[family]
    torch.manual_seed(seed + 1)
    components = dict(base.components, transformer=cls(**config).eval())
    if family == "sd3":  # SD3.5 ships a third (T5) encoder: a tiny one of the joint attention width
        tok = tiny.tiny_t5_tokenizer()
        t5 = T5EncoderModel(
            T5Config(vocab_size=len(tok), **dict(tiny._TINY_T5, d_model=config["joint_attention_dim"]))
        )
        components.update(text_encoder_3=t5.eval(), tokenizer_3=tok)
    pipe = type(base)(**{k: v for k, v in components.items() if k in _init_keys(type(base))})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _init_keys(pipeline_class) -> set[str]:
    expected, optional = pipeline_class._get_signature_keys(pipeline_class)
    return set(expected) | set(optional)


def save_shrunk_model(name: str, out_dir: str | Path, *, seed: int = 0, **sizes: Any) -> Path:
    """Build :func:`shrunk_pipeline` and save it in diffusers' layout (safetensors); returns ``out_dir``."""
    out_dir = Path(out_dir)
    shrunk_pipeline(name, seed=seed, **sizes).save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
