"""``flowalign lora-comfyui``: convert a LoRA to the key layout ComfyUI loads (Wan, FLUX.2, Qwen-Image, Z-Image)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flowalign.cli.app import app, fail


@app.command("lora-comfyui")
def lora_comfyui(
    lora: Annotated[Path, typer.Argument(help="A LoRA exported by training (folder or .safetensors).")],
    out: Annotated[Path, typer.Option(help="The ComfyUI LoRA file to write.")],
    family: Annotated[
        str | None,
        typer.Option(
            help="wan, wan-i2v, flux2, flux2-klein, qwen-image or z-image (default: the family of the model "
            "folder the LoRA was exported beside, else wan)."
        ),
    ] = None,
) -> None:
    """Rename a LoRA to the keys ComfyUI loads (SD3/FLUX.1 LoRAs load there as exported)."""
    from flowalign.training.lora_comfyui import convert_lora_to_comfyui

    try:
        written = convert_lora_to_comfyui(lora, out, family=family or _exported_beside(lora))
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    typer.echo(f"wrote {written}")


def _exported_beside(lora: Path) -> str:
    """The family of the model folder holding the LoRA folder (training's ``final/lora``), else "wan"."""
    from flowalign.models.base import ModelLoadError, read_model_index
    from flowalign.models.loading import registered_families

    folder = lora if lora.is_dir() else lora.parent
    try:
        index = read_model_index(folder.parent)
    except ModelLoadError:
        return "wan"
    cls = registered_families().get(index.get("_class_name", ""))
    return cls.family if cls is not None else "wan"
