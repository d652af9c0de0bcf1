"""``flowalign pairs``, ``rechoose`` and ``score``: build preference data and score media files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flowalign.cli.app import app, device_and_dtype, fail, number, weights_option
from flowalign.cli.checks import (
    MAX_BATCH,
    check_count,
    check_scale,
    check_seed,
    check_size_before_loading,
    check_size_for_model,
    check_size_options,
    check_steps,
)


@app.command()
def pairs(
    model: Annotated[str, typer.Option(help="Model to sample candidates from.")],
    out: Annotated[Path, typer.Option(help="Output folder: pairs.jsonl, candidates.jsonl, media.")],
    reward: Annotated[
        str, typer.Option(help="Reward names, comma separated (e.g. toy or pickscore,hpsv2.1).")
    ],
    prompts_file: Annotated[Path | None, typer.Option(help="Prompts file.")] = None,
    toy_split: Annotated[
        str | None, typer.Option(help="Use the toy world's prompts: train or heldout.")
    ] = None,
    weights: Annotated[str | None, typer.Option(help="Dimension weights, e.g. ta=1,vq=0.5.")] = None,
    num_candidates: Annotated[int, typer.Option(help="Samples per prompt (K).")] = 4,
    mode: Annotated[str, typer.Option(help="best_worst or all.")] = "best_worst",
    margin: Annotated[float, typer.Option(help="Minimum reward gap for a pair.")] = 0.0,
    steps: Annotated[int | None, typer.Option()] = None,
    guidance_scale: Annotated[float | None, typer.Option()] = None,
    seed: Annotated[int, typer.Option()] = 0,
    batch_size: Annotated[int, typer.Option()] = 32,
    video_format: Annotated[
        str, typer.Option(help="Video files: mp4 (lossy) or npy (exact frames, for tiny clips).")
    ] = "mp4",
    height: Annotated[int | None, typer.Option(help="Sample height (family default if unset).")] = None,
    width: Annotated[int | None, typer.Option(help="Sample width (family default if unset).")] = None,
    num_frames: Annotated[int | None, typer.Option(help="Frames (video families).")] = None,
    fps: Annotated[float, typer.Option(help="Frames per second of MP4 candidates.")] = 8.0,
    device: Annotated[str | None, typer.Option()] = None,
    dtype: Annotated[str | None, typer.Option(help="fp32, bf16 or fp16 (default: bf16 on GPU).")] = None,
) -> None:
    """Build a preference dataset from a model: K samples per prompt, scored, best vs worst."""
    from flowalign.data.prompts import load_conditioned_prompts
    from flowalign.models import load_flow_model
    from flowalign.rewards import load_reward
    from flowalign.rewards.combine import RewardCombiner
    from flowalign.rewards.registry import parse_reward_spec
    from flowalign.toy.world import toy_prompts
    from flowalign.workflows.pairs import PairsConfig, build_pairs

    check_count(num_candidates, "--num-candidates", lo=2, hi=1_024)
    number(margin, "--margin", lo=0.0)
    check_steps(steps)
    check_scale(guidance_scale, "--guidance-scale")
    check_seed(seed)
    check_count(batch_size, "--batch-size", hi=MAX_BATCH)
    check_size_options(height, width, num_frames)
    config = PairsConfig(
        num_candidates=num_candidates, mode=mode, margin=margin, seed=seed, guidance_scale=guidance_scale,
        num_inference_steps=steps, batch_size=batch_size, video_ext="." + video_format.lstrip("."),
        fps=fps, height=height, width=width, num_frames=num_frames,
    )  # fmt: skip
    specs = [parse_reward_spec(spec) for spec in reward.split(",") if spec.strip()]
    if not specs:
        fail("--reward: give at least one reward name")
    images = None
    if toy_split is not None:
        prompt_list = toy_prompts(toy_split, "image")
    elif prompts_file is not None:
        prompt_list, images = load_conditioned_prompts(prompts_file)  # with an image column: conditions
    else:
        fail("give --prompts-file FILE or --toy-split train|heldout")
    torch_device, torch_dtype = device_and_dtype(device, dtype)
    batch = min(batch_size, num_candidates * max(len(prompt_list), 1))
    check_size_before_loading(height, width, num_frames, batch, torch_device)
    flow_model = load_flow_model(model, torch_dtype=torch_dtype, device=torch_device)
    if flow_model.is_video and toy_split is not None:
        prompt_list = toy_prompts(toy_split, "video")
    check_size_for_model(flow_model, height, width, num_frames, batch, torch_device)
    _check_size_is_free(flow_model, num_frames)
    rewards = [load_reward(name, device=torch_device, **options) for name, options in specs]
    combiner = RewardCombiner(rewards, weights_option(weights))
    _, chosen = build_pairs(flow_model, prompt_list, combiner.score, out, config, images=images)
    typer.echo(f"wrote {len(chosen)} pairs to {out / 'pairs.jsonl'}")


def _check_size_is_free(flow_model, num_frames: int | None) -> None:
    """Refuse a frame count on a family that fixes its own (the toy video model's clip length)."""
    fixed = getattr(type(flow_model), "default_num_frames", None)
    if num_frames is not None and isinstance(fixed, property) and fixed.fset is None:
        if num_frames != flow_model.default_num_frames:
            raise ValueError(f"--num-frames: this {flow_model.family} model samples only its own clip length")


@app.command()
def rechoose(
    folder: Annotated[Path, typer.Argument(help="A folder written by 'flowalign pairs'.")],
    weights: Annotated[str, typer.Option(help="New dimension weights, e.g. ta=1 or ta=1,vq=0.1.")],
    out_file: Annotated[str, typer.Option(help="Name of the new pairs jsonl inside FOLDER.")],
    mode: Annotated[str, typer.Option(help="best_worst or all.")] = "best_worst",
    margin: Annotated[float, typer.Option(help="Minimum weighted-score gap for a pair.")] = 0.0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT_FILE.")] = False,
) -> None:
    """Choose pairs again from scored candidates with new weights, without sampling them again."""
    from flowalign.workflows.pairs import rechoose_pairs

    number(margin, "--margin", lo=0.0)
    path, chosen = rechoose_pairs(
        folder,
        weights_option(weights) or {},
        filename=out_file,
        mode=mode,
        margin=margin,
        overwrite=overwrite,
    )
    typer.echo(f"wrote {len(chosen)} pairs to {path}")


@app.command()
def score(
    reward: Annotated[str, typer.Option(help="Reward names, comma separated; options as name:key=value.")],
    media: Annotated[list[str], typer.Option(help="A manifest.jsonl, a folder, or files (repeat).")],
    out: Annotated[Path, typer.Option(help="scores.jsonl (incremental, resumable) or .parquet.")],
    prompts: Annotated[
        Path | None, typer.Option(help="Prompts file, one per media file (not with a manifest).")
    ] = None,
    weights: Annotated[
        str | None, typer.Option(help="Dimension weights for 'overall', e.g. vq=1,mq=0.5,ta=2.")
    ] = None,
    batch_size: Annotated[int, typer.Option()] = 16,
    device: Annotated[str | None, typer.Option()] = None,
    dtype: Annotated[str | None, typer.Option(help="fp32, bf16 or fp16 (default: bf16 on GPU).")] = None,
) -> None:
    """Score media with one or more reward models."""
    from flowalign.data.prompts import load_prompts
    from flowalign.rewards.registry import parse_reward_spec
    from flowalign.rewards.scoring import score_files

    check_count(batch_size, "--batch-size", hi=MAX_BATCH)
    specs = [parse_reward_spec(s) for s in reward.split(",") if s.strip()]
    if not specs:
        fail("--reward: give at least one reward name")
    names = [name for name, _ in specs]
    kwargs = {name: opts for name, opts in specs if opts}
    prompt_list = load_prompts(prompts) if prompts is not None else None
    source = media[0] if len(media) == 1 else media
    torch_device, torch_dtype = device_and_dtype(device, dtype)
    result = score_files(
        names, source, prompt_list, weights_option(weights), out, batch_size=batch_size,
        device=torch_device, dtype=torch_dtype, reward_kwargs=kwargs,
    )  # fmt: skip
    typer.echo(f"scored {result.num_scored} items ({result.num_skipped} already done) into {out}")
