"""Convert a diffusers-format LoRA into the key layout ComfyUI loads (Wan here; FLUX.2, Qwen-Image and
Z-Image in :mod:`flowalign.training.lora_comfyui_families`).

ComfyUI reads SD3 and FLUX LoRAs in diffusers' own format (``transformer.<module>.lora_A.weight``), so
flowalign's export loads there as written. Wan models in ComfyUI keep the module names of the original
Wan code (``blocks.0.self_attn.q`` rather than diffusers' ``blocks.0.attn1.to_q``), so a Wan LoRA is
renamed:

    transformer.blocks.{i}.attn1.to_q.lora_A.weight  ->  diffusion_model.blocks.{i}.self_attn.q.lora_down.weight  (A)
    transformer.blocks.{i}.attn1.to_q.lora_B.weight  ->  diffusion_model.blocks.{i}.self_attn.q.lora_up.weight    ((alpha / r) B)

peft's scale alpha / r is folded into the up matrix and no ``.alpha`` entries are written: a missing
alpha means scale 1 both in ComfyUI and in diffusers' loader of original-layout Wan LoRAs (which
ignores alpha for the modules outside the blocks), so both apply the same ``(alpha / r) B A`` as the
diffusers file. A test loads the result back through diffusers and checks the model output.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from flowalign.files import atomic_write
from flowalign.models.lora import _METADATA_KEY, LORA_WEIGHT_NAME

__all__ = [
    "WAN_BLOCK_NAMES",
    "WAN_TOP_NAMES",
    "comfyui_families",
    "convert_lora_to_comfyui",
    "convert_wan_lora_to_comfyui",
    "wan_lora_to_comfyui",
]

# diffusers module path inside a Wan block -> original Wan path
WAN_BLOCK_NAMES = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
# diffusers module path outside the blocks -> original Wan path
WAN_TOP_NAMES = {
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "proj_out": "head.head",
}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_LORA_KEY = re.compile(r"^(?:transformer\.)?(.+)\.lora_([AB])\.weight$")


def _original_name(module: str) -> str:
    match = _BLOCK.match(module)
    if match and match.group(2) in WAN_BLOCK_NAMES:
        return f"blocks.{match.group(1)}.{WAN_BLOCK_NAMES[match.group(2)]}"
    if module in WAN_TOP_NAMES:
        return WAN_TOP_NAMES[module]
    raise ValueError(
        f"LoRA module {module!r} has no counterpart in the original Wan layout "
        f"(convertible: blocks.N.{{{', '.join(WAN_BLOCK_NAMES)}}} and {', '.join(WAN_TOP_NAMES)})"
    )


def _adapter_settings(metadata: dict[str, str] | None, source: str) -> tuple[int, float]:
    """(rank, alpha) from the diffusers LoRA header; refuses settings the original layout cannot express."""
    if not metadata or _METADATA_KEY not in metadata:
        raise ValueError(
            f"{source}: no {_METADATA_KEY!r} header (rank and alpha unknown); export it with flowalign"
        )
    config = json.loads(metadata[_METADATA_KEY])
    config = {k.removeprefix("transformer."): v for k, v in config.items()}
    if config.get("use_dora") or config.get("use_rslora"):
        raise ValueError(f"{source}: DoRA and rsLoRA adapters have no equivalent in ComfyUI's LoRA layout")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{source}: per-layer rank_pattern/alpha_pattern cannot be converted")
    return int(config["r"]), float(config["lora_alpha"])


def wan_lora_to_comfyui(
    state: dict[str, torch.Tensor], *, rank: int, alpha: float, source: str = "LoRA"
) -> dict[str, torch.Tensor]:
    """Rename a diffusers Wan LoRA state dict (``[transformer.]<module>.lora_{A,B}.weight``) to ComfyUI's keys."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise ValueError(f"{source}: key {key!r} is not a LoRA weight (<module>.lora_A/lora_B.weight)")
        module, which = match.groups()
        if which == "A" and tensor.shape[0] != rank:
            raise ValueError(f"{source}: {key} has rank {tensor.shape[0]}, the header says r={rank}")
        name = f"diffusion_model.{_original_name(module)}"
        if which == "A":
            out[f"{name}.lora_down.weight"] = tensor
        else:
            out[f"{name}.lora_up.weight"] = tensor * (alpha / rank)
    return out


def _converters() -> dict:
    from flowalign.training.lora_comfyui_families import COMFYUI_CONVERTERS

    return {"wan": wan_lora_to_comfyui, "wan-i2v": wan_lora_to_comfyui, **COMFYUI_CONVERTERS}


def comfyui_families() -> list[str]:
    """Families whose LoRAs :func:`convert_lora_to_comfyui` converts (SD3 and FLUX.1 load as exported)."""
    return sorted(_converters())


def convert_wan_lora_to_comfyui(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Convert ``src`` (a diffusers LoRA file or its folder) to a ComfyUI Wan LoRA file at ``dst`` (atomically)."""
    return convert_lora_to_comfyui(src, dst, family="wan")


def convert_lora_to_comfyui(src: str | os.PathLike, dst: str | os.PathLike, *, family: str) -> Path:
    """Convert ``src`` (a diffusers LoRA file or its folder) of ``family`` to ComfyUI's layout at ``dst``.

    Raises:
        ValueError: a family without a ComfyUI layout here (names the ones with one), or a LoRA the
            layout cannot express (a module without a counterpart, DoRA, per-layer ranks).
    """
    converters = _converters()
    if family not in converters:
        raise ValueError(
            f"no ComfyUI LoRA layout for family {family!r} here; converted: {sorted(converters)} "
            "(SD3 and FLUX.1 LoRAs load in ComfyUI as exported)"
        )
    src = Path(src)
    if src.is_dir():
        folder, src = src, src / LORA_WEIGHT_NAME
        low = folder / "pytorch_lora_weights_2.safetensors"  # Wan 2.2 A14B's low-noise expert
        if not src.is_file() and low.is_file():
            raise FileNotFoundError(
                f"{folder} holds only a Wan 2.2 low-noise expert LoRA: convert the file {low} "
                "(ComfyUI loads one LoRA file per expert model)"
            )
    if not src.is_file():
        raise FileNotFoundError(f"no LoRA file at {src}")
    try:
        with safetensors.safe_open(str(src), framework="pt") as f:
            metadata = f.metadata()
        state = safetensors.torch.load_file(str(src))
    except safetensors.SafetensorError as err:
        raise ValueError(f"{src} is not a readable safetensors file ({err}); export the LoRA again") from None
    rank, alpha = _adapter_settings(metadata, str(src))
    converted = converters[family](state, rank=rank, alpha=alpha, source=str(src))
    dst = Path(dst)
    with atomic_write(dst) as tmp:
        safetensors.torch.save_file(converted, str(tmp), metadata={"format": "pt"})
    return dst
