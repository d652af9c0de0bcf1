"""``flowalign generate``: sample a model (optionally with Flow-NRG guidance) into media files + a manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flowalign.cli.app import app, device_and_dtype, fail
from flowalign.cli.checks import (
    check_generation_options,
    check_size_before_loading,
    check_size_for_model,
)
from flowalign.validation import short_repr


@app.command()
def generate(
    model: Annotated[str, typer.Option(help="Hub id or local folder in diffusers' layout.")],
    out: Annotated[Path, typer.Option(help="Output folder (media + manifest.jsonl).")],
    prompt: Annotated[list[str] | None, typer.Option(help="A prompt (repeat for several).")] = None,
    prompts_file: Annotated[
        Path | None, typer.Option(help="Prompts: .txt (one per line), .jsonl, .csv, .json.")
    ] = None,
    image: Annotated[
        Path | None, typer.Option(help="Condition image for every prompt (image-to-video, edit).")
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
    no_t5: Annotated[bool, typer.Option("--no-t5", help="SD3/SD3.5: load without the T5 encoder.")] = False,
    fps: Annotated[int, typer.Option(help="Frames per second of written videos.")] = 8,
    guide: Annotated[
        Path | None, typer.Option(help="Latent reward model folder for Flow-NRG guidance.")
    ] = None,
    reward_weights: Annotated[
        str | None, typer.Option(help="Flow-NRG dimension weights, e.g. vq=1,mq=0.5,ta=2.")
    ] = None,
    guidance_strength: Annotated[float, typer.Option(help="Flow-NRG strength w (0 = off).")] = 1.0,
    guide_steps: Annotated[str | None, typer.Option(help="Guide only for t in [a, b], as a:b.")] = None,
    attention_backend: Annotated[
        str, typer.Option(help="sdpa (default) or a diffusers attention backend: flash, sage, xformers, ...")
    ] = "sdpa",
    vae_slicing: Annotated[
        bool, typer.Option("--vae-slicing", help="Decode one sample at a time (same output, less memory).")
    ] = False,
    vae_tiling: Annotated[
        bool, typer.Option("--vae-tiling", help="Decode in blended tiles (less memory at high resolution).")
    ] = False,
) -> None:
    """Generate images (PNG) or videos (MP4 + GIF) and a manifest.jsonl from prompts."""
    from flowalign.data.prompts import load_conditioned_prompts
    from flowalign.models import load_flow_model
    from flowalign.models.vae_savers import enable_vae_savers
    from flowalign.pipelines.generate_files import GenerationSettings, generate_files
    from flowalign.pipelines.one_step import read_one_step_metadata
    from flowalign.training.speed import check_attention_backend, set_attention_backend

    step_range = check_generation_options(
        steps=steps, guidance_scale=guidance_scale, true_cfg_scale=true_cfg_scale, seed=seed,
        height=height, width=width, num_frames=num_frames, samples_per_prompt=samples_per_prompt,
        batch_size=batch_size, fps=fps, guidance_strength=guidance_strength, guide_steps=guide_steps,
    )  # fmt: skip
    if sampler not in ("euler", "heun"):
        fail(f"--sampler must be euler or heun, got {short_repr(sampler)}")
    if not prompt and prompts_file is None:
        fail("give --prompt TEXT or --prompts-file FILE")
    prompts = list(prompt or [])
    images = None
    if prompts_file is not None:
        file_prompts, images = load_conditioned_prompts(prompts_file)
        if images is not None and (prompts or image is not None):
            fail(f"{prompts_file} names a condition image per prompt: give no --prompt or --image with it")
        prompts += file_prompts
    if not prompts or any(not p.strip() for p in prompts):
        fail("a prompt is empty")
    if image is not None:
        if not image.is_file():
            fail(f"--image {image} does not exist")
        images = [image] * len(prompts)
    check_attention_backend(attention_backend, key="--attention-backend")
    torch_device, torch_dtype = device_and_dtype(device, dtype)
    batch = min(batch_size, len(prompts) * samples_per_prompt)
    check_size_before_loading(height, width, num_frames, batch, torch_device)
    flow_model = load_flow_model(model, torch_dtype=torch_dtype, device=torch_device, drop_t5=no_t5)
    set_attention_backend(flow_model.transformer, attention_backend, key="--attention-backend")
    try:
        keys = ("--vae-slicing", "--vae-tiling")
        enable_vae_savers(flow_model, slicing=vae_slicing, tiling=vae_tiling, keys=keys)
    except ValueError as err:
        fail(str(err))
    one_step_meta = read_one_step_metadata(model) if Path(model).is_dir() else None
    if one_step_meta is not None:  # a distilled checkpoint samples in one step with its recorded guidance
        one_step = True
        if guidance_scale is None:
            guidance_scale = one_step_meta.get("guidance_scale") or 1.0
    if one_step and steps not in (None, 1):
        fail(f"--one-step samples in one step; --steps {steps} does not apply")
    check_size_for_model(flow_model, height, width, num_frames, batch, torch_device)
    if images is None and flow_model.requires_images:
        fail(f"{model} makes media from an image: give --image PATH or a prompts file with an image column")
    if images is not None and not flow_model.takes_images:
        fail(f"{model} is text-conditioned only: it takes no condition image")
    settings = GenerationSettings(
        num_inference_steps=steps, guidance_scale=guidance_scale, true_cfg_scale=true_cfg_scale,
        height=height, width=width, num_frames=num_frames, negative_prompt=negative_prompt,
        sampler=sampler, one_step=one_step, seed=seed, samples_per_prompt=samples_per_prompt, fps=fps,
    )  # fmt: skip
    factory = None
    if guide is not None:
        size = (height, width, num_frames)
        factory = _nrg_factory(flow_model, guide, reward_weights, guidance_strength, step_range, size)
        settings.extra = {
            "guide": str(guide),
            "reward_weights": reward_weights,
            "guidance_strength": guidance_strength,
            "guide_steps": guide_steps,
        }
    rows = generate_files(
        flow_model, prompts, out, settings, batch_size=batch_size, model_name=str(model),
        transforms_factory=factory, images=images,
    )  # fmt: skip
    typer.echo(f"wrote {len(rows)} samples to {out}")


def _nrg_factory(flow_model, guide: Path, weights: str | None, strength: float, step_range, size=(None,) * 3):
    """Per-batch Flow-NRG transforms from a latent reward folder (errors name the bad value)."""
    import torch

    from flowalign.rewards.combine import parse_weights
    from flowalign.rewards.latent import LatentRewardModel
    from flowalign.sampling.nrg import latent_reward_guidance

    reward_model = LatentRewardModel.from_pretrained(guide, model=flow_model, device=flow_model.device)
    dims = parse_weights(weights) if weights else {d: 1.0 for d in reward_model.dimensions}
    reward_model.check_weights(dims)
    height = size[0] or flow_model.default_height
    width, frames = size[1] or flow_model.default_width, size[2] or flow_model.default_num_frames

    def transforms(prompts, images=None):
        cond = None
        if images is not None:  # the guide reads the condition images as the sampler does
            with torch.no_grad():
                cond, _ = flow_model.encode_prompt(
                    list(prompts), images=images, height=height, width=width, num_frames=frames
                )
        guidance = latent_reward_guidance(
            flow_model, reward_model, prompts, dims, strength=strength, step_range=step_range, cond=cond
        )
        return [guidance]

    return transforms
