"""``flowalign eval``: evaluate models on prompt sets with rewards into report.json + report.html."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flowalign.cli.app import USER_ERRORS, app, device_and_dtype, fail, parse_floats, weights_option


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
    device: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Compare checkpoints on prompt sets with rewards: one reproducible HTML + JSON report."""
    from flowalign.evals.runner import rerun_eval, run_eval
    from flowalign.evals.samples import parse_model_spec, sweep_guidance
    from flowalign.evals.types import EvalOptions
    from flowalign.pipelines.generate_files import GenerationSettings

    try:
        if rerun:
            result = rerun_eval(out)
        else:
            if not models or not prompts:
                fail("give --models and --prompts (or --rerun)")
            specs = {}
            for i, item in enumerate(models):
                name, spec = parse_model_spec(item if "=" in item.split(":")[0] else f"model{i}={item}")
                specs[name] = spec
            if guidance_sweep is not None:
                if guidance_scale is not None:
                    fail("give --guidance-scale or --guidance-sweep, not both")
                specs = sweep_guidance(specs, parse_floats(guidance_sweep, "--guidance-sweep"))
            torch_device, torch_dtype = device_and_dtype(device, None)
            options = EvalOptions(
                settings=GenerationSettings(num_inference_steps=steps, guidance_scale=guidance_scale),
                weights=weights_option(weights),
                base=base,
                device=torch_device,
                dtype=torch_dtype,
            )
            result = run_eval(
                specs,
                prompts if len(prompts) > 1 else prompts[0],
                [r.strip() for r in rewards.split(",") if r.strip()],
                out_dir=out,
                samples_per_prompt=samples_per_prompt,
                seeds=[int(x) for x in seeds.split(",")],
                options=options,
            )
    except USER_ERRORS as err:
        fail(str(err).splitlines()[0])
    for failure in result.failures:
        typer.echo(f"failed: {failure}", err=True)
    typer.echo(f"wrote {result.html_path} and {result.json_path}")
    if result.failures and not result.report.get("timings", {}).get("num_samples"):
        fail(
            f"no sample was generated or scored ({len(result.failures)} failures; see {result.json_path})", 1
        )
