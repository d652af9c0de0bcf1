"""``flowalign lora-comfyui``: convert a Wan LoRA to the key layout ComfyUI loads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flowalign.cli.app import app


@app.command("lora-comfyui")
def lora_comfyui(
    lora: Annotated[Path, typer.Argument(help="A Wan LoRA exported by training (folder or .safetensors).")],
    out: Annotated[Path, typer.Option(help="The ComfyUI LoRA file to write.")],
) -> None:
    """Rename a Wan LoRA to the original Wan keys ComfyUI loads (SD3/FLUX LoRAs load there as exported)."""
    from flowalign.training.lora_comfyui import convert_wan_lora_to_comfyui

    written = convert_wan_lora_to_comfyui(lora, out)
    typer.echo(f"wrote {written}")
