"""The report's SVG plots: curves are drawn in order of x, skip missing means and escape their names."""

from __future__ import annotations

import math
import re

from flowalign.evals.plots import curve_plot, nice_ticks
from flowalign.evals.samples import swept_model


def test_curve_plot_draws_each_series_in_order_of_x():
    svg = curve_plot(
        {
            "base": [(3.0, 0.9, 0.88, 0.92), (1.0, 0.8, 0.7, 0.9), (2.0, math.nan, None, None)],
            "<dpo>": [(1.0, 0.85, None, None)],
        },
        title="ta against guidance",
        x_label="guidance scale",
    )
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    lines = re.findall(r'<polyline[^>]*points="([^"]*)"', svg)
    base_x = [float(p.split(",")[0]) for p in lines[0].split()]
    assert len(base_x) == 2 and base_x == sorted(base_x)  # the NaN point is left out, the rest sorted by x
    assert svg.count("<circle") == 3
    assert svg.count('stroke-width="2"/>') == 2  # interval bars only where low and high are given
    assert "&lt;dpo&gt;" in svg and "<dpo>" not in svg


def test_swept_model_reads_back_the_sweep_names():
    assert swept_model("base_cfg1.5") == "base" and swept_model("my_cfg_model_cfg4") == "my_cfg_model"
    assert swept_model("base") is None and swept_model("base_cfg") is None and swept_model("x_cfg1.") is None


def test_nice_ticks_are_round_and_cover_the_range():
    assert nice_ticks(0.94, 0.99) == [0.94, 0.96, 0.98]  # step 0.02: the first of 1, 2, 5 x 10^k over 0.0125
    assert nice_ticks(1.0, 1.0) == [1.0]
