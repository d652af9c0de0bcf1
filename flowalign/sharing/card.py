"""The model card of a run: front matter the Hub reads, the recipe, the data, the eval table, a sample grid.

The card is a Jinja2 template (``flowalign/sharing/templates/model_card.md.j2``) filled from what a run
folder holds (``config.yaml``) and, optionally, an evaluation's ``report.json``. The front matter comes
from ``huggingface_hub.ModelCardData`` so its keys are the ones the Hub indexes (``base_model``,
``library_name``, ``tags``...).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CardInputs", "eval_rows", "recipe_rows", "render_card", "render_card_html", "run_method"]

METHODS = {
    "dpo": "Flow-DPO",
    "rwr": "Flow-RWR",
    "sft": "supervised fine-tuning",
    "fdistill": "f-distill (one-step distillation)",
    "distar": "Diff-Instruct* (one-step distillation)",
    "latent_reward": "latent reward model (Flow-NRG guidance)",
    "reward": "reward model",
    "cdt": "CDT video tokenizer",
    "grpo": "Flow-GRPO",
}
"""Top-level config keys that name the training method, and the name the card gives it."""

_RECIPE_KEYS = {
    "train": ("max_steps", "batch_size", "grad_accum_steps", "mixed_precision", "seed"),
    "train.optim": ("lr", "weight_decay"),
    "lora": ("rank", "alpha"),
}


def run_method(config: Mapping[str, Any]) -> str:
    """The method key of a resolved run config (``dpo``, ``rwr``...), or ``"fine-tune"`` if none matches."""
    return next((key for key in METHODS if isinstance(config.get(key), Mapping)), "fine-tune")


def recipe_rows(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key, value) rows of the settings a reader compares recipes by: the method's own block first."""
    rows = []
    method = run_method(config)
    for key, value in (config.get(method) or {}).items():
        if not isinstance(value, Mapping | list):
            rows.append((f"{method}.{key}", str(value)))
    for dotted, keys in _RECIPE_KEYS.items():
        block: Any = config
        for part in dotted.split("."):
            block = block.get(part) if isinstance(block, Mapping) else None
        for key in keys:
            if isinstance(block, Mapping) and key in block:
                rows.append((f"{dotted}.{key}", str(block[key])))
    return rows


def eval_rows(report: Mapping[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """The eval table: dimension names, and one row per (prompt set, model) with ``mean ± se`` cells."""
    dims = list(report.get("dimensions") or [])
    rows = []
    for set_name, result in (report.get("results") or {}).items():
        stats = result.get("stats") or {}
        for model in result.get("models") or list(stats):
            cells = []
            for dim in dims:
                s = stats.get(model, {}).get(dim)
                cells.append(f"{s['mean']:.3f} ± {s['se']:.3f}" if s else "n/a")
            fid = (result.get("fid") or {}).get(model) or {}
            inception = fid.get("inception") or {}
            rows.append(
                {
                    "set": set_name,
                    "model": model,
                    "cells": cells,
                    "n": (result.get("num_samples") or {}).get(model, ""),
                    "fid": f"{inception['fid']:.2f}" if "fid" in inception else "",
                }
            )
    return dims, rows


@dataclass
class CardInputs:
    """What a model card says; :func:`flowalign.sharing.push.build_upload_folder` fills it from a run."""

    repo_id: str
    config: dict[str, Any]
    weights_kind: str  # "lora" or "full"
    media_kind: str = "image"  # "image" or "video"
    license: str = "other"
    eval_report: dict[str, Any] | None = None
    sample_grid: str | None = None  # file name inside the upload folder
    extra_tags: list[str] = field(default_factory=list)
    version: str = ""


def _cell(value: Any) -> str:
    """Text safe inside a Markdown table cell: no HTML, no column breaks, one line."""
    from html import escape

    return " ".join(escape(str(value), quote=False).replace("|", "\\|").split())


def _hub_id(model: str) -> str | None:
    """``model`` if it reads as a Hub repository id (owner/name, not a local path), else None."""
    if (
        not model
        or model.startswith(("toy:", "/", ".", "~"))
        or Path(model).exists()
        or model.count("/") != 1
    ):
        return None
    return model


def render_card(inputs: CardInputs) -> str:
    """The card's Markdown text (front matter + body)."""
    import jinja2
    from huggingface_hub import ModelCardData

    config = inputs.config
    method = run_method(config)
    base_model = str(config.get("model") or config.get("teacher") or "")
    tags = ["flowalign", method, "diffusers", "flow-matching", f"text-to-{inputs.media_kind}"]
    if inputs.weights_kind == "lora":
        tags.append("lora")
    data = ModelCardData(
        base_model=_hub_id(base_model),
        library_name="diffusers",
        license=inputs.license,
        tags=[*tags, *inputs.extra_tags],
        pipeline_tag=f"text-to-{inputs.media_kind}",
    )
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("flowalign.sharing", "templates"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters["cell"] = _cell
    dims, rows = eval_rows(inputs.eval_report) if inputs.eval_report else ([], [])
    body = env.get_template("model_card.md.j2").render(
        repo_id=inputs.repo_id,
        method=METHODS.get(method, method),
        base_model=base_model or "unknown",
        data=str(config.get("data", "")),
        lora=inputs.weights_kind == "lora",
        recipe=recipe_rows(config),
        dims=dims,
        rows=rows,
        has_fid=any(r["fid"] for r in rows),
        sample_grid=inputs.sample_grid,
        version=inputs.version,
        command=method if method in METHODS else "<method>",
    )
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def render_card_html(card: str, *, title: str = "model card") -> str:
    """The card as a standalone HTML page (Markdown with tables, front matter as a code block), to preview it."""
    from html import escape

    from markdown_it import MarkdownIt

    front, body = "", card
    if card.startswith("---\n"):
        end = card.index("\n---\n", 4)
        front, body = card[4:end], card[end + 5 :]
    rendered = MarkdownIt("commonmark").enable("table").render(body)
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{escape(title)}</title>'
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.2em .5em}</style></head><body>"
        f'<pre class="front-matter">{escape(front)}</pre>{rendered}</body></html>'
    )


def card_path(folder: Path) -> Path:
    """Where the card lives in an upload folder (the Hub shows ``README.md``)."""
    return folder / "README.md"
