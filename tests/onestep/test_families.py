"""Both methods run on every supported family (tiny SD3, FLUX.1-dev-style guidance embedding, Wan video)."""

from __future__ import annotations

import pytest
import torch
from onestep_helpers import run_group
from stand_ins import BrightnessReward

from flowalign.models import load_flow_model
from flowalign.pipelines.one_step import read_one_step_metadata
from flowalign.training.methods.distar import DiffInstructStar, DistarConfig
from flowalign.training.methods.fdistill import FDistill, FDistillConfig

SIZES = {
    "sd3": dict(height=64, width=64),
    "flux": dict(height=64, width=64),
    "wan": dict(height=32, width=32, num_frames=5),
}


def _batch(model, family: str) -> dict:
    size = SIZES[family]
    prompts = ["a red circle", "a blue square"]
    shape = (
        (2, size.get("num_frames", 1), 3, size["height"], size["width"])
        if model.is_video
        else (2, 3, size["height"], size["width"])
    )
    return {"prompt": prompts, "index": torch.arange(2), "pixels": torch.rand(shape)}


@pytest.mark.parametrize("family", ["sd3", "flux", "wan"])
def test_both_methods_step_and_export_on_every_family(family, tiny_model_dir, tmp_path):
    folder = tiny_model_dir(family)
    teacher = load_flow_model(folder)
    fd = FDistill(
        teacher, FDistillConfig(divergence="js", gan_weight=1e-2, guidance_scale=3.0, **SIZES[family])
    )
    batch = _batch(teacher, family)
    for group, step in (("generator", 0), ("critic", 1)):
        loss, _ = run_group(fd, batch, group, step=step)
        assert torch.isfinite(loss), (family, group)
    assert all(p.grad is not None for p in fd.generator.parameters() if p.requires_grad)
    fd.export(tmp_path / "fd")
    meta = read_one_step_metadata(tmp_path / "fd")
    # guidance-distilled teachers (FLUX.1-dev) keep their guidance input; others sample without CFG
    assert meta["guidance_scale"] == (3.0 if teacher.uses_guidance_embedding else None)
    assert type(load_flow_model(tmp_path / "fd").transformer) is type(teacher.transformer)

    di = DiffInstructStar(
        load_flow_model(folder),
        DistarConfig(reward="brightness", reward_scale=1.0, guidance_scale=3.0, **SIZES[family]),
        reward=BrightnessReward(),
    )
    loss, metrics = run_group(di, {k: v for k, v in batch.items() if k != "pixels"}, "generator")
    assert torch.isfinite(loss) and torch.isfinite(metrics["reward"])
