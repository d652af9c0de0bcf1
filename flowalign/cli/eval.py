"""``flowalign eval``: evaluate models on prompt sets with rewards into report.json + report.html."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flowalign.cli.app import (
    RUN_ERROR,
    app,
    device_and_dtype,
    fail,
    number,
    parse_floats,
    parse_ints,
    weights_option,
)
from flowalign.cli.checks import (
    MAX_FRAMES,
    MAX_SIDE,
    check_count,
    check_scale,
    check_seed,
    check_steps,
)


@app.command("eval")
def eval_(
    out: Annotated[Path, typer.Option(help="Evaluation folder (report.html, report.json, media, scores).")],
    models: Annotated[
        list[str] | None, typer.Option(help="name=path[:key=value,...] (repeat); a path alone too.")
    ] = None,
    prompts: Annotated[
        list[str] | None, typer.Option(help="Prompt set: toy-heldout, parti:FILE, a prompts file...")
    ] = None,
    rewards: Annotated[str, typer.Option(help="Reward names, comma separated.")] = "toy",
    samples_per_prompt: Annotated[int, typer.Option()] = 1,
    seeds: Annotated[str, typer.Option(help="Base seeds of repetitions, comma separated.")] = "0",
    base: Annotated[str | None, typer.Option(help="Name of the base model for win rates and drift.")] = None,
    weights: Annotated[str | None, typer.Option(help="Dimension weights for 'overall'.")] = None,
    steps: Annotated[int | None, typer.Option()] = None,
    guidance_scale: Annotated[float | None, typer.Option()] = None,
    guidance_sweep: Annotated[
        str | None,
        typer.Option(
            help="Evaluate every model at each of these guidance scales (e.g. 1,2,3), as NAME_cfgG."
        ),
    ] = None,
    rerun: Annotated[
        bool, typer.Option("--rerun", help="Re-run from OUT/report.json, reusing everything.")
    ] = False,
    fid_weights: Annotated[
        Path | None,
        typer.Option(
            help="Inception weights for FID/KID: inception-2015-12-05.pt (paper-comparable) or torchvision."
        ),
    ] = None,
    fid_reference: Annotated[
        str | None, typer.Option(help="Reference media folder or manifest for FID/KID.")
    ] = None,
    clip_fd_model: Annotated[
        str | None,
        typer.Option(help="CLIP model for CLIP-FD against --fid-reference (as the clip reward takes)."),
    ] = None,
    lpips_weights: Annotated[
        Path | None, typer.Option(help="Local AlexNet weights for LPIPS diversity.")
    ] = None,
    device: Annotated[str | None, typer.Option()] = None,
    dtype: Annotated[str | None, typer.Option(help="fp32, bf16 or fp16 (default: bf16 on GPU).")] = None,
) -> None:
    """Compare checkpoints on prompt sets with rewards: one reproducible HTML + JSON report."""
    from flowalign.evals.runner import rerun_eval, run_eval

    if rerun:
        result = rerun_eval(out)
    else:
        if not models or not prompts:
            fail("give --models and --prompts (or --rerun)")
        check_count(samples_per_prompt, "--samples-per-prompt")
        check_steps(steps)
        check_scale(guidance_scale, "--guidance-scale")
        seed_list = parse_ints(seeds, "--seeds")
        for seed in seed_list:
            check_seed(seed, "--seeds")
        reward_names = [r.strip() for r in rewards.split(",") if r.strip()]
        if not reward_names:
            fail("--rewards: give at least one reward name")
        specs = _model_specs(models, guidance_sweep, guidance_scale)
        options = _options(
            steps,
            guidance_scale,
            weights,
            base,
            (fid_weights, fid_reference, clip_fd_model),
            lpips_weights,
            device,
            dtype,
        )
        result = run_eval(
            specs, prompts if len(prompts) > 1 else prompts[0], reward_names, out_dir=out,
            samples_per_prompt=samples_per_prompt, seeds=seed_list, options=options,
        )  # fmt: skip
    _report_outcome(result)


def _report_outcome(result) -> None:
    """Print the failures and the files; exit 1 when nothing was generated or scored."""
    for failure in result.failures:
        typer.echo(f"failed: {failure}", err=True)
    typer.echo(f"wrote {result.html_path} and {result.json_path}")
    if not result.report.get("timings", {}).get("num_samples"):
        fail(f"no sample was generated ({len(result.failures)} failures; see {result.json_path})", RUN_ERROR)
    if not result.report.get("dimensions"):
        fail(
            f"no reward scored any sample ({len(result.failures)} failures; see {result.json_path})",
            RUN_ERROR,
        )


def _options(steps, guidance_scale, weights, base, distances, lpips_weights, device, dtype):
    """The :class:`EvalOptions` of the command line, its paths checked; ``distances`` = (FID weights,
    reference, CLIP-FD model)."""
    from flowalign.evals.types import EvalOptions
    from flowalign.pipelines.generate_files import GenerationSettings

    fid_weights, fid_reference, clip_fd_model = distances
    if (fid_weights is not None or clip_fd_model is not None) != (fid_reference is not None):
        fail("--fid-reference goes with --fid-weights or --clip-fd-model (and they need it)")
    for option, path in (("--fid-weights", fid_weights), ("--lpips-weights", lpips_weights)):
        if path is not None and not path.exists():
            fail(f"{option}: {path} does not exist")
    torch_device, torch_dtype = device_and_dtype(device, dtype)
    return EvalOptions(
        settings=GenerationSettings(num_inference_steps=steps, guidance_scale=guidance_scale),
        weights=weights_option(weights),
        base=base,
        fid_weights=str(fid_weights) if fid_weights else None,
        fid_reference=fid_reference,
        clip_fd_model=clip_fd_model,
        lpips_weights=str(lpips_weights) if lpips_weights else None,
        device=torch_device,
        dtype=torch_dtype,
    )


_NUMERIC_SETTINGS = {  # model-spec settings checked like the options they stand for
    "num_inference_steps": lambda v, o: check_steps(v, o),
    "guidance_scale": lambda v, o: check_scale(v, o),
    "true_cfg_scale": lambda v, o: check_scale(v, o),
    "height": lambda v, o: number(v, o, lo=1, hi=MAX_SIDE, integer=True),
    "width": lambda v, o: number(v, o, lo=1, hi=MAX_SIDE, integer=True),
    "num_frames": lambda v, o: number(v, o, lo=1, hi=MAX_FRAMES, integer=True),
    "fps": lambda v, o: check_count(v, o, hi=1_000),
}


def _model_specs(models: list[str], guidance_sweep: str | None, guidance_scale: float | None) -> dict:
    """``--models`` (and ``--guidance-sweep``) as named specs, their numeric settings checked."""
    from flowalign.evals.samples import parse_model_spec, sweep_guidance

    specs = {}
    for i, item in enumerate(models):
        name, spec = parse_model_spec(item if "=" in item.split(":")[0] else f"model{i}={item}")
        for key, value in spec.settings.items():
            if key in _NUMERIC_SETTINGS:
                _NUMERIC_SETTINGS[key](value, f"--models {name}: {key}")
        specs[name] = spec
    if guidance_sweep is not None:
        if guidance_scale is not None:
            fail("give --guidance-scale or --guidance-sweep, not both")
        scales = parse_floats(guidance_sweep, "--guidance-sweep")
        for scale in scales:
            check_scale(scale, "--guidance-sweep", lo=1.0)
        specs = sweep_guidance(specs, scales)
    return specs
