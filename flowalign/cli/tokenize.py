"""``flowalign tokenize``: encode, decode and reconstruct media files with a trained CDT tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flowalign.cli.app import Group, app, check_device
from flowalign.cli.checks import check_steps

tokenize_app = Group(help="Encode, decode and reconstruct media with a CDT tokenizer.", no_args_is_help=True)
app.add_typer(tokenize_app, name="tokenize")
TokModel = Annotated[Path, typer.Option("--model", help="Tokenizer folder (from `flowalign train cdt`).")]


@tokenize_app.command("encode")
def tokenize_encode(
    model: TokModel,
    input: Annotated[Path, typer.Option()],
    out: Annotated[Path, typer.Option()],
    device: Annotated[str, typer.Option()] = "cpu",
) -> None:
    """Video or image -> latent file."""
    from flowalign.tokenizers.files import encode_file

    path = encode_file(model, input, out, device=check_device(device))
    typer.echo(f"wrote {path}")


@tokenize_app.command("decode")
def tokenize_decode(
    model: TokModel,
    input: Annotated[Path, typer.Option()],
    out: Annotated[Path, typer.Option()],
    steps: Annotated[int, typer.Option(help="DDIM steps (1 by default).")] = 1,
    device: Annotated[str, typer.Option()] = "cpu",
) -> None:
    """Latent file -> video or image."""
    from flowalign.tokenizers.files import decode_file

    check_steps(steps)
    path = decode_file(model, input, out, num_inference_steps=steps, device=check_device(device))
    typer.echo(f"wrote {path}")


@tokenize_app.command("reconstruct")
def tokenize_reconstruct(
    model: TokModel,
    input: Annotated[list[Path], typer.Option(help="Files (repeat).")],
    out: Annotated[Path, typer.Option()],
    steps: Annotated[int, typer.Option()] = 1,
    device: Annotated[str, typer.Option()] = "cpu",
) -> None:
    """Encode + decode files; writes the reconstructions and metrics.json (PSNR, SSIM, LPIPS)."""
    import json as _json

    from flowalign.tokenizers.files import reconstruct_files

    check_steps(steps)
    metrics = reconstruct_files(model, input, out, num_inference_steps=steps, device=check_device(device))
    typer.echo(_json.dumps(metrics.get("mean", metrics), indent=1, default=str))
