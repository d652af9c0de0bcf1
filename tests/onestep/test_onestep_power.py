"""The power study's statistics (paired differences, verdict rule, tables) and the attribute entropy."""

from __future__ import annotations

import math

import pytest
import torch
from onestep_helpers import PROMPTS

from flowalign.experiments.toy_onestep_power import (
    PowerSettings,
    paired,
    power_markdown,
    summarise_power,
)
from flowalign.toy.metrics import attribute_entropy
from flowalign.toy.render import render_prompts


def test_attribute_entropy_counts_distinct_detected_attributes():
    # four captions that differ in every attribute: four equally likely bins, H = log 4
    four = render_prompts(PROMPTS, seed=3)
    assert attribute_entropy(four) == pytest.approx(math.log(4), abs=1e-12)
    # the same caption rendered twice per caption: still four bins of equal mass
    assert attribute_entropy(torch.cat([four, four])) == pytest.approx(math.log(4), abs=1e-12)
    # blank background only: every sample in the "absent" bin
    blank = render_prompts(PROMPTS[:1], seed=0)[:, :, :1, :1].expand(3, 3, 32, 32).contiguous()
    assert attribute_entropy(blank) == 0.0
    with pytest.raises(ValueError, match="no samples"):
        attribute_entropy(four[:0])


def test_paired_differences_and_their_standard_error():
    got = paired([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    # d = 1, 2, 3: mean 2, sample std 1, s.e. 1 / sqrt(3)
    assert got["n"] == 3
    assert got["mean"] == pytest.approx(2.0, abs=1e-15)
    assert got["se"] == pytest.approx(1 / math.sqrt(3), abs=1e-15)
    assert got["t"] == pytest.approx(2 * math.sqrt(3), abs=1e-12)
    with pytest.raises(ValueError, match="equal"):
        paired([1.0], [1.0, 2.0])


def _row(tv: float, entropy: float, jitter: float, **extra: float) -> dict:
    base = {"tv_joint": tv, "entropy": entropy, "div_jitter": jitter, "div_pixel": 0.04, "ta": 0.8}
    return {**base, "vq": 0.5, "all_correct": 0.4, "reward": 0.9, **extra}


def _verdict(js_tv: list[float], rkl_tv: list[float], js_entropy: list[float] | None = None) -> str:
    cells = {}
    for s, (a, b) in enumerate(zip(js_tv, rkl_tv, strict=True)):
        ent = js_entropy[s] if js_entropy else 4.3
        cells[f"js/seed{s}"] = _row(a, ent, 0.28)
        cells[f"rkl/seed{s}"] = _row(b, 4.3, 0.28)
    return summarise_power(cells, range(len(js_tv)))["claims"]["a_js_vs_rkl"]["verdict"]


def test_verdict_rule_on_the_primary_metric():
    # JS lower TV at every seed by 0.03 +- 0.01: t = -0.03 / (0.01 / sqrt 3) = -5.2, past t(2 df) = 2.92
    assert _verdict([0.20, 0.21, 0.22], [0.24, 0.24, 0.24]) == "reproduced"
    # differences of both signs: the mean is within 2.92 s.e.
    assert _verdict([0.20, 0.26, 0.23], [0.24, 0.22, 0.23]).startswith("not reproduced")
    # JS higher TV at every seed
    assert _verdict([0.30, 0.31, 0.32], [0.24, 0.24, 0.24]).startswith("contradicted")
    # the primary favours JS but the entropy goes against it by more than 2 s.e.
    got = _verdict([0.20, 0.21, 0.22], [0.24, 0.24, 0.24], js_entropy=[4.0, 4.01, 4.02])
    assert got == "not reproduced at this power (entropy against by > 2.92 s.e.)"
    # two seeds are not enough to test anything
    assert _verdict([0.20, 0.21], [0.24, 0.24]) == "not tested (2 seeds, 3 needed)"
    # t = 2.5 with 2 degrees of freedom: under the 95% quantile 2.92
    # (differences -0.025 + (-a, 0, a), a = 0.01 sqrt 3: sample std a, s.e. 0.01, t = -2.5)
    tv = [0.24 - 0.025 + x for x in (-0.01 * math.sqrt(3), 0.0, 0.01 * math.sqrt(3))]
    assert _verdict(tv, [0.24] * 3).startswith("not reproduced")


def test_summary_means_over_seeds_and_the_markdown_table():
    cells = {f"{arm}/seed{s}": _row(0.2 + 0.01 * s, 4.3, 0.28) for arm in ("js", "rkl") for s in range(3)}
    summary = summarise_power(cells, [0, 1, 2])
    js = summary["arms"]["js"]
    assert js["seeds"] == 3
    assert js["tv_joint"]["mean"] == pytest.approx(0.21, abs=1e-12)
    assert js["tv_joint"]["se"] == pytest.approx(0.01 / math.sqrt(3), abs=1e-12)
    # equal arms: every paired difference is exactly 0 with s.e. 0, so no claim can be reproduced
    assert summary["claims"]["a_js_vs_rkl"]["verdict"].startswith("not reproduced")
    assert "distar-score" not in summary["arms"] and "b_distar_vs_kl" not in summary["claims"]
    text = power_markdown({"cells": cells, "summary": summary, "teacher": _row(0.0, 4.4, 0.29)})
    assert "| js | 3 | 0.210 ± 0.006 |" in text
    assert "| a_js_vs_rkl | js − rkl |" in text


def test_unknown_arm_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown arm"):
        PowerSettings(arms=("js", "dmd"))


def test_power_grid_end_to_end_at_a_tiny_budget(tmp_path):
    """Two arms x two seeds at 1 optimizer step each: cells, summary and table on disk, then a no-op rerun."""
    import json

    from flowalign.experiments.toy_onestep import OneStepToySettings
    from flowalign.experiments.toy_onestep_power import run_power_grid

    # 82 held-out samples: two of the 80 held-out prompts repeat, so within-prompt diversity is defined
    small = OneStepToySettings(steps=1, batch_size=2, num_items=8, eval_samples=82, teacher_steps=1)
    settings = PowerSettings(seeds=(0, 1), arms=("rkl", "js"), onestep=small)
    logged: list[str] = []
    results = run_power_grid(tmp_path, settings, log=logged.append)
    assert sorted(results["cells"]) == ["js/seed0", "js/seed1", "rkl/seed0", "rkl/seed1"]
    assert len(logged) == 4
    on_disk = json.loads((tmp_path / "power.json").read_text())
    assert on_disk["summary"]["arms"]["js"]["seeds"] == 2
    assert on_disk["summary"]["claims"]["a_js_vs_rkl"]["diffs"]["tv_joint"]["n"] == 2
    assert "| rkl | 2 |" in (tmp_path / "power.md").read_text()
    # every cell is cached: a rerun trains and logs nothing and returns the same rows
    logged.clear()
    again = run_power_grid(tmp_path, settings, log=logged.append)
    assert logged == [] and again["cells"] == results["cells"]
