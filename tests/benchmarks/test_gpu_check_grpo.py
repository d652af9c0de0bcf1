"""benchmarks/gpu_check.py's GRPO row on tiny CPU settings: produced, timed, both window variants split."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_globals():
    from diffusers.utils import logging as diffusers_logging

    threads, verbosity = torch.get_num_threads(), diffusers_logging.get_verbosity()
    yield
    torch.set_num_threads(threads)
    diffusers_logging.set_verbosity(verbosity)


def test_tiny_grpo_row(tmp_path):
    argv = ["--device", "cpu", "--tiny", "--sections", "grpo", "--out", str(tmp_path), "--strict"]
    assert gpu_check.main(argv) == 0
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert [r["name"] for r in rows] == gpu_check.row_names("grpo", gpu_check.TINY)
    row = rows[0]
    assert row["status"] == "ok" and row["ours"] > 0 and row["baseline"] > 0
    assert row["ratio"] == pytest.approx(row["baseline"] / row["ours"])
    for which in ("window", "all"):
        assert row["details"][f"{which} sampling s"] > 0 and row["details"][f"{which} training s"] > 0
    assert row["details"]["trained steps"] == 1 and row["details"]["grid steps"] == 3
