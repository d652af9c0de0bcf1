"""Iterative Flow-DPO: pairs regenerated at the round steps from the current policy, exact resume
(the refreshed reference included), and the fixed against the refreshed reference."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flowalign.config import CheckpointConfig, LoraConfig, OptimConfig, TrainConfig
from flowalign.data.media import load_media
from flowalign.models import load_flow_model
from flowalign.training.loop import train
from flowalign.training.methods.dpo import DPOConfig
from flowalign.workflows.online_dpo import OnlineDPOConfig, OnlineFlowDPO, round_prompt_indices

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [
    "a small red circle in the center",
    "a large blue square in the top left",
    "a small green triangle in the bottom right",
]


def brightness(media: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    value = media.flatten(1).mean(1)
    return {"overall": value, "brightness": value}


def _method(model_dir, out, reference="fixed"):
    torch.manual_seed(0)
    online = OnlineDPOConfig(
        regenerate_every=2, num_candidates=2, prompts_per_round=2, reference=reference,
        guidance_scale=1.0, num_inference_steps=2,
    )  # fmt: skip
    return OnlineFlowDPO(
        load_flow_model(model_dir), brightness, PROMPTS, out, DPOConfig(beta=500.0), online,
        lora=LoraConfig(rank=4),
    )  # fmt: skip


def _run(model_dir, out, steps, *, reference="fixed", resume=False):
    method = _method(model_dir, out, reference)
    config = TrainConfig(
        output_dir=out, max_steps=steps, batch_size=2, log_every=1, trackers=[], cpu=True,
        optim=OptimConfig(lr=1e-2, weight_decay=0.0), checkpoint=CheckpointConfig(every=1, keep_last=2),
    )  # fmt: skip
    train(method, method.slots(), config, resume=resume, progress=False)
    return method


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _round_pixels(folder):
    rows = [json.loads(line) for line in (folder / "candidates.jsonl").read_text().splitlines()]
    return torch.stack([load_media(folder / row["file"]) for row in rows])


def test_rounds_are_sampled_at_their_steps_from_the_current_policy(toy_image_dir, tmp_path):
    long = _run(toy_image_dir, tmp_path / "long", 5)
    assert [r["round"] for r in _records(tmp_path / "long")] == [0, 0, 1, 1, 2]
    rounds = sorted(p.name for p in (tmp_path / "long" / "online").iterdir())
    assert rounds == ["round_0000", "round_0001", "round_0002"]
    assert long.round == 2
    # a run stopped at step 2 holds the weights the long run had when it sampled round 1
    short = _run(toy_image_dir, tmp_path / "short", 2)
    short.output_dir = tmp_path / "again"
    short._start_round(1)
    sampled = _round_pixels(tmp_path / "long" / "online" / "round_0001")
    assert torch.equal(_round_pixels(tmp_path / "again" / "online" / "round_0001"), sampled)
    base = _method(toy_image_dir, tmp_path / "base")
    base._start_round(1)  # the base's samples of the same prompts and seeds differ
    assert not torch.equal(_round_pixels(tmp_path / "base" / "online" / "round_0001"), sampled)


@pytest.mark.parametrize("reference", ["fixed", "refresh"])
def test_resume_mid_round_is_exact(toy_image_dir, tmp_path, reference):
    straight = _run(toy_image_dir, tmp_path / "a", 5, reference=reference)
    _run(toy_image_dir, tmp_path / "b", 3, reference=reference)  # stops inside round 1
    resumed = _run(toy_image_dir, tmp_path / "b", 5, reference=reference, resume=True)
    for (name, p), q in zip(
        straight.model.transformer.named_parameters(), resumed.model.transformer.parameters(), strict=True
    ):
        assert torch.equal(p, q), name
    assert _records(tmp_path / "a") == _records(tmp_path / "b")


def test_refreshed_reference_restarts_the_loss_at_log2_each_round(toy_image_dir, tmp_path):
    fixed = _records(_run(toy_image_dir, tmp_path / "f", 3).output_dir)
    refresh = _records(_run(toy_image_dir, tmp_path / "r", 3, reference="refresh").output_dir)
    # step 1: the policy is the base (LoRA B = 0) under either reference, so the implicit reward
    # margin is 0 and the loss is -log sigmoid(0) = log 2 (fp32 arithmetic: a few eps)
    for records in (fixed, refresh):
        assert abs(records[0]["loss"] - math.log(2)) < 1e-6
    assert fixed[:2] == refresh[:2]  # round 0: both references are the base
    # step 3 opens round 1: the refreshed reference is the policy itself (loss log 2 again), the fixed
    # one is still the base, two updates away
    assert abs(refresh[2]["loss"] - math.log(2)) < 1e-6
    assert abs(fixed[2]["loss"] - math.log(2)) > 1e-4


def test_round_prompts_walk_through_permutations():
    rounds = [round_prompt_indices(5, 2, r, seed=0) for r in range(5)]
    flat = [i for r in rounds for i in r]
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))
    assert round_prompt_indices(5, 0, 3, seed=0) == list(range(5))


def test_bad_online_settings_are_named():
    with pytest.raises(ValueError, match="online.regenerate_every"):
        OnlineDPOConfig(regenerate_every=0)
    with pytest.raises(ValueError, match="online.reference"):
        OnlineDPOConfig(reference="moving")
