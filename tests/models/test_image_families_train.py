"""FLUX.2 (dev, klein), Qwen-Image and Z-Image: `train dpo`, `train rwr` and `train fdistill` on tiny models,
and what they export loads into the family's own diffusers pipeline with the same output.

- DPO and RWR (LoRA): the exported ``final/lora`` goes through the pipeline's ``load_lora_weights``; its
  samples equal flowalign's samples of the merged ``final`` model (fp32, <= 1e-4; the merge
  W + s B A against the unmerged branch differs by rounding only, ~1e-7).
- f-distill: the exported one-step generator ``final`` loads with the pipeline's ``from_pretrained``;
  the pipeline with one step (t from 1 to 0: x0 = z - v(z, 1)) equals flowalign's one-step sample.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from stand_ins import brightness_pairs_per_family, registered_mean_pixel
from typer.testing import CliRunner

from flowalign.cli import app
from flowalign.models import load_flow_model
from flowalign.pipelines import FlowPipeline
from flowalign.pipelines.one_step import OneStepPipeline

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
PROMPTS = ["a small red circle in the center", "a large blue square"]
SIZE = 32
TOL = 1e-4
COMMON = ["--set", "train.batch_size=2", "--set", "train.trackers=[]", "--set", "train.cpu=true"]
FAMILIES = ["flux2", "flux2-klein", "qwen-image", "z-image"]


def _pipe_guidance(family: str) -> dict:
    """The pipeline's arguments for no guidance (flowalign's guidance_scale=1)."""
    if family == "qwen-image":  # no negative prompt: no CFG
        return {}
    return {"guidance_scale": 0.0} if family == "z-image" else {"guidance_scale": 1.0}


@pytest.fixture(scope="module")
def pairs_dir(tiny_model_dir, tmp_path_factory):
    """Per family: candidates and pairs of the tiny model ranked by brightness."""
    return brightness_pairs_per_family(
        tiny_model_dir, tmp_path_factory, PROMPTS, lambda family: dict(height=SIZE, width=SIZE)
    )


def _sample(pipe_or_model, family, **kw):
    gen = torch.Generator().manual_seed(5)
    if isinstance(pipe_or_model, FlowPipeline | OneStepPipeline):
        return pipe_or_model(
            list(PROMPTS), generator=gen, height=SIZE, width=SIZE, guidance_scale=1.0, **kw
        ).media
    return pipe_or_model(
        prompt=list(PROMPTS),
        generator=gen,
        height=SIZE,
        width=SIZE,
        output_type="pt",
        **_pipe_guidance(family),
        **kw,
    ).images


@pytest.mark.parametrize("method", ["dpo", "rwr"])
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_loads_into_the_family_pipeline(tiny_model_dir, pairs_dir, tmp_path, family, method):
    """Flow-DPO on the pairs, Flow-RWR on the scored candidates; both export a LoRA and the merged model."""
    base_dir = tiny_model_dir(family)
    data = pairs_dir(family) / ("pairs.jsonl" if method == "dpo" else "candidates.jsonl")
    res = runner.invoke(
        app,
        ["train", method, "--model", str(base_dir), "--data", str(data)]
        + ["--out", str(tmp_path / method), "--steps", "2", *COMMON]
        + ["--set", "lora.rank=4", "--set", "lora.alpha=8", "--set", "train.optim.lr=0.05"],
    )
    assert res.exit_code == 0, res.output
    final = tmp_path / method / "final"
    ours = _sample(FlowPipeline(load_flow_model(final)), family, num_inference_steps=2)
    base = load_flow_model(base_dir)
    before = _sample(FlowPipeline(base), family, num_inference_steps=2)
    pipe = base.pipe
    pipe.load_lora_weights(str(final / "lora"))
    theirs = _sample(pipe, family, num_inference_steps=2)
    assert (ours - before).abs().max() > 10 * TOL  # moved well past TOL: a dropped LoRA would fail below
    assert (ours - theirs).abs().max() <= TOL


@pytest.mark.parametrize("method", ["fdistill", "distar"])
@pytest.mark.parametrize("family", FAMILIES)
def test_one_step_generator_loads_into_the_family_pipeline(
    tiny_model_dir, pairs_dir, tmp_path, family, method
):
    """f-distill on the candidates as real data; DI* data-free on the prompts with a mean-pixel reward."""
    base_dir = tiny_model_dir(family)
    if method == "fdistill":
        data = ["--set", f"data.real_manifest={pairs_dir(family) / 'candidates.jsonl'}"]
    else:
        (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
        data = ["--set", f"data.prompts_file={tmp_path / 'prompts.txt'}", "--reward", registered_mean_pixel()]
    args = ["train", method, "--teacher", str(base_dir), "--out", str(tmp_path / method), "--steps", "2"]
    sizes = ["--set", f"method.height={SIZE}", "--set", f"method.width={SIZE}"]
    settings = ["--set", "method.guidance_scale=1.0", "--set", "train.optim.lr=0.01"]
    res = runner.invoke(app, [*args, *COMMON, *data, *sizes, *settings])
    assert res.exit_code == 0, res.output
    final = tmp_path / method / "final"
    ours = _sample(OneStepPipeline(final, guidance_scale=1.0), family)
    pipe = type(load_flow_model(base_dir).pipe).from_pretrained(str(final))
    # One step from t = 1 to 0 under any time shift; without the terminal stretch, which is 0/0 for
    # a one-point grid (diffusers gives NaN there: Qwen-Image's config stretches to 0.02).
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift_terminal=None)
    theirs = _sample(pipe, family, num_inference_steps=1)
    teacher = _sample(OneStepPipeline(load_flow_model(base_dir), guidance_scale=1.0), family)
    assert (ours - teacher).abs().max() > 10 * TOL  # the generator moved away from the teacher
    assert (ours - theirs).abs().max() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_model_loads_into_the_family_pipeline(tiny_model_dir, pairs_dir, tmp_path, family):
    """Flow-matching SFT (full transformer) on the candidates: the saved model is the family's pipeline folder."""
    base_dir = tiny_model_dir(family)
    res = runner.invoke(
        app,
        ["train", "sft", "--model", str(base_dir), "--data", str(pairs_dir(family) / "candidates.jsonl")]
        + ["--out", str(tmp_path / "sft"), "--steps", "2", *COMMON, "--set", "train.optim.lr=0.01"],
    )
    assert res.exit_code == 0, res.output
    final = tmp_path / "sft" / "final"
    ours = _sample(FlowPipeline(load_flow_model(final)), family, num_inference_steps=2)
    before = _sample(FlowPipeline(load_flow_model(base_dir)), family, num_inference_steps=2)
    theirs = _sample(
        type(load_flow_model(base_dir).pipe).from_pretrained(str(final)), family, num_inference_steps=2
    )
    assert (ours - before).abs().max() > 10 * TOL
    assert (ours - theirs).abs().max() <= TOL
