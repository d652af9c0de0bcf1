"""``flowalign push``: upload a finished run (weights, model card, config, eval, samples) to the Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flowalign.cli.app import app, fail


@app.command("push")
def push(
    run: Annotated[
        Path, typer.Argument(help="A finished training run folder (with final/ and config.yaml).")
    ],
    repo_id: Annotated[str, typer.Option(help="Hub repository, e.g. me/sd35m-dpo-lora.")],
    eval_dir: Annotated[
        Path | None, typer.Option("--eval", help="An eval folder (report.json) whose table goes in the card.")
    ] = None,
    eval_model: Annotated[
        str | None,
        typer.Option(help="The model of that eval whose samples form the grid (default: first tuned)."),
    ] = None,
    ema: Annotated[bool, typer.Option("--ema", help="Upload final-ema instead of final.")] = False,
    license: Annotated[str, typer.Option(help="License id for the card's front matter.")] = "other",
    private: Annotated[bool, typer.Option("--private", help="Create the repository private.")] = False,
    out: Annotated[
        Path | None,
        typer.Option(help="Only write the upload folder here (nothing is uploaded): look before you push."),
    ] = None,
) -> None:
    """Share a run: LoRA or model, a model card with the recipe, data, eval table and a sample grid."""
    from flowalign.sharing.push import build_upload_folder, push_run

    if "/" not in repo_id.strip("/") or repo_id.count("/") != 1:
        fail(f"--repo-id: expected owner/name, got {repo_id!r}")
    options = {"eval_dir": eval_dir, "eval_model": eval_model, "ema": ema, "license": license}
    if out is not None:
        folder = build_upload_folder(run, out, repo_id=repo_id, **options)
        typer.echo(
            f"wrote {folder} ({sum(1 for p in folder.rglob('*') if p.is_file())} files); nothing uploaded"
        )
        return
    url = push_run(run, repo_id=repo_id, private=private, **options)
    typer.echo(f"pushed {run} to {repo_id}: {url}")
