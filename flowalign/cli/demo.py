"""``flowalign demo``: the toy world end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flowalign.cli.app import app
from flowalign.cli.checks import MAX_STEPS, check_count


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder (summary.md, index.html, grids).")] = Path(
        "runs/demo"
    ),
    stages: Annotated[
        str,
        typer.Option(
            help="Comma-separated stages: base, dpo, nrg, onestep, and grpo on request (base always runs)."
        ),
    ] = "base,dpo,nrg,onestep",
    samples: Annotated[int, typer.Option(help="Held-out samples per evaluated model.")] = 256,
    base_steps: Annotated[
        int,
        typer.Option(
            help="Training steps of the toy base model (1500: the base shipped with the package, used by the "
            "tables of docs/results.md; another count is trained on first use)."
        ),
    ] = 1500,
) -> None:
    """The toy world end to end: the shipped base, Flow-DPO, Flow-NRG and a one-step student.

    Every model on the same held-out prompts and seeds: one table, one labelled grid, the eval report."""
    from flowalign.experiments.demo import DemoConfig, run_demo

    check_count(samples, "--samples")
    check_count(base_steps, "--base-steps", hi=MAX_STEPS)
    report = run_demo(
        DemoConfig(
            out_dir=out,
            stages=tuple(s.strip() for s in stages.split(",") if s.strip()),
            num_samples=samples,
            base_steps=base_steps,
        )
    )
    typer.echo(report.table_md())
