"""The ``flowalign`` command line: each command parses arguments and calls one library function."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="flowalign",
    help="Align and distill diffusion/flow generative models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Align and distill diffusion/flow generative models."""


def fail(message: str, code: int = 2) -> None:
    """Print one line naming the problem and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _device_and_dtype(device: str | None, dtype: str | None):
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in dtypes:
        fail(f"--dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    return device, dtypes[dtype]


@app.command()
def generate(
    model: Annotated[str, typer.Option(help="Hub id or local folder in diffusers' layout.")],
    out: Annotated[Path, typer.Option(help="Output folder (media + manifest.jsonl).")],
    prompt: Annotated[list[str] | None, typer.Option(help="A prompt (repeat for several).")] = None,
    prompts_file: Annotated[
        Path | None, typer.Option(help="Prompts: .txt (one per line), .jsonl, .csv, .json.")
    ] = None,
    negative_prompt: Annotated[str | None, typer.Option(help="Negative prompt for CFG.")] = None,
    steps: Annotated[int | None, typer.Option(help="Sampling steps (family default if unset).")] = None,
    guidance_scale: Annotated[
        float | None, typer.Option(help="CFG scale (embedded guidance for FLUX.1-dev).")
    ] = None,
    true_cfg_scale: Annotated[float, typer.Option(help="Real CFG for guidance-distilled models.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the first sample; sample i uses seed + i.")] = 0,
    height: Annotated[int | None, typer.Option()] = None,
    width: Annotated[int | None, typer.Option()] = None,
    num_frames: Annotated[int | None, typer.Option(help="Frames (video families).")] = None,
    samples_per_prompt: Annotated[int, typer.Option()] = 1,
    batch_size: Annotated[int, typer.Option()] = 4,
    sampler: Annotated[str, typer.Option(help="euler or heun.")] = "euler",
    one_step: Annotated[bool, typer.Option("--one-step", help="One-step generator checkpoint.")] = False,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda if present).")
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="fp32, bf16 or fp16 (default: bf16 on GPU).")] = None,
    fps: Annotated[int, typer.Option(help="Frames per second of written videos.")] = 8,
) -> None:
    """Generate images (PNG) or videos (MP4 + GIF) and a manifest.jsonl from prompts."""
    from flowalign.data.prompts import load_prompts
    from flowalign.models import load_flow_model
    from flowalign.pipelines.generate_files import GenerationSettings, generate_files

    if steps is not None and steps < 1:
        fail(f"--steps must be >= 1, got {steps}")
    if samples_per_prompt < 1:
        fail(f"--samples-per-prompt must be >= 1, got {samples_per_prompt}")
    if sampler not in ("euler", "heun"):
        fail(f"--sampler must be euler or heun, got {sampler!r}")
    if not prompt and prompts_file is None:
        fail("give --prompt TEXT or --prompts-file FILE")
    try:
        prompts = list(prompt or [])
        if prompts_file is not None:
            prompts += load_prompts(prompts_file)
        if not prompts or any(not p.strip() for p in prompts):
            fail("a prompt is empty")
        torch_device, torch_dtype = _device_and_dtype(device, dtype)
        flow_model = load_flow_model(model, torch_dtype=torch_dtype, device=torch_device)
        settings = GenerationSettings(
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            true_cfg_scale=true_cfg_scale,
            height=height,
            width=width,
            num_frames=num_frames,
            negative_prompt=negative_prompt,
            sampler=sampler,
            one_step=one_step,
            seed=seed,
            samples_per_prompt=samples_per_prompt,
            fps=fps,
        )
        rows = generate_files(
            flow_model, prompts, out, settings, batch_size=batch_size, model_name=str(model)
        )
    except ValueError as err:
        fail(str(err).splitlines()[0])
    typer.echo(f"wrote {len(rows)} samples to {out}")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    sys.exit(main())
