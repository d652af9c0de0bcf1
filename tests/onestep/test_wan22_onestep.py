"""f-distill and DI* on Wan 2.2 TI2V-5B and Wan image-to-video (tiny models): two CLI steps, then the
exported one-step student loads with diffusers' own pipeline and its one-step sample equals flowalign's
(fp32, <= 1e-4). Image-to-video runs read one condition image per prompt (an ``image`` column of the
prompts file; the ``image`` that ``generate --image`` records in the real-data manifest).

A two-expert Wan 2.2 A14B teacher is refused with one error line (docs/families.md says why).
"""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from stand_ins import registered_mean_pixel
from typer.testing import CliRunner

from flowalign.cli import app
from flowalign.models import load_flow_model
from flowalign.models.tiny_conditioned import save_tiny_conditioned
from flowalign.pipelines.one_step import OneStepPipeline

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
PROMPTS = ["a small red circle in the center", "a large blue square"]
SIZE = dict(height=32, width=32, num_frames=5)
TOL = 1e-4  # fp32 end to end: one transformer call and one VAE decode on both sides
COMMON = [
    "--steps",
    "2",
    "--set",
    "train.batch_size=2",
    "--set",
    "train.trackers=[]",
    "--set",
    "train.cpu=true",
]
METHOD = [arg for k, v in SIZE.items() for arg in ("--set", f"method.{k}={v}")]
METHOD += ["--set", "method.guidance_scale=1.0", "--set", "train.optim.lr=0.01"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    made: dict[str, object] = {}

    def get(name: str):
        if name not in made:
            made[name] = save_tiny_conditioned(name, tmp_path_factory.mktemp(f"tiny-{name}"))
        return made[name]

    return get


def _prompts_file(folder, conditioned: bool):
    if not conditioned:
        (folder / "prompts.txt").write_text("\n".join(PROMPTS))
        return folder / "prompts.txt"
    rows = []
    for i, prompt in enumerate(PROMPTS):
        pixels = np.random.default_rng(i).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(folder / f"cond{i}.png")
        rows.append(json.dumps({"prompt": prompt, "image": f"cond{i}.png"}))
    (folder / "prompts.jsonl").write_text("\n".join(rows))
    return folder / "prompts.jsonl"


def _train(method, teacher, tmp_path, prompts_file):
    if method == "fdistill":  # the teacher's own samples (with their condition images) as real data
        gen = ["generate", "--model", str(teacher), "--prompts-file", str(prompts_file), "--steps", "2"]
        gen += ["--height", "32", "--width", "32", "--num-frames", "5", "--out", str(tmp_path / "real")]
        res = runner.invoke(app, gen)
        assert res.exit_code == 0, res.output
        data = ["--set", f"data.real_manifest={tmp_path / 'real' / 'manifest.jsonl'}"]
    else:
        data = ["--set", f"data.prompts_file={prompts_file}", "--reward", registered_mean_pixel()]
    out = tmp_path / method
    args = ["train", method, "--teacher", str(teacher), "--out", str(out), *COMMON, *data, *METHOD]
    return runner.invoke(app, args), out / "final"


@pytest.mark.parametrize(
    "name, method",
    [
        pytest.param("wan22-ti2v", "fdistill", marks=pytest.mark.slow),  # 13 s on two cores
        ("wan22-ti2v", "distar"),
        ("wan-i2v", "fdistill"),
        ("wan-i2v", "distar"),
    ],
)
def test_student_loads_into_diffusers_and_matches(tiny, tmp_path, name, method):
    teacher = tiny(name)
    conditioned = name == "wan-i2v"
    # the condition images live in the real-data folder, as rows of a dataset must
    inputs = tmp_path / "real"
    inputs.mkdir()
    res, final = _train(method, teacher, tmp_path, _prompts_file(inputs, conditioned))
    assert res.exit_code == 0, res.output
    image = PIL.Image.open(inputs / "cond0.png") if conditioned else None
    extra = {"image": [image] * 2} if conditioned else {}

    def ours(source):
        gen = torch.Generator().manual_seed(5)
        return OneStepPipeline(source, guidance_scale=1.0)(list(PROMPTS), generator=gen, **SIZE, **extra)

    student = ours(final)
    assert torch.isfinite(student.media).all()
    teacher_sample = ours(load_flow_model(teacher)).media
    assert (student.media - teacher_sample).abs().max() > 10 * TOL  # the student moved
    pipe = type(load_flow_model(teacher).pipe).from_pretrained(str(final))
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        prompt=list(PROMPTS),
        generator=torch.Generator().manual_seed(5),
        num_inference_steps=1,
        guidance_scale=1.0,
        output_type="pt",
        **SIZE,
        **({"image": image} if conditioned else {}),  # diffusers takes one image for the batch
    ).frames
    assert (student.media - theirs).abs().max() <= TOL


@pytest.mark.parametrize("name", ["wan22", "wan22-i2v"])
def test_two_expert_teacher_is_refused(tiny, tmp_path, name):
    prompts = _prompts_file(tmp_path, conditioned=name == "wan22-i2v")
    res, _ = _train("distar", tiny(name), tmp_path, prompts)
    assert res.exit_code != 0
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "two-expert" in errors[0] and "high-noise expert" in errors[0]
    assert "Traceback" not in res.output


def test_image_to_video_teacher_without_images_is_refused(tiny, tmp_path):
    res, _ = _train("distar", tiny("wan-i2v"), tmp_path, _prompts_file(tmp_path, conditioned=False))
    assert res.exit_code != 0
    assert "conditioned on an image: give each data row its condition image" in res.output
