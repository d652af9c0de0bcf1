"""The evaluation report: ``report.json`` (all numbers) and a self-contained ``report.html`` rendered from it.

``render_report(out_dir)`` reads only ``report.json`` and the media files it names (paths relative to
``out_dir`` unless absolute), so re-rendering a copied folder reproduces the same page byte for byte.
The page has no external resources: sample grids are embedded as base64 PNG (animated GIF for videos),
plots are inline SVG, and there is no script. Every text from outside (prompts, model names, paths,
error messages) is HTML-escaped.

Every number shown comes from ``report.json``: it is printed with :func:`format_number` inside
``<span class="num" data-key="JSON pointer" data-value="exact value">``, so a reader (or a test) can
check the page against the JSON.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

import torch
from jinja2 import ChainableUndefined, Environment, PackageLoader, Undefined
from markupsafe import Markup
from torch import Tensor

from flowalign.evals.grid import image_grid, upscale_nearest
from flowalign.evals.plots import colour_for, curve_plot, forest_plot, histogram_plot
from flowalign.evals.samples import swept_model
from flowalign.evals.types import clean_json
from flowalign.files import atomic_write_json, atomic_write_text

__all__ = [
    "format_number",
    "json_pointer",
    "load_report",
    "render_report",
    "resolve_pointer",
    "write_report_json",
]

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
THUMB_MIN = 96  # small samples (toy 32x32) are enlarged to at least this many pixels, without blurring
THUMB_MAX = 256  # large samples are shrunk to at most this
GIF_FRAMES = 16  # longer clips are shown with this many evenly spaced frames

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:2em}h3{margin-top:1.4em}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;
vertical-align:top;font-size:13px}th{background:#f3f3f3}.num{font-variant-numeric:tabular-nums}
.ci{color:#666}.failures{background:#fff0f0;border:1px solid #e0a0a0;padding:8px 14px}.flag{color:#b00020}
.plots{display:flex;flex-wrap:wrap;gap:12px}.plot .title{font-size:13px;font-weight:600}
.plot .tick{font-size:10px;fill:#555}.plot .label{font-size:11px}.grid td{text-align:center}.grid td:first-child{text-align:left}
.grid img{image-rendering:pixelated;max-width:520px}.prompt{max-width:260px;text-align:left!important}
.missing{color:#b00020;font-size:12px}code{background:#f6f6f6;padding:0 3px}
"""


def json_pointer(*parts: Any) -> str:
    """RFC 6901 pointer to a value in report.json (``~`` and ``/`` inside names escaped)."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def resolve_pointer(doc: Any, pointer: str) -> Any:
    """The value a :func:`json_pointer` names in a loaded report."""
    value = doc
    for token in pointer.split("/")[1:]:
        token = token.replace("~1", "/").replace("~0", "~")
        value = value[int(token)] if isinstance(value, list) else value[token]
    return value


def format_number(value: Any) -> str:
    """How the page prints a number: 4 significant digits; integers in full; ``n/a`` for missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def write_report_json(report: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> Path:
    """Write ``report.json`` atomically (strict JSON: NaN/inf become null) and return its path."""

    return atomic_write_json(Path(out_dir) / REPORT_JSON, clean_json(report), indent=1, allow_nan=False)


def load_report(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``report.json`` from an evaluation folder.

    Raises:
        FileNotFoundError: no report.json there.
        ValueError: it is not a flowalign eval report (naming the file).
    """
    path = Path(out_dir) / REPORT_JSON
    if not path.is_file():
        raise FileNotFoundError(f"no {REPORT_JSON} in {out_dir}")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(report, dict) or not str(report.get("format", "")).startswith("flowalign.eval/"):
        raise ValueError(f"{path}: not a flowalign eval report (no 'format': 'flowalign.eval/...')")
    return report


def _escape(value: Any) -> Markup:
    """How the page escapes every value from outside: ``html.escape`` (quotes too); markup is kept."""
    if isinstance(value, Undefined):
        value = None
    return value if isinstance(value, Markup) else Markup(escape(str(value)))


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("flowalign.evals", "templates"),
        autoescape=True,
        finalize=_escape,
        undefined=ChainableUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = lambda v: format_number(None if isinstance(v, Undefined) else v)
    env.filters["json"] = json.dumps
    env.filters["delta"] = lambda d: Markup("&Delta; ") + _escape(d)
    env.globals["colour_for"] = colour_for
    return env


class _Page:
    """The report for the templates; ``num`` prints a report value with its JSON pointer."""

    def __init__(self, report: Mapping[str, Any], out_dir: Path) -> None:
        self.report, self.out_dir = report, out_dir

    def num(self, *path: Any) -> Markup:
        """The number at ``path`` (tuples in it are spliced: ``num(base, "stats", m)``)."""
        path = tuple(q for p in path for q in (p if isinstance(p, tuple) else (p,)))
        value: Any = self.report
        for p in path:
            value = value[p]
        return Markup(
            f'<span class="num" data-key="{escape(json_pointer(*path))}" data-value="{escape(repr(value))}">'
            f"{format_number(value)}</span>"
        )

    def interval(self, *path: Any, mean: str = "mean") -> Markup:
        """``mean [low, high]`` of a stats dict at ``path``."""
        return Markup(
            f"{self.num(*path, mean)} <span class='ci'>[{self.num(*path, 'ci_low')}, "
            f"{self.num(*path, 'ci_high')}]</span>"
        )


def _media_path(out_dir: Path, rel: str) -> Path:
    p = Path(rel)
    return p if p.is_absolute() else out_dir / p


def _thumbnail(media: Tensor) -> Tensor:
    """Resize [..., 3, H, W] to a display size (enlarge small ones by an integer factor, shrink big ones)."""
    h, w = media.shape[-2:]
    if max(h, w) < THUMB_MIN:
        return upscale_nearest(media, math.ceil(THUMB_MIN / max(h, w)))
    if max(h, w) > THUMB_MAX:
        scale = THUMB_MAX / max(h, w)
        flat = media.reshape(-1, 3, h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        out = torch.nn.functional.interpolate(flat, size=size, mode="area")
        return out.reshape(*media.shape[:-2], *size)
    return media


def _to_pil(image: Tensor):
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(array)


def _embed(files: Sequence[Path]) -> str:
    """One cell: the samples of a (prompt, model) side by side, as a data URI (PNG, or GIF for videos)."""
    from flowalign.data.media import load_media

    media = torch.stack([_thumbnail(load_media(f)) for f in files])  # [K, 3, H, W] or [K, T, 3, H, W]
    buf = io.BytesIO()
    if media.ndim == 5:
        steps = media.shape[1]
        shown = [i * steps // GIF_FRAMES for i in range(GIF_FRAMES)] if steps > GIF_FRAMES else range(steps)
        frames = [_to_pil(image_grid(media[:, t])) for t in shown]
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=125, loop=0)
        mime = "image/gif"
    elif media.shape[-1] > 128:  # photographs: JPEG keeps the page small
        _to_pil(image_grid(media)).save(buf, format="JPEG", quality=90)
        mime = "image/jpeg"
    else:
        _to_pil(image_grid(media)).save(buf, format="PNG")
        mime = "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"


def _failure_details(failure: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in failure.items() if k not in ("stage", "error"))


def _timing_rows(page: _Page) -> list[list[Any]]:
    labels = {"generate_s": "generation (s)", "score_s": "scoring (s)", "metrics_s": "metrics (s)",
              "num_samples": "samples"}  # fmt: skip
    timings = page.report.get("timings") or {}
    return [[labels[k], page.num("timings", k)] for k in timings if k in labels]


def _prompt_set(page: _Page, name: str) -> dict[str, Any]:
    """What the prompt-set template needs beyond report.json: the dimensions shown, the plots (SVG)
    and the embedded sample grids."""
    res = page.report["results"][name]
    models = res["models"]
    order = [m["name"] for m in page.report.get("models") or []]
    colours = {m: colour_for(order.index(m) if m in order else i) for i, m in enumerate(models)}
    dims = [d for d in page.report.get("dimensions") or [] if any(d in res["stats"][m] for m in models)]
    plots = []
    for d in dims:
        entries = [(m, s["mean"], s["ci_low"], s["ci_high"]) for m in models if (s := res["stats"][m].get(d))]
        plots.append(
            forest_plot(entries, title=f"{d}: mean and 95% CI", colours=[colours[e[0]] for e in entries])
        )
        if d in res.get("histograms", {}):
            h = res["histograms"][d]
            plots.append(histogram_plot(h["edges"], h["counts"], title=f"{d}: distribution", colours=colours))
    diag = res.get("diagnostics", {})
    return {
        "name": name,
        "res": res,
        "models": models,
        "dims": dims,
        "base": ("results", name),
        "info": next((s for s in page.report.get("prompt_sets") or [] if s["name"] == name), {}),
        "plots": Markup("".join(plots)),
        "curves": Markup(_guidance_curves(page, name, dims)),
        "diagnostics": sorted({c for m in models for c in diag.get(m, {})}),
        "grid": [(entry, [(m, *_cell(page, entry, m)) for m in models]) for entry in res.get("grid", [])],
    }


def _cell(page: _Page, entry: Mapping[str, Any], model: str) -> tuple[str | None, str | None]:
    """(data URI, None) of one grid cell's samples, or (None, why they cannot be shown)."""
    files = entry["samples"].get(model) or []
    if not files:
        return None, "no samples"
    try:
        return _embed([_media_path(page.out_dir, f) for f in files]), None
    except (OSError, ValueError) as err:
        return None, f"{type(err).__name__}: {err}"


def _guidance_curves(page: _Page, name: str, dims: Sequence[str]) -> str:
    """Each swept model's mean reward against its guidance scale (``flowalign eval --guidance-sweep``)."""
    stats = page.report["results"][name]["stats"]
    curves: dict[str, list[tuple[float, str]]] = {}
    for entry in page.report.get("models") or []:
        model, scale = swept_model(entry["name"]), (entry.get("generation") or {}).get("guidance_scale")
        if model is not None and scale is not None and entry["name"] in stats:
            curves.setdefault(model, []).append((float(scale), entry["name"]))
    curves = {model: points for model, points in curves.items() if len(points) > 1}
    if not curves:
        return ""
    colours = {model: colour_for(i) for i, model in enumerate(curves)}
    plots = []
    for d in dims:
        series = {
            model: [(g, s["mean"], s["ci_low"], s["ci_high"]) for g, m in points if (s := stats[m].get(d))]
            for model, points in curves.items()
        }
        plots.append(
            curve_plot(
                series, title=f"{d} against guidance (95% CI)", x_label="guidance scale", colours=colours
            )
        )
    return "".join(plots)


def render_report(out_dir: str | os.PathLike[str], *, report: Mapping[str, Any] | None = None) -> Path:
    """Write ``report.html`` from ``report.json`` (or ``report``) and the media it names; return its path.

    The page is ``templates/report.html.j2`` (one ``templates/prompt_set.html.j2`` per prompt set)."""
    out_dir = Path(out_dir)
    report = dict(report) if report is not None else load_report(out_dir)
    page = _Page(report, out_dir)
    html = (
        _environment()
        .get_template("report.html.j2")
        .render(
            r=report,
            css=Markup(_CSS),
            num=page.num,
            interval=page.interval,
            failure_details=_failure_details,
            pair_index=lambda entries: {(e["a"], e["b"]): i for i, e in enumerate(entries)},
            sets=[_prompt_set(page, name) for name in report.get("results") or {}],
            timing_rows=_timing_rows(page),
        )
    )
    return atomic_write_text(out_dir / REPORT_HTML, html)
