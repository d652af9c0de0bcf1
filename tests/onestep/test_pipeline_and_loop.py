"""One-step checkpoints through the training loop: export format, loading, sampling, resume, run_* entry points."""

from __future__ import annotations

import json

import pytest
import torch
from onestep_helpers import PROMPTS, SIZE
from safetensors.torch import load_file
from stand_ins import BrightnessReward

from flowalign.config import CheckpointConfig, OptimConfig, TrainConfig
from flowalign.models import load_flow_model
from flowalign.pipelines import FlowPipeline
from flowalign.pipelines.one_step import ONE_STEP_FILE, OneStepPipeline, read_one_step_metadata
from flowalign.toy.render import render_prompts
from flowalign.training.loop import METRICS_FILE, train
from flowalign.training.methods.distar import DiffInstructStar, DistarConfig, DistarRun, run_distar
from flowalign.training.methods.fdistill import FDistill, FDistillConfig, FDistillRun, run_fdistill
from flowalign.training.methods.onestep_common import generate_x0
from flowalign.training.methods.onestep_data import MediaTextDataset, OneStepData


class Renders(torch.utils.data.Dataset):
    def __init__(self, n: int = 8) -> None:
        self.prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
        self.pixels = render_prompts(self.prompts, size=SIZE)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {"prompt": self.prompts[i], "pixels": self.pixels[i], "index": i}


def loop_config(out, steps: int = 3, **kw) -> TrainConfig:
    return TrainConfig(
        output_dir=out,
        max_steps=steps,
        batch_size=2,
        log_every=1,
        trackers=[],
        cpu=True,
        optim=OptimConfig(lr=1e-3),
        checkpoint=CheckpointConfig(every=0),
        **kw,
    )


def test_fdistill_trains_exports_and_samples_in_one_step(teacher, tmp_path):
    cfg = FDistillConfig(
        divergence="js", gan_weight=1e-2, generator_every=2, height=SIZE, width=SIZE, guidance_scale=2.0
    )
    method = FDistill(teacher, cfg)
    before = {k: v.clone() for k, v in method.generator.state_dict().items()}
    result = train(method, Renders(), loop_config(tmp_path / "run", steps=3), progress=False)
    records = [json.loads(x) for x in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    assert "generator/loss" in records[0] and "critic/d_loss" in records[1] and "generator/loss" in records[2]
    changed = [not torch.equal(before[k], v) for k, v in method.generator.state_dict().items() if k in before]
    assert any(changed)

    folder = result.export_dir
    meta = read_one_step_metadata(folder)
    assert meta["method"] == "FDistill" and meta["divergence"] == "jensen_shannon"
    assert meta["guidance_scale"] is None  # CFG distilled in: sample without it
    student = load_flow_model(folder)
    torch.testing.assert_close(
        load_file(str(next((folder / "transformer").glob("*.safetensors")))),
        {k: v for k, v in method.generator.state_dict().items()},
    )
    # the loaded folder samples through the ordinary one-step pipeline = x0 = z - v_G(z, 1)
    g = torch.Generator().manual_seed(0)
    out = FlowPipeline(student)(
        PROMPTS[:2],
        one_step=True,
        guidance_scale=1.0,
        height=SIZE,
        width=SIZE,
        generator=g,
        output_type="latent",
    )
    z = student.prepare_noise(2, height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(0))
    cond, _ = teacher.encode_prompt(PROMPTS[:2])
    with torch.no_grad():
        want = generate_x0(teacher, method.generator.eval(), z, cond)
    torch.testing.assert_close(out.latents, want, rtol=1e-5, atol=1e-5)
    # OneStepPipeline reads the metadata: no CFG, one step only
    pipe = OneStepPipeline(folder)
    assert pipe.guidance_scale == 1.0
    media = pipe(PROMPTS[:2], height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(0)).media
    assert media.shape == (2, 3, SIZE, SIZE) and 0 <= float(media.min()) and float(media.max()) <= 1
    with pytest.raises(ValueError, match="1 step"):
        pipe(PROMPTS[:1], num_inference_steps=4)


def test_read_metadata_errors_name_the_file(tmp_path):
    assert read_one_step_metadata(tmp_path) is None
    (tmp_path / ONE_STEP_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=r"one_step\.json: not valid JSON"):
        read_one_step_metadata(tmp_path)
    (tmp_path / ONE_STEP_FILE).write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="'format' must be 'flowalign.one_step'"):
        read_one_step_metadata(tmp_path)


def test_resume_matches_a_straight_run(teacher_dir, tmp_path):
    """4 steps straight == 2 steps + resume + 2 steps (RNG keys, alternation and the ratio EMA state)."""
    cfg = FDistillConfig(divergence="kl", ratio_decay=0.5, generator_every=2, height=SIZE, width=SIZE)

    def run(out, steps, resume=False):
        method = FDistill(load_flow_model(teacher_dir), cfg)
        train(method, Renders(), loop_config(out, steps=steps, seed=1), resume=resume, progress=False)
        return method

    straight = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4, resume=True)
    for (k, v), w in zip(
        straight.generator.state_dict().items(), resumed.generator.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(v, w, rtol=0, atol=0, msg=k)
    torch.testing.assert_close(straight.ratio_state.means, resumed.ratio_state.means, rtol=0, atol=0)


def test_run_fdistill_and_run_distar_entry_points(teacher_dir, tmp_path):
    # f-distill with teacher samples as "real" data: a manifest.jsonl like flowalign generate writes
    from flowalign.data.media import save_image

    rows = []
    for i, (p, img) in enumerate(zip(PROMPTS, render_prompts(PROMPTS, size=SIZE), strict=True)):
        save_image(img, tmp_path / f"{i}.png")
        rows.append(json.dumps({"prompt": p, "file": f"{i}.png"}))
    (tmp_path / "manifest.jsonl").write_text("\n".join(rows))
    assert MediaTextDataset(tmp_path / "manifest.jsonl")[1]["pixels"].shape == (3, SIZE, SIZE)
    run = FDistillRun(
        teacher=str(teacher_dir),
        method=FDistillConfig(divergence="js", height=SIZE, width=SIZE, generator_every=2),
        data=OneStepData(real_manifest=tmp_path / "manifest.jsonl"),
        train=loop_config(tmp_path / "fd", steps=2),
    )
    result = run_fdistill(run, progress=False)
    assert read_one_step_metadata(result.export_dir)["method"] == "FDistill"
    assert (tmp_path / "fd" / "config.yaml").read_text().count("divergence: js") == 1

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    drun = DistarRun(
        teacher=str(teacher_dir),
        method=DistarConfig(
            reward="brightness", reward_scale=1.0, height=SIZE, width=SIZE, generator_every=2
        ),
        data=OneStepData(prompts_file=tmp_path / "prompts.txt"),
        train=loop_config(tmp_path / "di", steps=2),
    )
    result = run_distar(drun, reward=BrightnessReward(), progress=False)
    meta = read_one_step_metadata(result.export_dir)
    assert meta["method"] == "DiffInstructStar" and meta["regularizer"] == "score"
    # prompts only cannot feed f-distill's discriminator
    bad = FDistillRun(
        teacher=str(teacher_dir),
        method=FDistillConfig(height=SIZE, width=SIZE),
        data=OneStepData(prompts_file=tmp_path / "prompts.txt"),
        train=loop_config(tmp_path / "x"),
    )
    with pytest.raises(ValueError, match="gives prompts only, but the discriminator needs real media"):
        run_fdistill(bad, progress=False)


def test_lora_fake_score_trains_adapters_on_the_teacher(teacher, tmp_path):
    from flowalign.models.lora import has_lora, lora_parameters

    method = DiffInstructStar(
        teacher,
        DistarConfig(
            reward_scale=0.0,
            fake_score="lora",
            height=SIZE,
            width=SIZE,
            generator_every=2,
            guidance_scale=2.0,
        ),
    )
    assert method.fake is teacher.transformer and has_lora(teacher.transformer)
    lora_before = [p.clone() for p in lora_parameters(teacher.transformer)]
    base_before = {n: p.clone() for n, p in teacher.transformer.named_parameters() if "lora_" not in n}
    train(method, Renders(), loop_config(tmp_path / "run", steps=2), progress=False)
    assert any(
        not torch.equal(a, b) for a, b in zip(lora_before, lora_parameters(teacher.transformer), strict=True)
    )
    for n, p in teacher.transformer.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n
    # the exported generator carries no adapters and loads as a plain model
    student = load_flow_model(tmp_path / "run" / "final")
    assert not has_lora(student.transformer)


def test_bf16_teacher_keeps_trainable_copies_fp32(teacher_dir, tmp_path):
    from flowalign.training.methods.onestep_common import load_teacher

    teacher = load_teacher(teacher_dir, method="f-distill", dtype="bf16")
    assert teacher.dtype == torch.bfloat16
    method = FDistill(teacher, FDistillConfig(divergence="js", height=SIZE, width=SIZE, generator_every=2))
    assert {p.dtype for p in method.generator.parameters()} == {torch.float32}
    assert {p.dtype for p in method.fake.parameters()} == {torch.float32}
    result = train(
        method, Renders(), loop_config(tmp_path / "run", steps=2, mixed_precision="bf16"), progress=False
    )
    assert result.export_dir is not None and all(
        torch.isfinite(p).all() for p in method.generator.parameters()
    )
    with pytest.raises(ValueError, match="teacher_dtype must be one of"):
        load_teacher(teacher_dir, method="f-distill", dtype="fp8")
