"""ComfyUI key layouts of FLUX.2, Qwen-Image and Z-Image LoRAs (the inverse of diffusers' converters).

Each layout is the one diffusers' own loader of that family converts from
(``diffusers.loaders.lora_conversion_utils``, 0.42): exporting into it and loading the file back with the
family's ``lora_state_dict`` gives our modules again (tests/training/test_lora_comfyui_families.py).
Every key starts with ``diffusion_model.``; the down matrix is A and the up matrix ``(alpha / r) B`` (no
``.alpha`` entries: the loaders then use scale 1, so the product is peft's ``(alpha / r) B A``). Qwen-Image
and Z-Image name them ``lora_down``/``lora_up``; FLUX.2 ``lora_A``/``lora_B`` (its loader reads
``lora_down`` keys as the kohya layout, ``lora_unet_...``, which is another naming).

- **Qwen-Image**: the original module names are diffusers' (``transformer_blocks.N.attn.to_q``).
- **Z-Image**: diffusers' names, except the attention output ``attention.out`` (diffusers'
  ``attention.to_out.0``, which its converter restores).
- **FLUX.2**: the original BFL layout. Each double block's separate q, k and v projections are one
  fused ``qkv`` there: their LoRAs are stacked, A = [A_q; A_k; A_v] (rank 3r) and
  B = blockdiag(B_q, B_k, B_v), so B A = [B_q A_q; B_k A_k; B_v A_v] exactly; diffusers' converter gives
  each of q, k, v the stacked A and its third of B's rows, whose product is again its own B A.
  Single blocks: ``to_qkv_mlp_proj`` -> ``linear1``, ``to_out`` -> ``linear2``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

__all__ = [
    "COMFYUI_CONVERTERS",
    "flux2_lora_to_comfyui",
    "qwen_image_lora_to_comfyui",
    "z_image_lora_to_comfyui",
]

_LORA_KEY = re.compile(r"^(?:transformer\.)?(.+)\.lora_([AB])\.weight$")

# FLUX.2: diffusers module inside a double block -> (original module, index within a fused qkv or None)
FLUX2_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.linear_in": ("img_mlp.0", None),
    "ff.linear_out": ("img_mlp.2", None),
    "ff_context.linear_in": ("txt_mlp.0", None),
    "ff_context.linear_out": ("txt_mlp.2", None),
}
FLUX2_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
FLUX2_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
}
_FLUX2_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


def _pairs(state: dict[str, torch.Tensor], rank: int, source: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {"A": ..., "B": ...}}`` of a diffusers LoRA state dict (both halves required)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise ValueError(f"{source}: key {key!r} is not a LoRA weight (<module>.lora_A/lora_B.weight)")
        module, which = match.groups()
        if which == "A" and tensor.shape[0] != rank:
            raise ValueError(f"{source}: {key} has rank {tensor.shape[0]}, the header says r={rank}")
        out.setdefault(module, {})[which] = tensor
    for module, halves in out.items():
        if set(halves) != {"A", "B"}:
            raise ValueError(f"{source}: {module} has lora_{set('AB') - set(halves)} missing")
    return out


def _renamed(
    state: dict[str, torch.Tensor], rank: int, alpha: float, source: str, rename: Callable[[str], str]
) -> dict[str, torch.Tensor]:
    out = {}
    for module, halves in _pairs(state, rank, source).items():
        name = f"diffusion_model.{rename(module)}"
        out[f"{name}.lora_down.weight"] = halves["A"]
        out[f"{name}.lora_up.weight"] = halves["B"] * (alpha / rank)
    return out


def qwen_image_lora_to_comfyui(
    state: dict[str, torch.Tensor], *, rank: int, alpha: float, source: str = "LoRA"
) -> dict[str, torch.Tensor]:
    """A diffusers Qwen-Image LoRA state dict in ComfyUI's keys (same module names, ``diffusion_model.``)."""
    return _renamed(state, rank, alpha, source, lambda module: module)


def z_image_lora_to_comfyui(
    state: dict[str, torch.Tensor], *, rank: int, alpha: float, source: str = "LoRA"
) -> dict[str, torch.Tensor]:
    """A diffusers Z-Image LoRA state dict in ComfyUI's keys (``attention.to_out.0`` -> ``attention.out``)."""
    return _renamed(
        state, rank, alpha, source, lambda module: module.replace("attention.to_out.0", "attention.out")
    )


def _flux2_name(module: str) -> tuple[str, int | None]:
    match = _FLUX2_BLOCK.match(module)
    if match:
        kind, index, inner = match.groups()
        if kind == "transformer_blocks" and inner in FLUX2_DOUBLE:
            name, part = FLUX2_DOUBLE[inner]
            return f"double_blocks.{index}.{name}", part
        if kind == "single_transformer_blocks" and inner in FLUX2_SINGLE:
            return f"single_blocks.{index}.{FLUX2_SINGLE[inner]}", None
    elif module in FLUX2_TOP:
        return FLUX2_TOP[module], None
    raise ValueError(
        f"LoRA module {module!r} has no counterpart in the original FLUX.2 layout (convertible: "
        f"transformer_blocks.N.{{{', '.join(FLUX2_DOUBLE)}}}, single_transformer_blocks.N."
        f"{{{', '.join(FLUX2_SINGLE)}}} and {', '.join(FLUX2_TOP)})"
    )


def flux2_lora_to_comfyui(
    state: dict[str, torch.Tensor], *, rank: int, alpha: float, source: str = "LoRA"
) -> dict[str, torch.Tensor]:
    """A diffusers FLUX.2 LoRA state dict in the original BFL keys, q/k/v fused as the module docstring says."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for module, halves in _pairs(state, rank, source).items():
        name, part = _flux2_name(module)
        if part is None:
            out[f"diffusion_model.{name}.lora_A.weight"] = halves["A"]
            out[f"diffusion_model.{name}.lora_B.weight"] = halves["B"] * (alpha / rank)
        else:
            fused.setdefault(name, {})[part] = halves
    for name, parts in fused.items():
        rows = next(iter(parts.values()))["B"].shape[0]  # q, k and v have one width (diffusers splits in 3)
        present = sorted(parts)
        down = torch.cat([parts[p]["A"] for p in present])  # [len(present) r, in]
        like = parts[present[0]]["B"]
        up = like.new_zeros(3 * rows, down.shape[0])
        for slot, p in enumerate(present):
            up[p * rows : (p + 1) * rows, slot * rank : (slot + 1) * rank] = parts[p]["B"] * (alpha / rank)
        out[f"diffusion_model.{name}.lora_A.weight"] = down
        out[f"diffusion_model.{name}.lora_B.weight"] = up
    return out


COMFYUI_CONVERTERS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "flux2": flux2_lora_to_comfyui,
    "flux2-klein": flux2_lora_to_comfyui,
    "qwen-image": qwen_image_lora_to_comfyui,
    "z-image": z_image_lora_to_comfyui,
}
"""Family (``FlowModel.family``) -> converter of its diffusers LoRA state dict to ComfyUI's keys."""
