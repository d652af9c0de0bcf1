"""Qwen-Image-Edit-Plus through the CLI: `generate --image`, `train dpo` on edit pairs (the LoRA loads
into diffusers' pipeline with the same output), and pairs whose members name different condition
images refused with the row.

The image areas of the edit pipelines are shrunk as in ``test_qwen_image_edit.py`` (the CLI runs in
this process, so the adapter and diffusers read the same shrunk areas). fp32: the LoRA merged into
flowalign's weights and diffusers' unmerged adapter differ by rounding only (~1e-7).
"""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from test_qwen_image_edit import small_edit_areas  # noqa: F401  (the fixture)
from typer.testing import CliRunner

from flowalign.cli import app
from flowalign.models import load_flow_model
from flowalign.pipelines import FlowPipeline

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.usefixtures("small_edit_areas")]

runner = CliRunner()
FAMILY = "qwen-image-edit-plus"
TOL = 1e-4
COMMON = ["--set", "train.batch_size=2", "--set", "train.trackers=[]", "--set", "train.cpu=true"]
GEN = dict(num_inference_steps=2, height=32, width=32)


def _png(path, seed, height=48, width=32):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(path)
    return path


def write_pairs(folder, *, other_condition: bool = False):
    """pairs.jsonl of two 32 x 32 edit pairs, each row naming its condition image; with
    ``other_condition`` the rows name one per member, and row 2's B member names another image."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(2):
        for side, seed in (("A", 10 + i), ("B", 20 + i)):
            _png(folder / f"{i}{side}.png", seed, 32, 32)
        _png(folder / f"cond{i}.png", i)
        row = {"prompt": f"make shape {i} red", "path_A": f"{i}A.png", "path_B": f"{i}B.png", "label": "A"}
        if other_condition:  # per-member columns; row 2's members differ
            other = f"cond{i}.png" if i == 0 else _png(folder / "other.png", 5).name
            row.update(image_A=f"cond{i}.png", image_B=other)
        else:
            row["image"] = f"cond{i}.png"
        rows.append(row)
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "pairs.jsonl"


def test_generate_with_an_image(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir(FAMILY)
    image = _png(tmp_path / "source.png", 0)
    size = ["--steps", "2", "--height", "32", "--width", "32", "--dtype", "fp32", "--device", "cpu"]
    args = [
        "generate",
        "--model",
        model_dir,
        "--prompt",
        "make it red",
        "--image",
        image,
        "--out",
        tmp_path / "o",
    ]
    res = runner.invoke(app, list(map(str, [*args, *size])))
    assert res.exit_code == 0, res.output
    manifest = [json.loads(line) for line in (tmp_path / "o" / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 1 and manifest[0]["image"] == str(image)
    with PIL.Image.open(tmp_path / "o" / manifest[0]["file"]) as written:
        assert written.size == (32, 32)
    res = runner.invoke(app, list(map(str, [*args[:-4], "--out", tmp_path / "p", *size])))
    assert res.exit_code != 0 and "--image" in res.output  # an edit model without a source image


def test_pair_with_different_condition_images_is_refused_with_its_row(tiny_model_dir, tmp_path):
    data = write_pairs(tmp_path / "data", other_condition=True)
    args = ["train", "dpo", "--model", str(tiny_model_dir(FAMILY)), "--data", str(data)]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "run"), "--steps", "2", *COMMON])
    assert res.exit_code != 0
    assert "line 2" in res.output and "different condition images" in res.output, res.output


def _edit(model_or_pipe, image):
    gen = torch.Generator().manual_seed(5)
    if isinstance(model_or_pipe, FlowPipeline):
        return model_or_pipe(
            ["make shape 0 red"], image=image, generator=gen, guidance_scale=4.0, **GEN
        ).media
    return model_or_pipe(
        image=image,
        prompt="make shape 0 red",
        negative_prompt=" ",
        true_cfg_scale=4.0,
        generator=gen,
        output_type="pt",
        **GEN,
    ).images


def test_dpo_lora_loads_into_the_edit_pipeline(tiny_model_dir, tmp_path):
    base_dir = tiny_model_dir(FAMILY)
    data = write_pairs(tmp_path / "data")
    res = runner.invoke(
        app,
        ["train", "dpo", "--model", str(base_dir), "--data", str(data), "--out", str(tmp_path / "run")]
        + ["--steps", "2", *COMMON, "--set", "lora.rank=4", "--set", "lora.alpha=8"]
        + ["--set", "train.optim.lr=0.05"],
    )
    assert res.exit_code == 0, res.output
    image = PIL.Image.open(tmp_path / "data" / "cond0.png")
    final = tmp_path / "run" / "final"
    ours = _edit(FlowPipeline(load_flow_model(final)), image)
    base = load_flow_model(base_dir)
    before = _edit(FlowPipeline(base), image)
    base.pipe.load_lora_weights(str(final / "lora"))
    theirs = _edit(base.pipe, image)
    assert (ours - before).abs().max() > 10 * TOL  # the LoRA moved the output well past TOL
    assert (ours - theirs).abs().max() <= TOL


def test_fdistill_one_step_generator_loads_into_the_edit_pipeline(tiny_model_dir, tmp_path):
    """f-distill on real edits (a manifest with each row's condition image); the exported generator
    loads with the pipeline's from_pretrained and its one step equals flowalign's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline

    from flowalign.pipelines.one_step import OneStepPipeline

    base_dir = tiny_model_dir(FAMILY)
    data = tmp_path / "data"
    write_pairs(data)
    rows = [{"prompt": f"make shape {i} red", "file": f"{i}A.png", "image": f"cond{i}.png"} for i in range(2)]
    (data / "real.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bare = "".join(json.dumps({k: r[k] for k in ("prompt", "file")}) + "\n" for r in rows)
    (data / "no_images.jsonl").write_text(bare)

    def fdistill(manifest, out):
        sets = [f"data.real_manifest={manifest}", "method.height=32", "method.width=32"]
        sets += ["method.guidance_scale=1.0", "train.optim.lr=0.01"]
        args = ["train", "fdistill", "--teacher", str(base_dir), "--out", str(out), "--steps", "2", *COMMON]
        return runner.invoke(app, args + [arg for value in sets for arg in ("--set", value)])

    res = fdistill(data / "no_images.jsonl", tmp_path / "refused")
    assert res.exit_code != 0 and "give each data row its condition image" in res.output, res.output
    res = fdistill(data / "real.jsonl", tmp_path / "fd")
    assert res.exit_code == 0, res.output
    image = PIL.Image.open(data / "cond0.png")
    kwargs = dict(image=image, height=32, width=32)
    final = tmp_path / "fd" / "final"
    ours = OneStepPipeline(final, guidance_scale=1.0)(["make shape 0 red"], generator=_gen(), **kwargs).media
    teacher = OneStepPipeline(load_flow_model(base_dir), guidance_scale=1.0)
    before = teacher(["make shape 0 red"], generator=_gen(), **kwargs).media
    pipe = QwenImageEditPlusPipeline.from_pretrained(str(final))
    pipe.set_progress_bar_config(disable=True)
    # one step from t = 1 to 0, without the terminal stretch (0/0 on a one-point grid: NaN in diffusers)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift_terminal=None)
    theirs = pipe(
        prompt="make shape 0 red", num_inference_steps=1, generator=_gen(), output_type="pt", **kwargs
    ).images
    assert (ours - before).abs().max() > 10 * TOL  # the generator moved away from the teacher
    assert (ours - theirs).abs().max() <= TOL


def _gen():
    return torch.Generator().manual_seed(5)


@pytest.mark.parametrize("method", ["rwr", "sft"])
def test_rwr_lora_and_sft_model_load_into_the_edit_pipeline(tiny_model_dir, tmp_path, method):
    """Flow-RWR (LoRA) on scored edits and SFT (full transformer) on the same rows, each naming its
    condition image: the LoRA loads with load_lora_weights, the SFT folder with from_pretrained."""
    from diffusers import QwenImageEditPlusPipeline

    base_dir = tiny_model_dir(FAMILY)
    data = tmp_path / "data"
    write_pairs(data)
    rows = [
        {
            "prompt": f"make shape {i} red",
            "file": f"{i}{side}.png",
            "image": f"cond{i}.png",
            "scores": {"overall": s},
        }
        for i in range(2)
        for side, s in (("A", 1.0), ("B", 0.0))
    ]
    (data / "candidates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["train", method, "--model", str(base_dir), "--data", str(data / "candidates.jsonl")]
    res = runner.invoke(
        app, [*args, "--out", str(tmp_path / method), "--steps", "2", *COMMON, "--set", "train.optim.lr=0.05"]
    )
    assert res.exit_code == 0, res.output
    image = PIL.Image.open(data / "cond0.png")
    final = tmp_path / method / "final"
    ours = _edit(FlowPipeline(load_flow_model(final)), image)
    before = _edit(FlowPipeline(load_flow_model(base_dir)), image)
    if method == "rwr":
        pipe = load_flow_model(base_dir).pipe
        pipe.load_lora_weights(str(final / "lora"))
    else:
        pipe = QwenImageEditPlusPipeline.from_pretrained(str(final))
        pipe.set_progress_bar_config(disable=True)
    assert (ours - before).abs().max() > 10 * TOL
    assert (ours - _edit(pipe, image)).abs().max() <= TOL


def test_distar_on_prompts_with_images_loads_into_the_edit_pipeline(tiny_model_dir, tmp_path):
    """DI* data-free on a prompt file with an image column (mean-pixel reward): the generator loads
    with the pipeline's from_pretrained and its one step equals flowalign's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline
    from stand_ins import registered_mean_pixel

    from flowalign.pipelines.one_step import OneStepPipeline

    base_dir = tiny_model_dir(FAMILY)
    for i in range(2):
        _png(tmp_path / f"cond{i}.png", i)
    (tmp_path / "prompts.csv").write_text(
        "prompt,image\nmake shape 0 red,cond0.png\nmake shape 1 red,cond1.png\n"
    )
    sets = [f"data.prompts_file={tmp_path / 'prompts.csv'}", "method.height=32", "method.width=32"]
    sets += ["method.guidance_scale=1.0", "train.optim.lr=0.01"]
    args = [
        "train",
        "distar",
        "--teacher",
        str(base_dir),
        "--out",
        str(tmp_path / "di"),
        "--steps",
        "2",
        *COMMON,
    ]
    res = runner.invoke(
        app, [*args, "--reward", registered_mean_pixel()] + [a for v in sets for a in ("--set", v)]
    )
    assert res.exit_code == 0, res.output
    kwargs = dict(image=PIL.Image.open(tmp_path / "cond0.png"), height=32, width=32)
    ours = OneStepPipeline(tmp_path / "di" / "final", guidance_scale=1.0)(
        ["make shape 0 red"], generator=_gen(), **kwargs
    )
    teacher = OneStepPipeline(load_flow_model(base_dir), guidance_scale=1.0)
    before = teacher(["make shape 0 red"], generator=_gen(), **kwargs).media
    pipe = QwenImageEditPlusPipeline.from_pretrained(str(tmp_path / "di" / "final"))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift_terminal=None)
    theirs = pipe(
        prompt="make shape 0 red", num_inference_steps=1, generator=_gen(), output_type="pt", **kwargs
    )
    assert (ours.media - before).abs().max() > 10 * TOL
    assert (ours.media - theirs.images).abs().max() <= TOL
