"""BTT training of the multi-head reward model: masking, bad labels, learning, exact resume, evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowalign.config import CheckpointConfig, OptimConfig, TrainConfig
from flowalign.data.batches import PairBatch
from flowalign.objectives.bt_ties import btt_loss, pairwise_accuracy
from flowalign.rewards.multihead import MultiHeadConfig, MultiHeadRewardModel
from flowalign.toy.reward_pairs import build_toy_reward_pairs
from flowalign.training.loop import train
from flowalign.training.method import StepContext
from flowalign.training.methods.reward_model import (
    RewardModelTraining,
    RewardModelTrainingConfig,
    evaluate_pairs,
)
from flowalign.training.methods.reward_run import RewardDataConfig, RewardModelRun, run_reward_model

TINY = dict(
    embed_dim=16,
    vision={"image_size": 32, "patch_size": 8, "width": 16, "layers": 1, "head_width": 8, "pool_type": "avg"},
    text={"context_length": 16, "width": 16, "heads": 2, "layers": 1},
    hidden=16,
)


@pytest.fixture(scope="module")
def pairs():
    return build_toy_reward_pairs(64, kind="image", split="train", seed=1)


def tiny_model(corpus) -> MultiHeadRewardModel:
    return MultiHeadRewardModel.build(
        MultiHeadConfig(dimensions=["vq", "ta"], media_kind="image", **TINY), corpus=corpus, seed=0
    )


def batch_of(pairs, n=8, labels=None) -> PairBatch:
    items = [{**pairs[i], "index": i} for i in range(n)]
    if labels is not None:
        for i, item in enumerate(items):
            item["labels"] = {k: v[i] for k, v in labels.items()}
    return PairBatch.collate(items)


def test_missing_labels_contribute_no_loss_and_no_gradient(pairs):
    model = tiny_model(pairs.prompts)
    method = RewardModelTraining(model)
    vq = [1, -1, 0, 1, -1, 0, 1, 1]
    batch = batch_of(pairs, labels={"VQ": vq, "ta": [-2] * 8})  # "VQ" maps to the vq head
    loss, metrics = method.compute_loss(
        batch, StepContext(step=0, seed=0, modules={"reward_model": model}), "main"
    )
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.heads["ta"].parameters())
    assert any(p.grad is not None and p.grad.any() for p in model.heads["vq"].parameters())
    with torch.no_grad():
        scores = model(torch.cat([batch.media_w, batch.media_l]), batch.prompt * 2)
    only_vq, _ = btt_loss(scores["vq"][:8], scores["vq"][8:], torch.tensor(vq), theta=5.0)
    torch.testing.assert_close(
        loss.detach(), only_vq.mean() / 2
    )  # all_slots: the missing ta slots count in B K
    assert torch.isnan(metrics["accuracy_ta"]) and 0 <= float(metrics["accuracy_vq"]) <= 1


def test_bad_labels_are_refused(pairs):
    model = tiny_model(pairs.prompts)
    method = RewardModelTraining(model)
    ctx = StepContext(step=0, seed=0, modules={"reward_model": model})
    with pytest.raises(ValueError, match="labels must be 1"):
        method.compute_loss(batch_of(pairs, labels={"vq": [5] * 8, "ta": [0] * 8}), ctx, "main")
    with pytest.raises(ValueError, match="'overall' matches no reward dimension"):
        method.compute_loss(batch_of(pairs, labels={"overall": [1] * 8}), ctx, "main")
    unlabelled = batch_of(pairs)
    unlabelled.labels = None
    with pytest.raises(ValueError, match="the pairs have no 'labels'"):
        method.compute_loss(unlabelled, ctx, "main")
    cached = PairBatch(
        prompt=["a"], index=torch.tensor([0]), latents_w=torch.zeros(1, 4), latents_l=torch.zeros(1, 4)
    )
    cached.labels = {"vq": torch.tensor([1])}
    with pytest.raises(ValueError, match="no media_w/media_l"):
        method.compute_loss(cached, ctx, "main")
    with pytest.raises(ValueError, match="theta"):
        RewardModelTrainingConfig(theta=1.0)


def _train_config(out: Path, steps: int, **kw) -> TrainConfig:
    return TrainConfig(
        output_dir=out,
        max_steps=steps,
        batch_size=16,
        trackers=[],
        cpu=True,
        log_every=1,
        optim=OptimConfig(lr=3e-3, weight_decay=0.0),
        **kw,
    )


def test_a_short_training_run_lowers_the_loss(pairs, tmp_path):
    model = tiny_model(pairs.prompts)
    method = RewardModelTraining(model)
    batch = batch_of(pairs, n=64)

    def loss_now() -> float:
        ctx = StepContext(step=0, seed=0, modules={"reward_model": model})
        with torch.no_grad():
            return float(method.compute_loss(batch, ctx, "main")[0])

    before = loss_now()
    result = train(method, pairs, _train_config(tmp_path / "run", 40), progress=False)
    after = loss_now()
    assert after < before - 0.1, (before, after)
    loaded = MultiHeadRewardModel.from_pretrained(result.export_dir)
    stats = loaded.normalisation
    assert set(stats) == {"vq", "ta"} and all(std > 0 for _, std in stats.values())


def _run(out: Path, steps: int) -> RewardModelRun:
    return RewardModelRun(
        data=RewardDataConfig(source="toy:image", toy_train_pairs=48, toy_eval_pairs=24, toy_seed=2),
        model=MultiHeadConfig(**TINY),
        train=_train_config(out, steps, checkpoint=CheckpointConfig(every=2)),
    )


def test_resume_gives_bit_identical_weights_metrics_and_normalisation(tmp_path):
    def run(out, steps, resume=False):
        return run_reward_model(_run(out, steps), resume=resume, progress=False)

    straight = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4, resume=True)
    weights = [
        load_file(tmp_path / d / "checkpoint-00000004" / "model-reward_model.safetensors") for d in "ab"
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    logs = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in "ab"]
    assert logs[0] == logs[1] and len(logs[0]) == 4
    norms = [MultiHeadRewardModel.from_pretrained(tmp_path / d / "final").normalisation for d in "ab"]
    assert norms[0] == norms[1] and norms[0]
    assert straight.metrics == resumed.metrics
    saved = json.loads((tmp_path / "b" / "eval_metrics.json").read_text())
    assert saved["num_eval_pairs"] == 24 and set(saved["dimensions"]) == {"vq", "ta"}


def test_evaluate_pairs_reports_both_accuracies_and_counts(pairs):
    model = tiny_model(pairs.prompts).eval()
    metrics = evaluate_pairs(model, pairs, batch_size=24)
    with torch.no_grad():
        a = model.score(pairs.media_a.float() / 255, pairs.prompts)
        b = model.score(pairs.media_b.float() / 255, pairs.prompts)
    for dim in ("vq", "ta"):
        labels = pairs.labels[dim]
        row = metrics[dim]
        assert row["num_pairs"] == 64 and row["num_decided"] == int((labels != 0).sum())
        assert row["accuracy"] == pytest.approx(float(pairwise_accuracy(a[dim], b[dim], labels)), abs=1e-6)
        assert row["accuracy_with_ties"] >= row["accuracy"] * row["num_decided"] / 64 - 1e-6


def test_a_video_model_starts_from_an_image_model(tmp_path):
    image = run_reward_model(_run(tmp_path / "image", 2), progress=False)
    video_run = _run(tmp_path / "video", 2)
    video_run.data.source, video_run.init_from = "toy:video", image.train.export_dir
    video_run.data.toy_num_frames = 4
    run_reward_model(video_run, progress=False)
    source = MultiHeadRewardModel.from_pretrained(image.train.export_dir)
    start = MultiHeadRewardModel.from_pretrained(tmp_path / "video" / "initial")
    assert start.media_kind == "video" and start.dimensions == ("vq", "mq", "ta")
    assert start.tokenizer.get_vocab() == source.tokenizer.get_vocab()
    own, theirs = start.state_dict(), source.state_dict()
    assert all(
        torch.equal(own[k], theirs[k]) for k in theirs if k.startswith(("clip.", "token_proj.", "heads.vq."))
    )
    info = start.config.metadata["init_from"]
    assert info["copied"] > 0 and any(k.startswith("temporal.") for k in info["fresh"])
    assert "heads.mq.0.weight" in info["fresh"]
