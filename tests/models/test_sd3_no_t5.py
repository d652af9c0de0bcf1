"""SD3 / SD3.5 without T5 (``drop_t5`` / ``--no-t5``): loading, sampling equal to diffusers' pipeline loaded
the same way, training, the command line, and the memory plan without T5's weights."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from typer.testing import CliRunner

from flowalign.cli import app
from flowalign.config import LoraConfig, TrainConfig, load_config
from flowalign.models import load_flow_model
from flowalign.models.base import ModelLoadError
from flowalign.pipelines import FlowPipeline
from flowalign.planning.architectures import param_count
from flowalign.planning.command import recipe_from_yaml
from flowalign.planning.memory import BF16, Recipe, plan
from flowalign.planning.shrink import save_shrunk_model
from flowalign.training.loop import train
from flowalign.training.runs import DPORun, prepare_dpo

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red cat", "a blue dog on the left"]
SEQ = 16
FP32_EPS = 2.0**-23


@pytest.fixture(scope="module")
def sd35m_dir(tmp_path_factory):
    """SD3.5-Medium shrunk (tests/models/test_real_arch_lora.py), with its three text encoders."""
    return save_shrunk_model("sd35m", tmp_path_factory.mktemp("sd35m"))


def test_drop_t5_loads_without_t5_and_samples_like_diffusers(sd35m_dir):
    model = load_flow_model(sd35m_dir, drop_t5=True)
    assert model.pipe.text_encoder_3 is None and model.pipe.tokenizer_3 is None
    assert "text_encoder_3" not in model.modules()
    model.max_sequence_length = SEQ
    with torch.no_grad():
        cond, _ = model.encode_prompt(PROMPTS)
    joint = model.transformer.config.joint_attention_dim
    assert cond.embeds.shape == (2, 77 + SEQ, joint)  # the T5 tokens are still there, as zeros
    assert torch.equal(cond.embeds[:, 77:], torch.zeros(2, SEQ, joint))
    full = load_flow_model(sd35m_dir)
    assert full.pipe.text_encoder_3 is not None
    full.max_sequence_length = SEQ
    with torch.no_grad():
        with_t5, _ = full.encode_prompt(PROMPTS)
    assert torch.equal(with_t5.embeds[:, :77], cond.embeds[:, :77])  # the CLIP part is unchanged
    assert with_t5.embeds[:, 77:].abs().max() > 0.1

    reference = StableDiffusion3Pipeline.from_pretrained(
        str(sd35m_dir), text_encoder_3=None, tokenizer_3=None
    )
    reference.set_progress_bar_config(disable=True)
    settings = dict(num_inference_steps=2, guidance_scale=3.0, height=32, width=32)
    theirs = reference(
        PROMPTS,
        output_type="latent",
        max_sequence_length=SEQ,
        generator=torch.Generator().manual_seed(3),
        **settings,
    ).images
    ours = FlowPipeline(model)(PROMPTS, generator=torch.Generator().manual_seed(3), **settings).latents
    with_t5_latents = FlowPipeline(full)(
        PROMPTS, generator=torch.Generator().manual_seed(3), **settings
    ).latents
    # The same modules and weights run in the same order (the one difference of rounding order is the
    # sampler's update, 2 roundings of |x| per step): at most 2 steps x 2 eps32 x max|x|.
    bound = 2 * 2 * FP32_EPS * max(ours.abs().max().item(), 1.0)
    assert (ours - theirs).abs().max() <= bound
    assert (ours - with_t5_latents).abs().max() > 1e3 * bound  # and without T5 is a different model


def test_drop_t5_refuses_families_that_need_t5_in_one_error(tiny_model_dir):
    with pytest.raises(
        ModelLoadError, match="drop_t5 .* applies to SD3 / SD3.5 .* a flux model needs its T5"
    ):
        load_flow_model(tiny_model_dir("flux"), drop_t5=True)
    with pytest.raises(ModelLoadError, match="conflicts with the text_encoder_3"):
        load_flow_model(tiny_model_dir("sd3"), drop_t5=True, text_encoder_3=torch.nn.Linear(1, 1))


def test_dpo_trains_without_t5(sd35m_dir, tmp_path):
    model = load_flow_model(sd35m_dir, torch_dtype=torch.bfloat16, drop_t5=True)
    model.max_sequence_length = SEQ
    images = FlowPipeline(model)(PROMPTS * 2, num_inference_steps=2, height=32, width=32).media
    from flowalign.data.media import save_image

    rows = []
    for i, prompt in enumerate(PROMPTS):
        for j in (0, 1):
            save_image(images[2 * j + i], tmp_path / f"{i}{j}.png")
        rows.append({"prompt": prompt, "path_A": f"{i}0.png", "path_B": f"{i}1.png", "label": "A"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = load_config(
        DPORun, None, [f"model={sd35m_dir}", f"data={tmp_path / 'pairs.jsonl'}", "drop_t5=true"]
    )
    assert run.drop_t5 is True
    run.train = TrainConfig(
        output_dir=tmp_path / "run", max_steps=2, batch_size=2, cpu=True, mixed_precision="bf16", trackers=[]
    )
    run.lora = LoraConfig(rank=4, export_merged=False)
    method, data = prepare_dpo(run)
    assert method.model.pipe.text_encoder_3 is None
    result = train(method, data, run.train, progress=False, run_config=run)
    assert result.step == 2 and result.nan_skipped == 0
    cached = method.prompt_cache.lookup(PROMPTS)
    assert cached.embeds.shape[1] == 77 + method.model.max_sequence_length
    assert not cached.embeds[:, 77:].any()  # the cache holds the zeros diffusers feeds in place of T5


def test_no_t5_on_the_command_line(sd35m_dir, tiny_model_dir, tmp_path):
    runner = CliRunner()
    args = [
        "generate",
        "--prompt",
        "a cat",
        "--steps",
        "1",
        "--height",
        "32",
        "--width",
        "32",
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, [*args, "--model", str(sd35m_dir), "--out", str(tmp_path / "a"), "--no-t5"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "manifest.jsonl").is_file()
    result = runner.invoke(
        app, [*args, "--model", str(tiny_model_dir("flux")), "--out", str(tmp_path / "b"), "--no-t5"]
    )
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "needs its T5" in lines[0], result.output
    train = ["train", "dpo", "--model", str(tiny_model_dir("wan")), "--data", "pairs.jsonl", "--no-t5"]
    result = runner.invoke(app, [*train, "--out", str(tmp_path / "run"), "--set", "train.cpu=true"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code != 0 and len(lines) == 1 and "a wan model needs its T5" in lines[0], result.output


def test_plan_without_t5_drops_exactly_t5s_weights(tmp_path):
    on_device = Recipe("sd35m", text_encoders="device")
    with_t5, without = plan(on_device), plan(on_device.replace(drop_t5=True))
    key = "text encoders (bf16)"
    assert with_t5.resident[key] - without.resident[key] == param_count("t5-xxl") * BF16
    assert without.resident[key] == (param_count("clip-l") + param_count("clip-g")) * BF16
    assert with_t5.peak - without.peak >= param_count("t5-xxl") * BF16  # the T5 encode phase goes too
    cached = Recipe("sd35m")  # cached prompts: no encoder is resident either way, T5 only loads
    staged, staged_without = plan(cached), plan(cached.replace(drop_t5=True))
    assert staged.step_peak == staged_without.step_peak
    assert staged.load[key] - staged_without.load[key] == param_count("t5-xxl") * BF16
    with pytest.raises(ValueError, match="drop_t5 applies to SD3 / SD3.5, not to flux-dev"):
        Recipe("flux-dev", drop_t5=True)
    config = tmp_path / "no_t5.yaml"
    config.write_text("model: stabilityai/stable-diffusion-3.5-medium\ndrop_t5: true\ncache_prompts: false\n")
    recipe = recipe_from_yaml(config)
    assert recipe.drop_t5 and recipe.text_encoders == "device"
    config.write_text("model: stabilityai/stable-diffusion-3.5-medium\ndrop_t5: maybe\n")
    with pytest.raises(ValueError, match="no_t5.yaml: drop_t5 must be true or false"):
        recipe_from_yaml(config)
