"""The planner against a measured LoRA Flow-DPO step (``benchmarks/plan_check.py``), shortened.

SD3.5-Medium at its real width (1536, 24 heads, 333 text tokens, dual attention) cut to its first 4
blocks, bf16 base + fp32 LoRA rank 16, one step at 256^2 and 512^2 (and 512^2 with gradient
checkpointing) in a fresh process each; the step's peak RSS above the loaded model must be within 20%
of the planner's prediction.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("size", "checkpointing"), [("256x256", False), ("512x512", False), ("512x512", True)]
)
def test_planner_within_20_percent_of_measured_step_peak(size: str, checkpointing: bool) -> None:
    import plan_check

    args = argparse.Namespace(model="sd35m", size=size, rank=16, layers=4, checkpointing=checkpointing)
    row = plan_check.run_case(args)
    assert 0.8 <= row["ratio"] <= 1.2, row
