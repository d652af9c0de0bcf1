"""``flowalign plan``: predicted peak memory per GPU of a training recipe, and the switches that make it fit."""

from __future__ import annotations

from typing import Annotated

import typer

from flowalign.cli.app import app, number
from flowalign.cli.checks import MAX_FRAMES, MAX_SIDE, check_count
from flowalign.validation import short_repr


@app.command()
def plan(
    target: Annotated[
        str, typer.Argument(help="A preset (e.g. sd35m-lora-dpo), 'all' (every preset) or a training YAML.")
    ],
    gpu_memory: Annotated[
        list[float] | None, typer.Option(help="GiB per GPU (repeat for several; default 24, 40, 80).")
    ] = None,
    num_gpus: Annotated[int | None, typer.Option(help="GPUs the recipe is spread over.")] = None,
    strategy: Annotated[str | None, typer.Option(help="ddp, fsdp, zero2 or zero3.")] = None,
    height: Annotated[int | None, typer.Option()] = None,
    width: Annotated[int | None, typer.Option()] = None,
    frames: Annotated[int | None, typer.Option(help="Frames per clip (video families).")] = None,
    batch: Annotated[int | None, typer.Option(help="Pairs (DPO) or samples per GPU and micro-step.")] = None,
    lora_rank: Annotated[int | None, typer.Option(help="LoRA rank of the recipe.")] = None,
    no_checkpointing: Annotated[
        bool, typer.Option("--no-checkpointing", help="Without gradient checkpointing.")
    ] = False,
    no_t5: Annotated[
        bool, typer.Option("--no-t5", help="SD3/SD3.5 without the T5 encoder (drop_t5).")
    ] = False,
    encoders_on_device: Annotated[
        bool, typer.Option("--encoders-on-device", help="Text encoders on the GPU (no prompt cache).")
    ] = False,
    breakdown: Annotated[bool, typer.Option("--breakdown", help="Every item of each plan.")] = False,
) -> None:
    """Predicted peak memory per GPU of a recipe, whether it fits, and which switches make it fit."""
    from flowalign.planning.command import plan_report, recipes_for
    from flowalign.planning.memory import STRATEGIES
    from flowalign.planning.memory import plan as plan_recipe

    sizes = list(gpu_memory or [24.0, 40.0, 80.0])
    for size in sizes:
        number(size, "--gpu-memory", lo=0.0, lo_open=True, hi=1e6)
    check_count(num_gpus, "--num-gpus", hi=1_000_000)
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {short_repr(strategy)}")
    number(height, "--height", lo=1, hi=MAX_SIDE, integer=True)
    number(width, "--width", lo=1, hi=MAX_SIDE, integer=True)
    number(frames, "--frames", lo=1, hi=MAX_FRAMES, integer=True)
    check_count(batch, "--batch", hi=4_096)
    check_count(lora_rank, "--lora-rank", hi=65_536)
    given = {"num_gpus": num_gpus, "strategy": strategy, "height": height, "width": width, "frames": frames}
    given |= {"batch": batch, "lora_rank": lora_rank}
    changes = {key: value for key, value in given.items() if value is not None}
    if no_checkpointing:
        changes["gradient_checkpointing"] = False
    if no_t5:
        changes["drop_t5"] = True
    if encoders_on_device:
        changes["text_encoders"] = "device"
    plans = {name: plan_recipe(r.replace(**changes)) for name, r in recipes_for(target).items()}
    typer.echo("\n".join(plan_report(plans, sizes, breakdown=breakdown)))
