"""`flowalign generate` end to end on tiny saved models, and its errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from flowalign.cli import app
from flowalign.data.media import load_image, load_video

runner = CliRunner()


def run(*args):
    return runner.invoke(app, ["generate", *map(str, args)])


def test_generate_images_writes_files_and_manifest(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    res = run(
        "--model",
        tiny_model_dir("sd3"),
        "--prompt",
        "a red circle",
        "--prompt",
        "a cat",
        "--samples-per-prompt",
        2,
        "--steps",
        2,
        "--height",
        32,
        "--width",
        32,
        "--batch-size",
        3,
        "--seed",
        10,
        "--out",
        out,
    )
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a red circle"] * 2 + ["a cat"] * 2
    assert [r["seed"] for r in rows] == [10, 11, 12, 13]
    assert rows[0]["settings"]["num_inference_steps"] == 2 and rows[0]["settings"]["guidance_scale"] == 7.0
    image = load_image(out / rows[0]["file"])
    assert image.shape == (3, 32, 32)
    # re-running with the same settings skips what exists: the manifest does not grow
    res = run(
        "--model",
        tiny_model_dir("sd3"),
        "--prompt",
        "a red circle",
        "--prompt",
        "a cat",
        "--samples-per-prompt",
        2,
        "--steps",
        2,
        "--height",
        32,
        "--width",
        32,
        "--seed",
        10,
        "--out",
        out,
    )
    assert res.exit_code == 0, res.output
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 4
    # with another seed it is refused (the samples would not be this run's), naming the seed
    res = run("--model", tiny_model_dir("sd3"), "--prompt", "a red circle", "--prompt", "a cat",
              "--samples-per-prompt", 2, "--steps", 2, "--height", 32, "--width", 32, "--out", out)  # fmt: skip
    assert res.exit_code != 0 and "seed=" in res.output, res.output
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 4


def test_sample_does_not_depend_on_batch_size(tiny_model_dir, tmp_path):
    common = [
        "--model",
        tiny_model_dir("sd3"),
        "--steps",
        2,
        "--height",
        32,
        "--width",
        32,
        "--prompt",
        "a",
        "--prompt",
        "b",
        "--prompt",
        "c",
    ]
    assert run(*common, "--batch-size", 1, "--out", tmp_path / "a").exit_code == 0
    assert run(*common, "--batch-size", 3, "--out", tmp_path / "b").exit_code == 0
    for name in ("000000.png", "000002.png"):
        diff = (load_image(tmp_path / "a" / name) - load_image(tmp_path / "b" / name)).abs().max()
        assert diff <= 1 / 255


def test_generate_video_writes_mp4_and_gif(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat moving right\n")
    res = run(
        "--model",
        tiny_model_dir("wan"),
        "--prompts-file",
        prompts,
        "--steps",
        2,
        "--height",
        32,
        "--width",
        32,
        "--num-frames",
        5,
        "--out",
        tmp_path / "v",
    )
    assert res.exit_code == 0, res.output
    row = json.loads((tmp_path / "v" / "manifest.jsonl").read_text())
    assert row["files"] == ["000000.mp4", "000000.gif"]
    assert load_video(tmp_path / "v" / "000000.mp4").shape == (5, 3, 32, 32)


@pytest.mark.parametrize(
    "case,needle",
    [
        ("missing_folder", "does not exist"),
        ("not_diffusers", "model_index.json"),
        ("empty_prompts", "empty"),
        ("bad_size", "multiple of 16"),
        ("zero_steps", "--steps"),
        ("unknown_option", "--bogus"),
    ],
)
def test_bad_inputs_exit_nonzero_naming_the_problem(case, needle, tiny_model_dir, tmp_path):
    model = tiny_model_dir("sd3")
    out = tmp_path / "o"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    args = {
        "missing_folder": ["--model", tmp_path / "nope", "--prompt", "a", "--out", out],
        "not_diffusers": ["--model", tmp_path, "--prompt", "a", "--out", out],
        "empty_prompts": ["--model", model, "--prompts-file", empty, "--out", out],
        "bad_size": ["--model", model, "--prompt", "a", "--height", 40, "--out", out],
        "zero_steps": ["--model", model, "--prompt", "a", "--steps", 0, "--out", out],
        "unknown_option": ["--model", model, "--prompt", "a", "--bogus", 1, "--out", out],
    }[case]
    res = run(*args)
    assert res.exit_code != 0
    assert needle in res.output
    if case != "unknown_option":
        error_lines = [line for line in res.output.splitlines() if line.startswith("error:")]
        assert len(error_lines) == 1
