"""HunyuanVideo 1.5 and LTX-2: `train dpo` (LoRA) and `train fdistill` on tiny models, and what they export
loads into the family's own diffusers pipeline with the same output.

- DPO and RWR (LoRA): the exported ``final/lora`` loads into the family's pipeline (LTX-2: ``load_lora_weights``;
  HunyuanVideo 1.5's pipeline has no LoRA loader, so the transformer's ``load_lora_adapter``); its
  samples equal flowalign's samples of the merged ``final`` model (fp32, <= 1e-4; merged W + s B A
  against the unmerged branch differs by rounding only).
- SFT (full transformer): the saved folder loads with the pipeline's ``from_pretrained``, same samples.
- f-distill and DI* (data-free, mean-pixel reward): the exported one-step generator ``final`` loads with the pipeline's ``from_pretrained``;
  the pipeline with one step (t from 1 to 0: x0 = z - v(z, 1)) equals flowalign's one-step sample.

LTX-2 samples on the pipeline side run with modality isolation and plain CFG (see test_video_families_match).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler
from stand_ins import brightness_pairs_per_family, registered_mean_pixel
from test_video_families_match import LTX_PLAIN_CFG, isolated
from typer.testing import CliRunner

from flowalign.cli import app
from flowalign.models import load_flow_model
from flowalign.models.lora import LORA_WEIGHT_NAME
from flowalign.pipelines import FlowPipeline
from flowalign.pipelines.one_step import OneStepPipeline

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
PROMPTS = ["a small red circle in the center", "a large blue square"]
TOL = 1e-4
COMMON = ["--set", "train.batch_size=2", "--set", "train.trackers=[]", "--set", "train.cpu=true"]
SIZES = {
    "hunyuan_video15": dict(height=32, width=32, num_frames=5),
    "ltx2": dict(height=64, width=64, num_frames=9),
}
FAMILIES = list(SIZES)


@pytest.fixture(scope="module")
def pairs_dir(tiny_model_dir, tmp_path_factory):
    """Per family: candidates and pairs of the tiny model ranked by brightness."""
    return brightness_pairs_per_family(
        tiny_model_dir, tmp_path_factory, PROMPTS, lambda family: dict(guidance_scale=1.0, **SIZES[family])
    )


def _ours(pipe, family, **kw):
    gen = torch.Generator().manual_seed(5)
    return pipe(list(PROMPTS), generator=gen, guidance_scale=1.0, **SIZES[family], **kw).media


def _theirs(pipe, family, monkeypatch, **kw):
    """The diffusers pipeline's frames without guidance (LTX-2: isolated from its audio stream)."""
    gen = torch.Generator().manual_seed(5)
    if family == "ltx2":
        monkeypatch.setattr(pipe.transformer, "forward", isolated(pipe.transformer))
        extra = dict(LTX_PLAIN_CFG, guidance_scale=1.0, audio_guidance_scale=1.0)
    else:
        pipe.register_modules(guider=ClassifierFreeGuidance(guidance_scale=1.0))
        # one prompt per call (diffusers' HunyuanVideo 1.5 VAE fails on batches > 1), on the batch's noise
        size = SIZES[family]
        shape = (len(PROMPTS), pipe.num_channels_latents, (size["num_frames"] - 1) // 4 + 1)
        noise = torch.randn(*shape, size["height"] // 16, size["width"] // 16, generator=gen)
        frames = [
            pipe([p], latents=noise[i : i + 1], output_type="pt", **size, **kw).frames
            for i, p in enumerate(PROMPTS)
        ]
        return torch.cat(frames)
    try:
        return pipe(list(PROMPTS), generator=gen, output_type="pt", **SIZES[family], **extra, **kw).frames
    finally:
        monkeypatch.undo()


def _load_lora(pipe, family, folder):
    if family == "ltx2":
        pipe.load_lora_weights(str(folder))
    else:  # HunyuanVideo15Pipeline has no LoRA loader mixin in diffusers 0.42
        assert not hasattr(pipe, "load_lora_weights")
        pipe.transformer.load_lora_adapter(str(folder), prefix="transformer", weight_name=LORA_WEIGHT_NAME)


@pytest.mark.parametrize("method", ["dpo", "rwr"])
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_loads_into_the_family_pipeline(
    tiny_model_dir, pairs_dir, tmp_path, monkeypatch, family, method
):
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
    ours = _ours(FlowPipeline(load_flow_model(final)), family, num_inference_steps=2)
    base = load_flow_model(base_dir)
    before = _ours(FlowPipeline(base), family, num_inference_steps=2)
    _load_lora(base.pipe, family, final / "lora")
    theirs = _theirs(base.pipe, family, monkeypatch, num_inference_steps=2)
    assert (ours - before).abs().max() > 10 * TOL  # moved well past TOL: a dropped LoRA would fail below
    assert (ours - theirs).abs().max() <= TOL


@pytest.mark.parametrize("method", ["fdistill", "distar"])
@pytest.mark.parametrize("family", FAMILIES)
def test_one_step_generator_loads_into_the_family_pipeline(
    tiny_model_dir, pairs_dir, tmp_path, monkeypatch, family, method
):
    """f-distill on the candidates as real data; DI* data-free on the prompts with a mean-pixel reward."""
    base_dir = tiny_model_dir(family)
    if method == "fdistill":
        data = ["--set", f"data.real_manifest={pairs_dir(family) / 'candidates.jsonl'}"]
    else:
        (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
        data = ["--set", f"data.prompts_file={tmp_path / 'prompts.txt'}", "--reward", registered_mean_pixel()]
    res = runner.invoke(
        app,
        [
            "train",
            method,
            "--teacher",
            str(base_dir),
            "--out",
            str(tmp_path / method),
            "--steps",
            "2",
            *COMMON,
        ]
        + data
        + [arg for k, v in SIZES[family].items() for arg in ("--set", f"method.{k}={v}")]
        + ["--set", "method.guidance_scale=1.0", "--set", "train.optim.lr=0.01"],
    )
    assert res.exit_code == 0, res.output
    final = tmp_path / method / "final"
    ours = _ours(OneStepPipeline(final, guidance_scale=1.0), family)
    pipe = type(load_flow_model(base_dir).pipe).from_pretrained(str(final))
    pipe.set_progress_bar_config(disable=True)
    # one step from t = 1 to 0 under any shift, without a terminal stretch (0/0 on a one-point grid)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift_terminal=None)
    theirs = _theirs(pipe, family, monkeypatch, num_inference_steps=1)
    teacher = _ours(OneStepPipeline(load_flow_model(base_dir), guidance_scale=1.0), family)
    assert (ours - teacher).abs().max() > 10 * TOL  # the generator moved away from the teacher
    assert (ours - theirs).abs().max() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_model_loads_into_the_family_pipeline(tiny_model_dir, pairs_dir, tmp_path, monkeypatch, family):
    """Flow-matching SFT (full transformer) on the candidates: the saved model is the family's pipeline folder."""
    base_dir = tiny_model_dir(family)
    res = runner.invoke(
        app,
        ["train", "sft", "--model", str(base_dir), "--data", str(pairs_dir(family) / "candidates.jsonl")]
        + ["--out", str(tmp_path / "sft"), "--steps", "2", *COMMON, "--set", "train.optim.lr=0.01"],
    )
    assert res.exit_code == 0, res.output
    final = tmp_path / "sft" / "final"
    ours = _ours(FlowPipeline(load_flow_model(final)), family, num_inference_steps=2)
    before = _ours(FlowPipeline(load_flow_model(base_dir)), family, num_inference_steps=2)
    pipe = type(load_flow_model(base_dir).pipe).from_pretrained(str(final))
    pipe.set_progress_bar_config(disable=True)
    theirs = _theirs(pipe, family, monkeypatch, num_inference_steps=2)
    assert (ours - before).abs().max() > 10 * TOL
    assert (ours - theirs).abs().max() <= TOL
