"""`generate`, `pairs` and `eval` with `--dtype bf16` on the tiny SD3 folder, through the command line."""

from __future__ import annotations

import json

import pytest
import torch
from stand_ins import registered_mean_pixel
from typer.testing import CliRunner

from flowalign.cli import app
from flowalign.data.media import load_image

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
SIZE = ["--height", "32", "--width", "48"]


BRIGHTNESS = registered_mean_pixel()


@pytest.fixture
def loaded_dtypes(monkeypatch):
    """The transformer dtype of every flow model the command loads."""
    from flowalign.models.base import FlowModel

    seen: list[torch.dtype] = []
    original = FlowModel.from_pretrained.__func__

    def record(cls, *args, **kwargs):
        model = original(cls, *args, **kwargs)
        seen.append(model.dtype)
        return model

    monkeypatch.setattr(FlowModel, "from_pretrained", classmethod(record))
    return seen


def _ok(args: list[str]) -> str:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output[-2000:]
    return res.output


def test_generate_bf16(tiny_model_dir, tmp_path, loaded_dtypes):
    out = tmp_path / "gen"
    _ok(["generate", "--model", tiny_model_dir("sd3"), "--prompt", "a cat", "--steps", 2, *SIZE,
         "--device", "cpu", "--dtype", "bf16", "--out", out])  # fmt: skip
    assert loaded_dtypes == [torch.bfloat16]
    row = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    image = load_image(out / row["file"])
    assert image.shape == (3, 32, 48) and torch.isfinite(image).all() and image.std() > 0


def test_pairs_bf16_at_the_size_asked(tiny_model_dir, tmp_path, loaded_dtypes):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na red square\n")
    out = tmp_path / "pairs"
    text = _ok(["pairs", "--model", tiny_model_dir("sd3"), "--out", out, "--reward", BRIGHTNESS,
                "--prompts-file", prompts, "--num-candidates", 2, "--steps", 2, *SIZE, "--device", "cpu",
                "--dtype", "bf16"])  # fmt: skip
    assert "wrote 2 pairs" in text and loaded_dtypes == [torch.bfloat16]
    rows = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for row in rows:
        image = load_image(out / row["file"])
        assert image.shape == (3, 32, 48)
        # The stored score is the brightness of the stored 8-bit image (pairs rounds before scoring): equal
        # up to the fp32 summation of n values in [0, 1], at most n * 2^-24 (the naive-summation bound).
        n = image.numel()
        assert abs(row["scores"]["bright"] - float(image.double().mean())) <= n * 2.0**-24


def test_eval_bf16(tiny_model_dir, tmp_path, loaded_dtypes):
    out = tmp_path / "eval"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    _ok(["eval", "--models", f"tiny={tiny_model_dir('sd3')}:height=32,width=48", "--prompts", prompts,
         "--rewards", BRIGHTNESS, "--steps", 2, "--device", "cpu", "--dtype", "bf16", "--out", out])  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["timings"]["num_samples"] == 2 and "bright" in report["dimensions"]
    assert not report["failures"] and loaded_dtypes == [torch.bfloat16]
