"""What ``flowalign demo`` writes: one table, one labelled grid, ``summary.md`` and ``index.html``.

Every row is a model evaluated on the same held-out prompts at the same seeds as the base model, so each
row carries the paired difference to the base (mean of per-sample differences, with its standard error)
beside its own mean ± standard error. The grid has one column per held-out prompt (the prompt written
above it) and one row per model, every row drawn from the same noise.
"""

from __future__ import annotations

import html
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from flowalign.evals.stats import mean_and_se
from flowalign.experiments.toy_base import ToyEvaluation

DIMENSIONS = ("ta", "vq", "ta_shape", "all_correct")
"""The table's columns: the two oracle rewards, then the attribute the base gets wrong most, then all four."""
PAIRED = ("ta", "vq")
"""Columns that also show the paired difference to the base."""
LABELS = {
    "ta": "text alignment",
    "vq": "visual quality",
    "ta_shape": "shape right",
    "all_correct": "all four right",
}
GRID_COLUMNS = 8
"""Held-out samples shown per model in the grid, spread over the held-out prompts (every shape)."""
GRID_SCALE = 4
"""Nearest-neighbour upscaling of the 32x32 samples in the grid (each cell 128 px wide)."""


@dataclass
class DemoRow:
    """One evaluated model of the demo."""

    name: str
    evaluation: ToyEvaluation
    source: str
    """Where the model came from: "shipped", "cached", "trained", "distilled", ... with a short note."""
    sampling: str
    """How its samples were drawn (steps, guidance)."""
    seconds: float


def paired_difference(after: Tensor, before: Tensor) -> tuple[float, float]:
    """Mean and standard error of ``after - before`` over samples paired by prompt and seed."""
    if after.shape != before.shape:
        raise ValueError(
            f"paired difference needs the same samples: shapes {tuple(after.shape)} and {tuple(before.shape)}"
        )
    return mean_and_se(after.double() - before.double())


class DemoReport:
    """Accumulates the demo's rows and stage timings; rewrites every output after each change, so an
    interrupted demo keeps what it finished."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.rows: dict[str, DemoRow] = {}
        self.stage_seconds: dict[str, float] = {}
        self.stage_cpu_seconds: dict[str, float] = {}
        self.notes: list[str] = []

    def add(self, row: DemoRow) -> None:
        if self.rows and row.evaluation.prompts != next(iter(self.rows.values())).evaluation.prompts:
            raise ValueError(f"demo row {row.name!r}: evaluated on other prompts than the base")
        self.rows[row.name] = row
        self.write()

    def stage_done(self, stage: str, seconds: float, *, cpu_seconds: float | None = None) -> None:
        """Record a finished stage's wall-clock time (and the process's CPU time, all threads)."""
        self.stage_seconds[stage] = seconds
        if cpu_seconds is not None:
            self.stage_cpu_seconds[stage] = cpu_seconds
        self.write()

    # ------------------------------------------------------------------------------------------ numbers
    def cells(self, row: DemoRow) -> dict[str, str]:
        """The row's table cells, by column label."""
        base = next(iter(self.rows.values()))
        out = {"model": row.name, "from": row.source, "sampling": row.sampling}
        for d in DIMENSIONS:
            mean, se = mean_and_se(row.evaluation.scores[d])
            out[LABELS[d]] = f"{mean:.3f} ± {se:.3f}"
            if d in PAIRED:
                if row is base:
                    out[f"Δ {LABELS[d]}"] = "—"
                else:
                    diff, dse = paired_difference(row.evaluation.scores[d], base.evaluation.scores[d])
                    out[f"Δ {LABELS[d]}"] = f"{diff:+.3f} ± {dse:.3f}"
        out["time"] = f"{row.seconds:.0f} s"
        return out

    def table(self) -> list[dict[str, str]]:
        return [self.cells(row) for row in self.rows.values()]

    def table_md(self) -> str:
        rows = self.table()
        if not rows:
            return ""
        header = list(rows[0])
        lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        lines += ["| " + " | ".join(r[h] for h in header) + " |" for r in rows]
        return "\n".join(lines)

    # --------------------------------------------------------------------------------------------- grid
    def grid_indices(self) -> list[int]:
        """Samples shown in the grid: GRID_COLUMNS spread evenly over the distinct held-out prompts."""
        if not self.rows:
            return []
        prompts = next(iter(self.rows.values())).evaluation.prompts
        distinct = len(dict.fromkeys(prompts))  # prompts cycle, so samples 0..distinct-1 are all different
        columns = min(GRID_COLUMNS, distinct)
        return [k * distinct // columns for k in range(columns)]

    def grid_prompts(self) -> list[str]:
        if not self.rows:
            return []
        prompts = next(iter(self.rows.values())).evaluation.prompts
        return [prompts[i] for i in self.grid_indices()]

    def write_grid(self, path: Path) -> None:
        """``grid.png``: a column per held-out prompt (written above it), a row per model (named left)."""
        index = torch.tensor(self.grid_indices())
        media = {name: row.evaluation.media[index] for name, row in self.rows.items()}
        labelled_grid(self.grid_prompts(), media, scale=GRID_SCALE).save(path)

    def has_pair(self) -> bool:
        """True when both the base (teacher) and the one-step student rows exist."""
        return "base" in self.rows and "one-step" in self.rows

    def write_pair(self, path: Path) -> None:
        """``onestep_vs_teacher.png``: the teacher's samples above the one-step student's, same prompts and
        noise seeds per column (every row of the demo draws sample i from seed 1000 + i)."""
        index = torch.tensor(self.grid_indices())
        media = {
            "teacher (base)": self.rows["base"].evaluation.media[index],
            "one-step student": self.rows["one-step"].evaluation.media[index],
        }
        labelled_grid(self.grid_prompts(), media, scale=GRID_SCALE).save(path)

    # ------------------------------------------------------------------------------------------- output
    def write(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        table = self.table()
        n = next(iter(self.rows.values())).evaluation.scores["ta"].numel() if self.rows else 0
        if self.rows:
            self.write_grid(self.out_dir / "grid.png")
        if self.has_pair():
            self.write_pair(self.out_dir / "onestep_vs_teacher.png")
        record = {
            "samples_per_model": n,
            "models": {
                name: {
                    "source": row.source,
                    "sampling": row.sampling,
                    "seconds": round(row.seconds, 1),
                    "summary": {
                        d: dict(zip(("mean", "se"), mean_and_se(v), strict=True))
                        for d, v in row.evaluation.scores.items()
                    },
                    "cells": cells,
                }
                for (name, row), cells in zip(self.rows.items(), table, strict=True)
            },
            "stage_seconds": {k: round(v, 1) for k, v in self.stage_seconds.items()},
            "stage_cpu_seconds": {k: round(v, 1) for k, v in self.stage_cpu_seconds.items()},
            "grid_prompts": self.grid_prompts(),
            "grid_samples": self.grid_indices(),
            "notes": self.notes,
        }
        (self.out_dir / "summary.json").write_text(json.dumps(record, indent=2) + "\n")
        (self.out_dir / "summary.md").write_text(self._markdown(n))
        (self.out_dir / "index.html").write_text(self._html(n))

    def _intro(self, n: int) -> str:
        return (
            f"Held-out prompts (attribute combinations never seen in training), {n} samples per model; "
            f"sample i has prompt i and seed 1000 + i for every model. Mean ± standard error of the exact "
            f"oracles; Δ is the paired difference to the base (same prompt and seed), ± its standard error."
        )

    def _timings(self) -> list[str]:
        return [
            f"{stage}: {seconds:.0f} s"
            + (f" (CPU {self.stage_cpu_seconds[stage]:.0f} s)" if stage in self.stage_cpu_seconds else "")
            for stage, seconds in self.stage_seconds.items()
        ]

    def _markdown(self, n: int) -> str:
        prompts = self.grid_prompts()
        md = [
            "# flowalign toy demo",
            "",
            self._intro(n),
            "",
            self.table_md(),
            "",
            *[f"- {note}" for note in self.notes],
            "",
            "Stage times (wall clock; the CPU time of all threads in brackets): "
            + ", ".join(self._timings())
            + ".",
            "",
            "![one row per model, one column per prompt, same seeds](grid.png)",
            "",
            "Grid columns, left to right (the same seed down a column): "
            + "; ".join(f"{p} (seed {1000 + i})" for i, p in zip(self.grid_indices(), prompts, strict=True))
            + ".",
        ]
        if self.has_pair():
            md += [
                "",
                "![the teacher above its one-step student, same prompt and noise per column]"
                "(onestep_vs_teacher.png)",
            ]
        return "\n".join(md) + "\n"

    def _html(self, n: int) -> str:
        table = self.table()
        header = list(table[0]) if table else []
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(r[h])}</td>" for h in header) + "</tr>" for r in table
        )
        prompts = "".join(
            f"<li>{html.escape(p)} (seed {1000 + i})</li>"
            for i, p in zip(self.grid_indices(), self.grid_prompts(), strict=True)
        )
        rows = "".join(f"<li>{html.escape(name)}</li>" for name in self.rows)
        return (
            "<!doctype html><meta charset='utf-8'><title>flowalign toy demo</title>"
            "<style>body{font-family:sans-serif;margin:2em;max-width:80em}td,th{padding:4px 8px;"
            "border-bottom:1px solid #ddd;text-align:left}img{image-rendering:pixelated;max-width:100%}</style>"
            f"<h1>flowalign toy demo</h1><p>{html.escape(self._intro(n))}</p>"
            f"<table><tr>{head}</tr>{body}</table>"
            + "".join(f"<p>{html.escape(note)}</p>" for note in self.notes)
            + f"<p>Stage times (wall clock; the CPU time of all threads in brackets): {html.escape(', '.join(self._timings()))}.</p>"
            + "<figure><img src='grid.png' alt='samples: one row per model, one column per prompt'>"
            + f"<figcaption>Rows, top to bottom: <ol>{rows}</ol>Columns, left to right (the prompt above "
            + f"each column; the same seed down a column): <ol>{prompts}</ol></figcaption></figure>"
            + (
                "<figure><img src='onestep_vs_teacher.png' alt='teacher above its one-step student'>"
                "<figcaption>The teacher (top) and its one-step student (bottom) from the same noise "
                "and prompt in each column.</figcaption></figure>"
                if self.has_pair()
                else ""
            )
        )


def labelled_grid(prompts: list[str], media: dict[str, Tensor], *, scale: int = 4):
    """A PIL image: one column per prompt with the prompt written above it, one row per model named on the left.

    ``media`` maps a row label to images [len(prompts), 3, H, W] in [0, 1] (a row may have fewer).
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    first = next(iter(media.values()))
    cell_h, cell_w = first.shape[-2] * scale, first.shape[-1] * scale
    pad, line_h = 6, 12
    chars = max(8, cell_w // 6)  # the default bitmap font is 6 px per character
    wrapped = [textwrap.wrap(p, chars) or [""] for p in prompts]
    head_h = line_h * max(len(w) for w in wrapped) + 2 * pad
    label_w = max(6 * max(len(name) for name in media) + 2 * pad, 40)
    width = label_w + len(prompts) * (cell_w + pad) + pad
    height = head_h + len(media) * (cell_h + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, lines in enumerate(wrapped):
        x = label_w + j * (cell_w + pad)
        for k, line in enumerate(lines):
            draw.text((x, pad + k * line_h), line, fill="black", font=font)
    for i, (name, images) in enumerate(media.items()):
        y = head_h + i * (cell_h + pad)
        draw.text((pad, y + cell_h // 2 - line_h // 2), name, fill="black", font=font)
        for j, image in enumerate(images[: len(prompts)]):
            pixels = (image.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            tile = Image.fromarray(pixels).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (label_w + j * (cell_w + pad), y))
    return canvas
