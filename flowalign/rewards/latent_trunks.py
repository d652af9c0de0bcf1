"""Trunks of the latent reward model: the first k blocks of a flow transformer, per transformer class.

Two kinds (docs/algorithms.md 1D names the architecture; :mod:`flowalign.rewards.latent` the heads):

- **Parts** (SD3, Wan 2.1 text-to-video): the trunk holds the transformer's embedders and first k
  blocks, and a small function repeats the transformer's forward up to block k on canonical latents.
- **Adapter** (FLUX.1, FLUX.2, Qwen-Image, Z-Image, HunyuanVideo 1.5, LTX-2 and the image-conditioned Wan
  models): the trunk holds the transformer itself with its blocks cut to the first k and its output
  layers removed, and runs through the family adapter's own ``velocity`` (so packing, position ids,
  condition images and masks are the family's), stopped by a hook when block k returns. The block's
  media tokens and the time embedding (read by a hook on the time embedder) are the trunk's output.

Either way ``forward(x_t, t, cond) -> (tokens [B, N, D], temb [B, D_t])``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flowalign.flow import t_to_timesteps
from flowalign.models.base import FlowModel, PromptEmbeds

__all__ = ["ADAPTER_TRUNKS", "PART_TRUNKS", "AdapterTrunk", "PartsTrunk", "source_transformer"]


# ------------------------------------------------------------------------------------------ parts
def _sd3_forward(trunk: nn.ModuleDict, x: Tensor, t: Tensor, cond: PromptEmbeds) -> tuple[Tensor, Tensor]:
    # same calls as SD3Transformer2DModel.forward up to block k (diffusers 0.42)
    if cond.pooled is None:
        raise ValueError(
            "latent reward (SD3-type trunk): cond.pooled is None; encode prompts with the flow model"
        )
    tokens = trunk["pos_embed"](x).contiguous()  # [B, N, D]
    temb = trunk["time_text_embed"](t_to_timesteps(t), cond.pooled)  # [B, D]; SD3 takes t * 1000
    context = trunk["context_embedder"](cond.embeds)  # [B, L, D]
    for block in trunk["blocks"]:
        context, tokens = block(hidden_states=tokens, encoder_hidden_states=context, temb=temb)
    return tokens, temb


def _wan_forward(trunk: nn.ModuleDict, x: Tensor, t: Tensor, cond: PromptEmbeds) -> tuple[Tensor, Tensor]:
    # same calls as WanTransformer3DModel.forward up to block k (diffusers 0.42)
    rotary = trunk["rope"](x)
    tokens = trunk["patch_embedding"](x).flatten(2).transpose(1, 2).contiguous()  # [B, N, D]
    temb, timestep_proj, context, _ = trunk["condition_embedder"](t_to_timesteps(t), cond.embeds, None)
    timestep_proj = timestep_proj.unflatten(1, (6, -1))  # [B, 6, D]
    for block in trunk["blocks"]:
        tokens = block(tokens, context, timestep_proj, rotary)
    return tokens, temb


def _sd3_unused(block: nn.Module) -> tuple[str, ...]:
    # a joint block updates the text stream too; the trunk's last text-stream update is never read
    return (
        () if getattr(block, "context_pre_only", True) else ("attn.to_add_out", "ff_context", "norm2_context")
    )


@dataclass(frozen=True)
class PartsTrunk:
    embedders: tuple[str, ...]
    """Attributes of the transformer copied into the trunk before the blocks."""
    blocks: str
    """Attribute holding the block list."""
    forward: Callable[[nn.ModuleDict, Tensor, Tensor, PromptEmbeds], tuple[Tensor, Tensor]]
    layers_to_build: Callable[[int, int], int]
    """(trunk depth k, base depth L) -> num_layers of a from-config build whose first k blocks match."""
    unused_in_last: Callable[[nn.Module], tuple[str, ...]] = lambda block: ()
    """Submodules of the last trunk block whose output the trunk never reads (frozen when training)."""


PART_TRUNKS: dict[str, PartsTrunk] = {
    # SD3's last block is context_pre_only; building k + 1 layers keeps block k - 1 a full joint block.
    "SD3Transformer2DModel": PartsTrunk(
        ("pos_embed", "time_text_embed", "context_embedder"),
        "transformer_blocks",
        _sd3_forward,
        lambda k, n: min(k + 1, n),
        _sd3_unused,
    ),
    "WanTransformer3DModel": PartsTrunk(
        ("rope", "patch_embedding", "condition_embedder"), "blocks", _wan_forward, lambda k, n: k
    ),
}


# ---------------------------------------------------------------------------------------- adapter
class _Stop(Exception):
    """Raised by the hook on the trunk's last block: the rest of the forward is not needed."""


def _heads_width(cfg: dict[str, Any]) -> tuple[int, int]:
    width = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
    return width, width


def _z_image_width(cfg: dict[str, Any]) -> tuple[int, int]:
    from diffusers.models.transformers.transformer_z_image import ADALN_EMBED_DIM

    return int(cfg["dim"]), min(int(cfg["dim"]), ADALN_EMBED_DIM)


def _second(out: Any, x: Tensor) -> Tensor:
    return out[1]  # (text, media) blocks: FLUX.1, FLUX.2 and Qwen-Image


def _first(out: Any, x: Tensor) -> Tensor:
    return out[0] if isinstance(out, tuple) else out  # (media, other) blocks, or the media alone


def _leading_image_tokens(out: Tensor, x: Tensor) -> Tensor:
    # Z-Image's unified sequence puts each image's 2x2 tokens first, then its caption
    return out[:, : x.shape[-2] * x.shape[-1] // 4]


@dataclass(frozen=True)
class AdapterTrunk:
    blocks: str
    """Attribute holding the block list, cut to the first k."""
    layers: Callable[[int], dict[str, int]]
    """Trunk depth k -> config overrides of a from-config build holding exactly the trunk's blocks."""
    removed: dict[str, Callable[[], nn.Module]]
    """Output modules the stopped forward never reaches, replaced by empty ones (less to copy and save)."""
    time_embedder: str
    """Submodule whose output (or its ``temb_index`` element) is the time embedding."""
    media: Callable[[Any, Tensor], Tensor] = _first
    """(last block's output, x) -> media tokens [B, N, D]."""
    widths: Callable[[dict[str, Any]], tuple[int, int]] = _heads_width
    """Transformer config -> (token width, time-embedding width)."""
    temb_index: int = 0
    """Element of a tuple-valued time embedder output that holds the embedding."""

    def cut(self, transformer: nn.Module, num_blocks: int, *, copy_modules: bool) -> nn.Module:
        """``transformer`` with its first ``num_blocks`` blocks and no output layers (a copy, or in place)."""
        parts = transformer._modules
        saved = {name: parts[name] for name in (self.blocks, *self.removed)}
        parts[self.blocks] = nn.ModuleList(list(saved[self.blocks])[:num_blocks])
        for name, empty in self.removed.items():
            parts[name] = empty()
        if not copy_modules:
            return transformer
        try:
            return copy.deepcopy(transformer)
        finally:
            parts.update(saved)

    def forward(
        self, net: nn.Module, model: FlowModel, x: Tensor, t: Tensor, cond: PromptEmbeds
    ) -> tuple[Tensor, Tensor]:
        """Run ``model.velocity`` with ``net`` until its last block; (media tokens, time embedding)."""
        found: dict[str, Any] = {}

        def on_time(module: nn.Module, args: Any, out: Any) -> None:
            found["temb"] = out[self.temb_index] if isinstance(out, tuple) else out

        def on_block(module: nn.Module, args: Any, out: Any) -> None:
            found["tokens"] = self.media(out, x)
            raise _Stop

        hooks = [
            net.get_submodule(self.time_embedder).register_forward_hook(on_time),
            getattr(net, self.blocks)[-1].register_forward_hook(on_block),
        ]
        try:
            model.velocity(x, t, cond, net=net)
        except _Stop:
            pass
        finally:
            for hook in hooks:
                hook.remove()
        if "tokens" not in found:
            raise RuntimeError(
                f"latent reward: the forward of {type(net).__name__} never reached its last block"
            )
        temb = found["temb"]
        temb = temb.reshape(x.shape[0], -1, temb.shape[-1]).mean(dim=1)  # per-token time embeddings -> [B, D]
        return found["tokens"], temb


def _out_layers(*names: str) -> dict[str, Callable[[], nn.Module]]:
    return {name: nn.Identity for name in names}


ADAPTER_TRUNKS: dict[str, AdapterTrunk] = {
    "FluxTransformer2DModel": AdapterTrunk(
        "transformer_blocks",
        lambda k: {"num_layers": k, "num_single_layers": 0},
        {"single_transformer_blocks": nn.ModuleList, **_out_layers("norm_out", "proj_out")},
        "time_text_embed",
        _second,
    ),
    "Flux2Transformer2DModel": AdapterTrunk(
        "transformer_blocks",
        lambda k: {"num_layers": k, "num_single_layers": 0},
        {"single_transformer_blocks": nn.ModuleList, **_out_layers("norm_out", "proj_out")},
        "time_guidance_embed",
        _second,
    ),
    "QwenImageTransformer2DModel": AdapterTrunk(
        "transformer_blocks",
        lambda k: {"num_layers": k},
        _out_layers("norm_out", "proj_out"),
        "time_text_embed",
        _second,
    ),
    "ZImageTransformer2DModel": AdapterTrunk(
        "layers",
        lambda k: {"n_layers": k},
        {"all_final_layer": nn.ModuleDict},
        "t_embedder",
        _leading_image_tokens,
        _z_image_width,
    ),
    "HunyuanVideo15Transformer3DModel": AdapterTrunk(
        "transformer_blocks", lambda k: {"num_layers": k}, _out_layers("norm_out", "proj_out"), "time_embed"
    ),
    # LTX-2's time embedder returns (modulation, embedded time); the video stream is read alone
    "LTX2VideoTransformer3DModel": AdapterTrunk(
        "transformer_blocks",
        lambda k: {"num_layers": k},
        _out_layers("norm_out", "proj_out", "audio_norm_out", "audio_proj_out"),
        "time_embed",
        temb_index=1,
    ),
    # image-conditioned Wan (2.1/2.2 I2V, TI2V-5B): condition latents and CLIP tokens go in as in velocity
    "WanTransformer3DModel": AdapterTrunk(
        "blocks", lambda k: {"num_layers": k}, _out_layers("norm_out", "proj_out"), "condition_embedder"
    ),
}


def source_transformer(model: FlowModel) -> nn.Module:
    """The transformer a trunk is cut from: the model's own, or the high-noise expert of a two-expert
    Wan 2.2 A14B model (both experts share one architecture; the trunk is trained on its own)."""
    from flowalign.models.lora import _unwrap
    from flowalign.models.wan_experts import TwoExpertTransformer

    transformer = _unwrap(model.transformer)
    if isinstance(transformer, TwoExpertTransformer):
        return transformer.expert("high")
    return transformer


def trunk_kind(model: FlowModel) -> str:
    """ "adapter" where the trunk runs through the family adapter, "parts" where it repeats the forward.

    Wan models that take a condition image run through the adapter (the condition is the adapter's);
    text-to-video Wan keeps the parts trunk, so guides saved before keep loading.
    """
    class_name = type(source_transformer(model)).__name__
    if class_name in PART_TRUNKS and not (class_name == "WanTransformer3DModel" and _conditioned_wan(model)):
        return "parts"
    return "adapter"


def _conditioned_wan(model: FlowModel) -> bool:
    config = source_transformer(model).config
    return bool(model.takes_images) or int(config.in_channels) != int(config.out_channels)


def probe_unused(net: nn.Module, trunk: AdapterTrunk, model: FlowModel) -> list[str]:
    """Names of ``net``'s parameters outside the graph of one trunk forward (they cannot move the scores).

    The probe is one sample of the smallest size the family accepts, at t = 0.5 (with a grey condition
    image where the family requires one); which parameters the graph reaches does not depend on the values.
    """
    side = next((s for s in (16, 32, 64, 128, 256, 512) if _fits(model, s)), None)
    if side is None:
        raise ValueError(f"latent reward: no probe size up to 512 px fits the {model.family} model")
    extra: dict[str, Any] = {}
    if model.requires_images:
        extra = {"images": [torch.full((3, side, side), 0.5)], "height": side, "width": side, "num_frames": 1}
    first = next(net.parameters())
    with torch.no_grad():
        cond, _ = model.encode_prompt(["a probe"], **extra)
    x = torch.randn(model.latent_shape(1, side, side, 1), generator=torch.Generator().manual_seed(0))
    x = x.to(first.device, first.dtype)
    t = torch.full((1,), 0.5, device=first.device, dtype=first.dtype)
    params = dict(net.named_parameters())
    flags = {name: p.requires_grad for name, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            tokens, temb = trunk.forward(net, model, x, t, cond.to(device=first.device, dtype=first.dtype))
            total = tokens.float().sum() + temb.float().sum()
            grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
    finally:
        for name, p in params.items():
            p.requires_grad_(flags[name])
    return [name for name, g in zip(params, grads, strict=True) if g is None]


def _fits(model: FlowModel, side: int) -> bool:
    try:
        model.check_size(side, side, 1)
    except ValueError:
        return False
    return True
