"""Flow-GRPO with several updates per sampled batch: the later updates are off-policy (ρ ≠ 1, the clip
acts), the loop's batches of reuse steps are not sampled, and a resume inside a cycle is exact."""

from __future__ import annotations

import json

import pytest
import torch

from flowalign.config import CheckpointConfig, LoraConfig, OptimConfig, TrainConfig
from flowalign.models import load_flow_model
from flowalign.training.loop import train
from flowalign.training.methods.grpo import FlowGRPO, GRPOConfig, PromptItems

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a small red circle in the center", "a large blue square in the top left"]


def brightness(media: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    value = media.flatten(1).mean(1)
    return {"overall": value, "brightness": value}


def _run(model_dir, out, steps, resume=False):
    torch.manual_seed(0)
    cfg = GRPOConfig(
        num_samples=2, num_inference_steps=2, guidance_scale=1.0, eta=0.5, kl_beta=0.1, clip_range=1e-4,
        updates_per_batch=3,
    )  # fmt: skip
    method = FlowGRPO(load_flow_model(model_dir), brightness, cfg, lora=LoraConfig(rank=4))
    calls = []
    sample = method.sample
    method.sample = lambda *a, **k: calls.append(a[2].step) or sample(*a, **k)
    config = TrainConfig(
        output_dir=out, max_steps=steps, batch_size=2, log_every=1, trackers=[], cpu=True,
        optim=OptimConfig(lr=1e-2, weight_decay=0.0), checkpoint=CheckpointConfig(every=1, keep_last=2),
    )  # fmt: skip
    train(method, PromptItems(PROMPTS), config, resume=resume, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return method, records, calls


def test_reused_samples_are_off_policy_and_clipped(toy_image_dir, tmp_path):
    _, records, calls = _run(toy_image_dir, tmp_path / "a", 4)
    assert calls == [0, 3]  # sampled at the cycle starts only
    # cycle starts are on-policy (ρ = 1 up to fp32 rounding of the log-probabilities)
    for r in (records[0], records[3]):
        assert abs(r["ratio"] - 1) < 1e-5 and r["clip_frac"] == 0.0
    # after an update of lr 1e-2 the old samples' ratios move by far more than ε = 1e-4
    for r in records[1:3]:
        assert r["clip_frac"] > 0.5
    assert records[1]["reward_brightness"] == records[0]["reward_brightness"]  # the same samples


def test_resume_inside_a_reuse_cycle_is_exact(toy_image_dir, tmp_path):
    straight, records, _ = _run(toy_image_dir, tmp_path / "a", 4)
    _run(toy_image_dir, tmp_path / "b", 2)  # stops after the cycle's second update
    resumed, resumed_records, calls = _run(toy_image_dir, tmp_path / "b", 4, resume=True)
    assert calls == [3]  # step 2 reused the checkpointed samples of step 0
    for (name, p), q in zip(
        straight.model.transformer.named_parameters(), resumed.model.transformer.parameters(), strict=True
    ):
        assert torch.equal(p, q), name
    assert resumed_records == records


def test_updates_per_batch_is_checked():
    with pytest.raises(ValueError, match="grpo.updates_per_batch"):
        GRPOConfig(updates_per_batch=0)
