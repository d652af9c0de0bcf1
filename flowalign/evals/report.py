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


class _Page:
    """Accumulates HTML; ``num`` prints a report value with its JSON pointer."""

    def __init__(self, report: Mapping[str, Any], out_dir: Path) -> None:
        self.report, self.out_dir, self.parts = report, out_dir, []

    def add(self, html: str) -> None:
        self.parts.append(html)

    def num(self, *path: Any) -> str:
        value: Any = self.report
        for p in path:
            value = value[p]
        return (
            f'<span class="num" data-key="{escape(json_pointer(*path))}" data-value="{escape(repr(value))}">'
            f"{format_number(value)}</span>"
        )

    def interval(self, *path: Any, mean: str = "mean") -> str:
        """``mean [low, high]`` of a stats dict at ``path``."""
        return (
            f"{self.num(*path, mean)} <span class='ci'>[{self.num(*path, 'ci_low')}, "
            f"{self.num(*path, 'ci_high')}]</span>"
        )


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


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


def _header(page: _Page) -> None:
    r = page.report
    env = r.get("environment") or {}
    commit = env.get("git_commit") or "unknown"
    dirty = " (uncommitted changes)" if env.get("git_dirty") else ""
    page.add("<h1>flowalign evaluation report</h1>")
    page.add(
        f"<p>Created {escape(str(r.get('created')))} &middot; commit <code>{escape(commit)}</code>{escape(dirty)}"
        f" &middot; format {escape(str(r.get('format')))}</p>"
    )
    failures = r.get("failures") or []
    if failures:
        items = "".join(
            "<li><b>{}</b> {}: {}</li>".format(
                escape(str(f.get("stage"))),
                escape(", ".join(f"{k}={v}" for k, v in f.items() if k not in ("stage", "error"))),
                escape(str(f.get("error"))),
            )
            for f in failures
        )
        page.add(
            f'<div class="failures" id="failures"><h3>{len(failures)} failure(s)</h3><ul>{items}</ul></div>'
        )


def _settings(page: _Page) -> None:
    r = page.report
    page.add("<h2 id='settings'>Settings</h2>")
    settings = r.get("settings") or {}
    rows = [[escape(str(k)), f"<code>{escape(json.dumps(v))}</code>"] for k, v in settings.items()]
    page.add(_table(["setting", "value"], rows, "settings"))
    models = r.get("models") or []
    page.add("<h3>Models</h3>")
    page.add(
        _table(
            ["model", "path", "source", "sampling", "fingerprint", "status"],
            [
                [
                    f"<span style='color:{colour_for(i)}'>&#9632;</span> {escape(m['name'])}",
                    f"<code>{escape(str(m['path']))}</code>",
                    escape(str(m.get("source"))),
                    f"<code>{escape(json.dumps(m.get('generation') or m.get('settings') or {}))}</code>",
                    f"<code>{escape(str(m.get('fingerprint')))}</code>",
                    escape(str(m.get("status"))),
                ]
                for i, m in enumerate(models)
            ],
            "models",
        )
    )
    page.add("<h3>Rewards</h3>")
    page.add(
        _table(
            ["spec", "dimensions", "scores file", "reused", "scored now"],
            [
                [
                    f"<code>{escape(str(x.get('spec')))}</code>",
                    escape(", ".join(x.get("dimensions") or [])),
                    f"<code>{escape(str(x.get('file')))}</code>",
                    page.num("rewards", i, "num_reused") if "num_reused" in x else "n/a",
                    page.num("rewards", i, "num_scored") if "num_scored" in x else "n/a",
                ]
                for i, x in enumerate(r.get("rewards") or [])
            ],
            "rewards",
        )
    )
    timings = r.get("timings") or {}
    if timings:
        labels = {"generate_s": "generation (s)", "score_s": "scoring (s)", "metrics_s": "metrics (s)",
                  "num_samples": "samples"}  # fmt: skip
        rows = [[escape(labels.get(k, k)), page.num("timings", k)] for k in timings if k in labels]
        page.add("<h3>Time of this run</h3>" + _table(["stage", "value"], rows, "timings"))
    env = r.get("environment") or {}
    rows = [["python", escape(str(env.get("python")))], ["platform", escape(str(env.get("platform")))]]
    rows += [[escape(k), escape(str(v))] for k, v in (env.get("versions") or {}).items()]
    page.add("<h3>Environment</h3>" + _table(["component", "version"], rows, "environment"))


def _set_section(page: _Page, name: str) -> None:
    res = page.report["results"][name]
    models = res["models"]
    order = [m["name"] for m in page.report.get("models") or []]
    colours = {m: colour_for(order.index(m) if m in order else i) for i, m in enumerate(models)}
    dims = [d for d in page.report.get("dimensions") or [] if any(d in res["stats"][m] for m in models)]
    base = ("results", name)
    info = next((s for s in page.report.get("prompt_sets") or [] if s["name"] == name), {})
    page.add(f"<h2 id='set-{escape(name)}'>Prompt set {escape(name)}</h2>")
    page.add(f"<p>source <code>{escape(str(info.get('source')))}</code>, {format_number(info.get('num_prompts'))} "
             f"prompts</p>")  # fmt: skip

    page.add("<h3>Rewards: mean [95% CI], resampling prompts</h3>")
    rows = []
    for m in models:
        cells = [escape(m), page.num(*base, "num_samples", m)]
        for d in dims:
            cells.append(page.interval(*base, "stats", m, d) if d in res["stats"][m] else "n/a")
        rows.append(cells)
    page.add(_table(["model", "samples", *map(escape, dims)], rows, "stats"))
    plots = []
    for d in dims:
        entries = [(m, s["mean"], s["ci_low"], s["ci_high"]) for m in models if (s := res["stats"][m].get(d))]
        plots.append(
            forest_plot(entries, title=f"{d}: mean and 95% CI", colours=[colours[e[0]] for e in entries])
        )
        if d in res.get("histograms", {}):
            h = res["histograms"][d]
            plots.append(histogram_plot(h["edges"], h["counts"], title=f"{d}: distribution", colours=colours))
    page.add(f"<div class='plots'>{''.join(plots)}</div>")
    _guidance_curves(page, name, dims)

    if res.get("by_group"):
        page.add("<h3>Mean per prompt group</h3>")
        groups = list(res["by_group"])
        for d in dims:
            rows = []
            for g in groups:
                cells = [escape(g)]
                for m in models:
                    cell = res["by_group"][g].get(m, {}).get(d)
                    cells.append(
                        f"{page.num(*base, 'by_group', g, m, d, 'mean')} (n={page.num(*base, 'by_group', g, m, d, 'n')})"
                        if cell else "n/a"
                    )  # fmt: skip
                rows.append(cells)
            page.add(_table([f"group ({escape(d)})", *map(escape, models)], rows, "by-group"))

    if res.get("win_rates"):
        page.add(
            "<h3>Win rates on paired samples (same prompt and seed)</h3><p>Row model against column model: "
            "P(row scores higher) + &frac12; P(tie) [95% CI]; hover a cell for wins, ties and losses.</p>"
        )
        tables = []
        for d, entries in res["win_rates"].items():
            where = {(e["a"], e["b"]): i for i, e in enumerate(entries)}
            rows = []
            for a in models:
                cells = [f"<b>{escape(a)}</b>"]
                for b in models:
                    i = where.get((a, b))
                    if i is None:
                        cells.append("&mdash;" if a == b else "n/a")
                        continue
                    p, e = (*base, "win_rates", d, i), entries[i]
                    tip = (f"{a} wins {format_number(e['win'])}, ties {format_number(e['tie'])}, "
                           f"{b} wins {format_number(e['loss'])} over {e['n']} pairs")  # fmt: skip
                    cells.append(
                        f'<span title="{escape(tip)}">{page.interval(*p, mean="win_rate_with_ties")}</span>'
                    )
                rows.append(cells)
            tables.append(_table([escape(d), *map(escape, models)], rows, "win-rates"))
        page.add(f"<div class='plots'>{''.join(tables)}</div>")

    div_rows = []
    for m in models:
        dv = res.get("diversity", {}).get(m, {})
        cells = [escape(m)]
        cells.append(page.interval(*base, "diversity", m, "pixel") if "pixel" in dv else "n/a")
        cells.append(page.interval(*base, "diversity", m, "lpips") if "lpips" in dv else "n/a")
        if "attributes" in dv:
            attrs = dv["attributes"]["attributes"]
            parts = [
                f"{escape(k)} {page.num(*base, 'diversity', m, 'attributes', 'attributes', k, 'entropy_bits')}"
                f"/{page.num(*base, 'diversity', m, 'attributes', 'attributes', k, 'reference_bits')}"
                for k in attrs
            ]
            cells.append(
                ", ".join(parts)
                + f"; object present {page.num(*base, 'diversity', m, 'attributes', 'present')}"
            )
        else:
            cells.append("n/a")
        fid = res.get("fid", {}).get(m, {})
        cells.append(
            f"{page.num(*base, 'fid', m, 'toy', 'fid')} (floor {page.num(*base, 'fid', m, 'toy', 'floor')})"
            if "toy" in fid else "n/a"
        )  # fmt: skip
        cells.append(page.num(*base, "fid", m, "inception", "fid") if "inception" in fid else "n/a")
        div_rows.append(cells)
    page.add("<h3>Diversity and FID</h3>")
    page.add(
        "<p>Diversity: mean distance between samples of the same prompt [95% CI]. Attribute entropy (toy "
        "world): bits of the detected attribute histogram / bits the prompts ask for. Toy FID: Frechet distance "
        "of oracle features to renders of the same captions; the floor is that of a second set of renders.</p>"
    )
    page.add(_table(["model", "pixel distance", "LPIPS", "attribute entropy (bits, sample/prompts)",
                     "toy FID", "Inception FID"], div_rows, "diversity"))  # fmt: skip

    if res.get("against_base"):
        base_name = page.report.get("settings", {}).get("base")
        page.add(f"<h3>Against the base model ({escape(str(base_name))}): paired change [95% CI]</h3>")
        rows = []
        for m, ab in res["against_base"].items():
            p = (*base, "against_base", m)
            cells = [escape(m)]
            for d in dims:
                cells.append(page.interval(*p, "deltas", d, mean="delta") if d in ab["deltas"] else "n/a")
            cells.append(
                page.interval(*p, "drift_pixel")
                if "drift_pixel" in ab
                else escape(ab.get("drift_note", "n/a"))
            )
            cells.append(page.interval(*p, "drift_lpips") if "drift_lpips" in ab else "n/a")
            flags = "".join(f"<div class='flag'>&#9888; {escape(f)}</div>" for f in ab.get("flags", []))
            cells.append(flags or "none")
            rows.append(cells)
        page.add(_table(["model", *(f"&Delta; {escape(d)}" for d in dims), "drift (pixel RMS)", "drift (LPIPS)",
                         "reward-hacking flags"], rows, "against-base"))  # fmt: skip

    diag = res.get("diagnostics", {})
    cols = sorted({c for m in models for c in diag.get(m, {})})
    if cols:
        rows = [[escape(m)] + [page.num(*base, "diagnostics", m, c, "mean") if c in diag.get(m, {}) else "n/a"
                               for c in cols] for m in models]  # fmt: skip
        page.add("<details><summary>Diagnostic score columns (means)</summary>"
                 + _table(["model", *map(escape, cols)], rows, "diagnostics") + "</details>")  # fmt: skip

    page.add("<h3>Samples</h3>")
    rows = []
    for entry in res.get("grid", []):
        cells = [f"<span class='prompt'>{escape(entry['prompt'])}</span>"]
        for m in models:
            files = entry["samples"].get(m) or []
            if not files:
                cells.append("<span class='missing'>no samples</span>")
                continue
            try:
                uri = _embed([_media_path(page.out_dir, f) for f in files])
            except (OSError, ValueError) as err:
                cells.append(f"<span class='missing'>{escape(f'{type(err).__name__}: {err}')}</span>")
                continue
            alt = escape(f"{m}: {entry['prompt']}")
            cells.append(f'<img class=\'sample\' alt="{alt}" src="{uri}">')
        rows.append(cells)
    page.add(_table(["prompt", *map(escape, models)], rows, "grid"))


def _guidance_curves(page: _Page, name: str, dims: Sequence[str]) -> None:
    """Each swept model's mean reward against its guidance scale (``flowalign eval --guidance-sweep``)."""
    stats = page.report["results"][name]["stats"]
    curves: dict[str, list[tuple[float, str]]] = {}
    for entry in page.report.get("models") or []:
        model, scale = swept_model(entry["name"]), (entry.get("generation") or {}).get("guidance_scale")
        if model is not None and scale is not None and entry["name"] in stats:
            curves.setdefault(model, []).append((float(scale), entry["name"]))
    curves = {model: points for model, points in curves.items() if len(points) > 1}
    if not curves:
        return
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
    page.add("<h3>Guidance curves</h3><div class='plots'>" + "".join(plots) + "</div>")


def _calibration(page: _Page) -> None:
    cal = page.report.get("calibration")
    if not cal:
        return
    page.add(f"<h2 id='calibration'>Reward calibration on labelled pairs</h2><p><code>{escape(str(cal['pairs']))}"
             f"</code>, {page.num('calibration', 'num_pairs')} pairs</p>")  # fmt: skip
    rows = []
    for d, c in cal.get("dimensions", {}).items():
        p = ("calibration", "dimensions", d)
        rows.append([escape(d), f"<code>{escape(str(c['reward']))}</code>", escape(str(c["label"])),
                     page.num(*p, "accuracy"), page.num(*p, "accuracy_with_ties"), page.num(*p, "ece"),
                     page.num(*p, "fitted_temperature") if "fitted_temperature" in c else "n/a",
                     page.num(*p, "ece_fitted") if "ece_fitted" in c else "n/a", page.num(*p, "num_pairs")])  # fmt: skip
    page.add(_table(["dimension", "reward", "label", "accuracy (no ties)", "accuracy (ties calibrated)", "ECE (T=1)",
                     "fitted T", "ECE (fitted T)", "pairs"], rows, "calibration"))  # fmt: skip


def render_report(out_dir: str | os.PathLike[str], *, report: Mapping[str, Any] | None = None) -> Path:
    """Write ``report.html`` from ``report.json`` (or ``report``) and the media it names; return its path."""
    out_dir = Path(out_dir)
    report = dict(report) if report is not None else load_report(out_dir)
    page = _Page(report, out_dir)
    page.add(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>flowalign eval report</title>"
             f"<style>{_CSS}</style></head><body>")  # fmt: skip
    _header(page)
    names = list(report.get("results") or {})
    if names:
        links = " &middot; ".join(f"<a href='#set-{escape(n)}'>{escape(n)}</a>" for n in names)
        page.add(f"<p>Prompt sets: {links} &middot; <a href='#settings'>settings</a></p>")
    else:
        page.add("<p class='missing'>No results: every model or prompt set failed (see above).</p>")
    for name in names:
        _set_section(page, name)
    _calibration(page)
    _settings(page)
    page.add("</body></html>\n")
    return atomic_write_text(out_dir / REPORT_HTML, "".join(page.parts))
