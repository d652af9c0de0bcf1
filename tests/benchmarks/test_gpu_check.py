"""benchmarks/gpu_check.py: every row is printed and written, failures and the budget stay inside their rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))

import gpu_check  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_globals():
    """main() sets torch's thread count and diffusers' log level for the process; put them back."""
    from diffusers.utils import logging as diffusers_logging

    threads, verbosity = torch.get_num_threads(), diffusers_logging.get_verbosity()
    yield
    torch.set_num_threads(threads)
    diffusers_logging.set_verbosity(verbosity)


def _all_rows(sections=gpu_check.SECTIONS) -> list[str]:
    return [name for section in sections for name in gpu_check.row_names(section, gpu_check.TINY)]


def _rows(out: Path) -> dict[str, dict]:
    data = json.loads((out / "gpu_check.json").read_text())
    return {row["name"]: row for row in data["rows"]}


def test_zero_budget_prints_every_row_as_skipped(tmp_path, capsys):
    rc = gpu_check.main(["--device", "cpu", "--tiny", "--budget-s", "0", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert rc == 0
    rows = _rows(tmp_path)
    assert list(rows) == _all_rows()
    assert {row["status"] for row in rows.values()} == {"skipped"}
    assert all("budget left" in row["error"] for row in rows.values())
    for name in _all_rows():
        assert name in printed
    assert (tmp_path / "gpu_check.md").read_text().count("SKIPPED: ") == len(_all_rows())


def test_a_failing_section_fills_its_rows_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    def broken(env, report, state):
        raise RuntimeError("boom in the scorer")

    monkeypatch.setitem(gpu_check.SECTION_FNS, "b2", broken)
    argv = ["--device", "cpu", "--tiny", "--sections", "b2,b5", "--out", str(tmp_path)]
    assert gpu_check.main(argv) == 0
    assert gpu_check.main([*argv, "--strict"]) == 1
    rows = _rows(tmp_path)
    b2 = rows[gpu_check.row_names("b2", gpu_check.TINY)[0]]
    assert b2["status"] == "error" and "RuntimeError: boom in the scorer" in b2["error"]
    for name in gpu_check.row_names("b5", gpu_check.TINY):
        assert rows[name]["status"] == "ok"
        assert rows[name]["ours"] > 0 and rows[name]["baseline"] > 0
    assert "boom in the scorer" in capsys.readouterr().out


def test_tiny_dpo_and_sampling_rows(tmp_path):
    argv = ["--device", "cpu", "--tiny", "--sections", "b1,b4", "--out", str(tmp_path), "--strict"]
    assert gpu_check.main(argv) == 0
    rows = _rows(tmp_path)
    assert list(rows) == _all_rows(("b1", "b4"))
    lora, full = (rows[n] for n in gpu_check.row_names("b1", gpu_check.TINY))
    for row in (lora, full):
        assert row["ours"] > 0 and row["baseline"] > 0
        assert row["ratio"] == pytest.approx(row["baseline"] / row["ours"])
        assert row["details"]["loss diff"] < 1e-4  # same loss at the same weights, noise and t (fp32)
        assert row["details"]["TFLOP/step counted"] > 0
    sampling, one_step, nrg = (rows[n] for n in gpu_check.row_names("b4", gpu_check.TINY))
    assert sampling["details"]["max latent diff"] == 0.0  # FlowPipeline == diffusers' pipeline in fp32
    assert one_step["ratio"] > 5  # 1 forward vs 56
    assert nrg["ratio"] > 1  # guidance adds a trunk forward + backward per step


def test_sd3_forward_flops_matches_the_worked_example():
    from dpo_step import SIZES

    # performance notes, section 5: 7.0 TFLOP linear + 4.2 TFLOP attention at 1024^2 (4,096 + 333 tokens)
    assert gpu_check.sd3_forward_flops(SIZES["sd35m"], 4096, 333) / 1e12 == pytest.approx(11.2, abs=0.1)


@pytest.mark.slow
def test_full_tiny_run_prints_every_row(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(tmp_path), "--strict"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(tmp_path)
    assert list(rows) == _all_rows()
    assert {row["status"] for row in rows.values()} == {"ok"}
    table = proc.stdout[proc.stdout.index("## flowalign GPU check") :]
    for name in _all_rows():
        assert name in table
