"""Inline SVG plots for reports (no plotting dependency): interval ("forest") plots, overlaid histograms
and curves with intervals (a reward against the guidance scale).

Every text drawn is HTML-escaped, so model names and labels cannot inject markup.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

__all__ = ["PALETTE", "colour_for", "curve_plot", "forest_plot", "histogram_plot", "nice_ticks"]

PALETTE: tuple[str, ...] = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
)  # fmt: skip


def colour_for(index: int) -> str:
    """The colour of the index-th model (cycling through :data:`PALETTE`)."""
    return PALETTE[index % len(PALETTE)]


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, value = [], first
    while value <= hi + 1e-9 * step:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _fmt_tick(value: float) -> str:
    return f"{value:.4g}"


def _svg_open(kind: str, width: int, height: int, title: str) -> list[str]:
    """The opening ``<svg>`` tag of a ``kind`` plot and its title, centred at the top."""
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot {kind}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
        f'<text x="{width / 2:.1f}" y="16" text-anchor="middle" class="title">{escape(title)}</text>',
    ]


def _legend(names: Sequence[str], colours: Mapping[str, str], x0: float, x1: float, top: float) -> list[str]:
    """A colour swatch and name per entry, three to a row from ``top`` down, spread over [x0, x1]."""
    parts = []
    for i, name in enumerate(names):
        lx, ly = x0 + (i % 3) * ((x1 - x0) / 3), top + 14 * (i // 3)
        parts.append(f'<rect x="{lx:.1f}" y="{ly - 9:.1f}" width="10" height="10" fill="{colours[name]}"/>')
        parts.append(f'<text x="{lx + 14:.1f}" y="{ly:.1f}" class="label">{escape(name)}</text>')
    return parts


def forest_plot(
    rows: Sequence[tuple[str, float, float, float]],
    *,
    title: str,
    colours: Sequence[str] | None = None,
    width: int = 460,
) -> str:
    """Horizontal interval plot: one row per model, a dot at the mean and a bar over the interval.

    Args:
        rows: (label, mean, low, high) per model.
        title: drawn above the plot.
        colours: one colour per row (default: the palette in order).
        width: SVG width in pixels.

    Returns:
        An ``<svg>`` element as a string.
    """
    colours = list(colours or [colour_for(i) for i in range(len(rows))])
    label_w, pad, row_h, top = 130, 14, 22, 30
    height = top + row_h * len(rows) + 34
    finite = [v for _, m, lo, hi in rows for v in (m, lo, hi) if v is not None and math.isfinite(v)]
    lo_all, hi_all = (min(finite), max(finite)) if finite else (0.0, 1.0)
    span = hi_all - lo_all or max(abs(hi_all), 1.0) * 0.1
    lo_all, hi_all = lo_all - 0.05 * span, hi_all + 0.05 * span
    x0, x1 = label_w + pad, width - pad

    def x(v: float) -> float:
        return x0 + (v - lo_all) / (hi_all - lo_all) * (x1 - x0)

    parts = [
        *_svg_open("forest", width, height, title),
    ]
    axis_y = top + row_h * len(rows) + 4
    parts.append(f'<line x1="{x0}" y1="{axis_y}" x2="{x1}" y2="{axis_y}" stroke="#666"/>')
    for tick in nice_ticks(lo_all, hi_all):
        tx = x(tick)
        parts.append(f'<line x1="{tx:.1f}" y1="{top - 4}" x2="{tx:.1f}" y2="{axis_y}" stroke="#e4e4e4"/>')
        parts.append(
            f'<text x="{tx:.1f}" y="{axis_y + 16}" text-anchor="middle" class="tick">{_fmt_tick(tick)}</text>'
        )
    for i, (label, mean, lo, hi) in enumerate(rows):
        y = top + row_h * i + row_h / 2
        parts.append(
            f'<text x="{label_w}" y="{y + 4:.1f}" text-anchor="end" class="label">{escape(label)}</text>'
        )
        if mean is None or not math.isfinite(mean):
            continue
        if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi):
            parts.append(
                f'<line x1="{x(lo):.1f}" y1="{y:.1f}" x2="{x(hi):.1f}" y2="{y:.1f}" '
                f'stroke="{colours[i]}" stroke-width="3"/>'
            )
        parts.append(f'<circle cx="{x(mean):.1f}" cy="{y:.1f}" r="4.5" fill="{colours[i]}" stroke="#222"/>')
    parts.append("</svg>")
    return "".join(parts)


def histogram_plot(
    edges: Sequence[float],
    counts: Mapping[str, Sequence[int]],
    *,
    title: str,
    colours: Mapping[str, str] | None = None,
    width: int = 460,
    height: int = 200,
) -> str:
    """Overlaid histograms (as step outlines of the fraction of samples per bin), one per model.

    Args:
        edges: B + 1 bin edges shared by all models.
        counts: ``{model: B counts}``.
        title: drawn above the plot.
        colours: ``{model: colour}`` (default: the palette in order).
        width: SVG width in pixels.
        height: SVG height in pixels.

    Returns:
        An ``<svg>`` element as a string, with a legend.
    """
    models = list(counts)
    colours = dict(colours or {m: colour_for(i) for i, m in enumerate(models)})
    left, right, top, bottom = 40, 12, 26, 40 + 14 * math.ceil(len(models) / 3)
    x0, x1, y0, y1 = left, width - right, height - bottom, top
    lo, hi = edges[0], edges[-1]
    fractions = {m: [c / max(1, sum(cs)) for c in cs] for m, cs in counts.items()}
    peak = max((f for fs in fractions.values() for f in fs), default=1.0) or 1.0

    def x(v: float) -> float:
        return x0 + (v - lo) / ((hi - lo) or 1.0) * (x1 - x0)

    def y(f: float) -> float:
        return y0 - f / peak * (y0 - y1)

    parts = [
        *_svg_open("hist", width, height, title),
        f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="#666"/>',
        f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="#666"/>',
        f'<text x="{x0 - 4}" y="{y1 + 8}" text-anchor="end" class="tick">{peak:.2g}</text>',
        f'<text x="{x0 - 4}" y="{y0}" text-anchor="end" class="tick">0</text>',
    ]
    for tick in nice_ticks(lo, hi):
        parts.append(
            f'<text x="{x(tick):.1f}" y="{y0 + 14}" text-anchor="middle" class="tick">{_fmt_tick(tick)}</text>'
        )
    for m in models:
        points = [f"{x(lo):.1f},{y0:.1f}"]
        for b, f in enumerate(fractions[m]):
            points += [f"{x(edges[b]):.1f},{y(f):.1f}", f"{x(edges[b + 1]):.1f},{y(f):.1f}"]
        points.append(f"{x(hi):.1f},{y0:.1f}")
        parts.append(
            f'<polyline fill="none" stroke="{colours[m]}" stroke-width="2" stroke-opacity="0.85" '
            f'points="{" ".join(points)}"/>'
        )
    parts += _legend(models, colours, x0, x1, y0 + 30)
    parts.append("</svg>")
    return "".join(parts)


def curve_plot(
    series: Mapping[str, Sequence[tuple[float, float, float | None, float | None]]],
    *,
    title: str,
    x_label: str,
    colours: Mapping[str, str] | None = None,
    width: int = 460,
    height: int = 220,
) -> str:
    """One line per series through (x, mean) points, with a vertical bar over each point's interval.

    Args:
        series: ``{name: [(x, mean, low, high), ...]}``; points are drawn in order of x.
        title: drawn above the plot.
        x_label: drawn under the x axis.
        colours: ``{name: colour}`` (default: the palette in order).
        width: SVG width in pixels.
        height: SVG height in pixels.

    Returns:
        An ``<svg>`` element as a string, with a legend.
    """
    names = list(series)
    colours = dict(colours or {n: colour_for(i) for i, n in enumerate(names)})
    points = {n: sorted(p for p in series[n] if math.isfinite(p[1])) for n in names}
    xs = [p[0] for ps in points.values() for p in ps]
    ys = [v for ps in points.values() for p in ps for v in p[1:] if v is not None and math.isfinite(v)]
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    y_lo, y_hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    x_pad = (x_hi - x_lo) * 0.05 or 0.5
    y_pad = (y_hi - y_lo) * 0.08 or max(abs(y_hi), 1.0) * 0.05
    x_lo, x_hi, y_lo, y_hi = x_lo - x_pad, x_hi + x_pad, y_lo - y_pad, y_hi + y_pad
    left, right, top, bottom = 48, 12, 26, 52 + 14 * math.ceil(len(names) / 3)
    x0, x1, y0, y1 = left, width - right, height - bottom, top

    def x(v: float) -> float:
        return x0 + (v - x_lo) / (x_hi - x_lo) * (x1 - x0)

    def y(v: float) -> float:
        return y0 - (v - y_lo) / (y_hi - y_lo) * (y0 - y1)

    parts = [
        *_svg_open("curve", width, height, title),
        f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="#666"/>',
        f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="#666"/>',
        f'<text x="{(x0 + x1) / 2:.1f}" y="{y0 + 28}" text-anchor="middle" class="label">{escape(x_label)}</text>',
    ]
    for tick in nice_ticks(x_lo, x_hi):
        parts.append(
            f'<text x="{x(tick):.1f}" y="{y0 + 14}" text-anchor="middle" class="tick">{_fmt_tick(tick)}</text>'
        )
    for tick in nice_ticks(y_lo, y_hi, 4):
        parts.append(f'<line x1="{x0}" y1="{y(tick):.1f}" x2="{x1}" y2="{y(tick):.1f}" stroke="#e4e4e4"/>')
        parts.append(
            f'<text x="{x0 - 4}" y="{y(tick) + 4:.1f}" text-anchor="end" class="tick">{_fmt_tick(tick)}</text>'
        )
    for n in names:
        line = " ".join(f"{x(px):.1f},{y(mean):.1f}" for px, mean, _, _ in points[n])
        parts.append(f'<polyline fill="none" stroke="{colours[n]}" stroke-width="2" points="{line}"/>')
        for px, mean, lo, hi in points[n]:
            if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi):
                parts.append(
                    f'<line x1="{x(px):.1f}" y1="{y(lo):.1f}" x2="{x(px):.1f}" y2="{y(hi):.1f}" '
                    f'stroke="{colours[n]}" stroke-width="2"/>'
                )
            parts.append(
                f'<circle cx="{x(px):.1f}" cy="{y(mean):.1f}" r="3.5" fill="{colours[n]}" stroke="#222"/>'
            )
    parts += _legend(names, colours, x0, x1, y0 + 46)
    parts.append("</svg>")
    return "".join(parts)
