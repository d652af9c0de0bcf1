"""`flowalign generate --image` and prompt files with an image column, on tiny image-to-video models."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
from typer.testing import CliRunner

from flowalign.cli import app
from flowalign.data.errors import DataError
from flowalign.data.media import load_video
from flowalign.data.prompts import load_conditioned_prompts
from flowalign.models.tiny_conditioned import save_tiny_conditioned
from flowalign.pipelines import FlowPipeline

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
SIZE = ["--steps", "2", "--height", "32", "--width", "32", "--num-frames", "5", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def i2v_dir(tmp_path_factory):
    return save_tiny_conditioned("wan-i2v", tmp_path_factory.mktemp("tiny-wan-i2v"))


def _png(path, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(path)
    return path


def test_prompt_file_with_image_column_generates_each_prompt_from_its_image(i2v_dir, tmp_path, monkeypatch):
    _png(tmp_path / "a.png", 0)
    _png(tmp_path / "b.png", 1)
    rows = [{"prompt": "a red ball", "image": "a.png"}, {"prompt": "a blue box", "image": "b.png"}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []
    real_call = FlowPipeline.__call__

    def spy(self, prompt, **kwargs):
        seen.extend(zip(prompt, kwargs["image"], strict=True))
        return real_call(self, prompt, **kwargs)

    monkeypatch.setattr(FlowPipeline, "__call__", spy)
    out = tmp_path / "out"
    args = ["generate", "--model", i2v_dir, "--prompts-file", prompts, "--out", out, "--device", "cpu", *SIZE]
    res = runner.invoke(app, list(map(str, [*args, "--batch-size", "1"])))
    assert res.exit_code == 0, res.output
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["image"] for r in manifest] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert [p for p, _ in seen] == ["a red ball", "a blue box"]
    for (_, image), name in zip(seen, "ab", strict=True):  # each prompt got its own image's pixels
        with PIL.Image.open(tmp_path / f"{name}.png") as want:
            assert np.array_equal(np.asarray(image), np.asarray(want.convert("RGB")))
    assert load_video(out / manifest[0]["file"]).shape == (5, 3, 32, 32)


def test_image_to_video_without_an_image_and_text_model_with_one_are_refused(
    i2v_dir, tiny_model_dir, tmp_path
):
    res = runner.invoke(
        app, list(map(str, ["generate", "--model", i2v_dir, "--prompt", "x", "--out", tmp_path / "o", *SIZE]))
    )
    assert res.exit_code != 0 and "--image" in res.output
    image = _png(tmp_path / "a.png", 0)
    args = [
        "generate",
        "--model",
        tiny_model_dir("wan"),
        "--prompt",
        "x",
        "--image",
        image,
        "--out",
        tmp_path,
    ]
    res = runner.invoke(app, list(map(str, [*args, *SIZE])))
    assert res.exit_code != 0 and "takes no condition image" in res.output


def test_prompt_file_entry_without_its_image_is_named(tmp_path):
    _png(tmp_path / "a.png", 0)
    (tmp_path / "p.csv").write_text("prompt,image\none,a.png\ntwo,\n")
    with pytest.raises(DataError, match="line 3.*no condition image"):
        load_conditioned_prompts(tmp_path / "p.csv")
    (tmp_path / "q.jsonl").write_text('{"prompt": "one", "image": "missing.png"}\n')
    with pytest.raises(DataError, match="line 1.*does not exist"):
        load_conditioned_prompts(tmp_path / "q.jsonl")
