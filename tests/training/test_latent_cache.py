"""VAE latents of fixed media cached once: training on them equals per-step encoding, without the VAE."""

from __future__ import annotations

import json

import pytest
import torch
from stand_ins import random_image_pairs

from flowalign.config import LoraConfig, TrainConfig
from flowalign.models import load_flow_model
from flowalign.training.latent_cache import cache_media_latents, data_identity, offload_vae
from flowalign.training.loop import train
from flowalign.training.methods.dpo import DPOConfig, FlowDPO
from flowalign.training.methods.rwr import RWRConfig, WeightedSamples
from flowalign.training.runs import DPORun, PairDataset, prepare_dpo

EPS64 = torch.finfo(torch.float64).eps


def _pairs(tmp_path, n: int = 4) -> str:
    return str(random_image_pairs(tmp_path, [(32, 32)] * n))


class _Counter:
    """Counts calls of a VAE's encode."""

    def __init__(self, vae) -> None:
        self.calls, self.vae, self.encode = 0, vae, vae.encode

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.encode(*args, **kwargs)


def _dpo_losses(model_dir, data_path, out, *, cached: bool) -> tuple[list[float], int, FlowDPO]:
    model = load_flow_model(model_dir, torch_dtype=torch.float64, device="cpu")
    torch.manual_seed(0)
    method = FlowDPO(
        model, DPOConfig(beta=500.0), lora=LoraConfig(rank=4, init="gaussian", export_merged=False)
    )
    for name, p in model.transformer.named_parameters():  # B != 0: policy and reference differ
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    data = PairDataset(data_path)
    if cached:
        data = cache_media_latents(model, data, out / "latents", identity=data_identity(data_path))
        offload_vae(method)
    counter = _Counter(model.pipe.vae)
    model.pipe.vae.encode = counter
    cfg = TrainConfig(output_dir=out, max_steps=2, batch_size=2, cpu=True, trackers=[], log_every=1)
    train(method, data, cfg, progress=False)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines], counter.calls, method


def test_cached_latent_dpo_equals_per_step_encoding_without_the_vae(tiny_model_dir, tmp_path) -> None:
    """fp64 on both sides: the cached latents differ from the per-step batch encoding only by the
    rounding of a batched convolution (a few eps64 relative); the DPO loss scales error differences by
    beta / 2 = 250 before the sigmoid, so the losses agree within 1e4 * eps64 * beta relative."""
    data = _pairs(tmp_path)
    plain, plain_calls, _ = _dpo_losses(tiny_model_dir("sd3"), data, tmp_path / "plain", cached=False)
    cached, cached_calls, method = _dpo_losses(tiny_model_dir("sd3"), data, tmp_path / "cached", cached=True)
    assert plain_calls == 2  # the per-step path encodes every step
    assert cached_calls == 0  # the cached run never calls the VAE
    assert "vae" not in method.frozen_modules()
    assert next(method.model.pipe.vae.parameters()).device.type == "cpu"
    assert len(plain) == len(cached) == 2
    for a, b in zip(cached, plain, strict=True):
        assert abs(a - b) <= 1e4 * EPS64 * 500.0 * max(abs(b), 1.0)


def test_run_reuses_its_latent_cache_and_rebuilds_on_new_data(tiny_model_dir, tmp_path, monkeypatch) -> None:
    data = _pairs(tmp_path)
    run = DPORun(
        model=str(tiny_model_dir("sd3")),
        data=data,
        train=TrainConfig(output_dir=tmp_path / "run", max_steps=1, batch_size=2, cpu=True, trackers=[]),
        lora=LoraConfig(rank=4),
        cache_latents=True,
        latent_cache_dir=tmp_path / "shared-latents",
    )
    method, cached = prepare_dpo(run)
    item = cached[1]
    assert set(item) == {"index", "latents_w", "latents_l", "prompt"} and item["prompt"] == "shape 1"
    media = PairDataset(data)[1]["media_w"].unsqueeze(0)
    with torch.no_grad():
        direct = method.model.encode_media(media)[0]
    scale = direct.abs().max().item()
    assert (item["latents_w"] - direct).abs().max().item() <= 64 * torch.finfo(torch.float32).eps * scale
    index = tmp_path / "shared-latents" / "index.json"
    stamp = index.stat().st_mtime_ns

    calls = []
    monkeypatch.setattr(type(method.model), "encode_media", lambda self, m, **kw: calls.append(1) or m)
    prepare_dpo(run)  # same data and model: the cache is opened, nothing is encoded
    assert calls == [] and index.stat().st_mtime_ns == stamp
    with open(data, "a") as f:  # the data file changed: the cache is rebuilt
        f.write(
            json.dumps({"prompt": "shape 9", "path_A": "0A.png", "path_B": "1B.png", "label": "B"}) + "\n"
        )
    monkeypatch.undo()
    _, rebuilt = prepare_dpo(run)
    assert len(rebuilt) == 5


def test_rwr_items_keep_their_weights_and_prompts(tiny_model_dir, tmp_path) -> None:
    model = load_flow_model(tiny_model_dir("sd3"), torch_dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(0)
    media = torch.rand(4, 3, 32, 32, generator=g)
    data = WeightedSamples(media, ["a", "a", "b", "b"], torch.tensor([0.1, 0.9, 0.5, 0.2]), RWRConfig())
    cached = cache_media_latents(model, data, tmp_path / "c", identity="rwr", batch_size=3)
    for i in range(4):
        item = cached[i]
        assert set(item) == {"index", "latents", "weight", "prompt"}
        assert item["prompt"] == data.prompts[i] and torch.equal(item["weight"], data.weights[i])
        assert item["latents"].shape == (16, 4, 4)


def test_items_without_media_are_refused(tiny_model_dir, tmp_path) -> None:
    model = load_flow_model(tiny_model_dir("sd3"), torch_dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="no media field"):
        cache_media_latents(model, [{"prompt": "x"}], tmp_path / "c", identity="x")


def test_plan_reads_cache_latents(tmp_path) -> None:
    from flowalign.planning.command import recipe_from_yaml
    from flowalign.planning.memory import plan

    cfg = tmp_path / "run.yaml"
    base = "model: stabilityai/stable-diffusion-3.5-medium\ntrain: {batch_size: 1}\ndpo: {}\n"
    cfg.write_text(base)
    on_device = recipe_from_yaml(cfg)
    cfg.write_text(base + "cache_latents: true\n")
    cached = recipe_from_yaml(cfg)
    assert (on_device.vae, cached.vae) == ("device", "cached")
    assert plan(cached).peak < plan(on_device).peak  # the VAE's weights and encode peak leave the GPU


def test_bucketed_pairs_train_from_cached_latents(tiny_model_dir, tmp_path, monkeypatch) -> None:
    """Pairs of several sizes: each item is encoded in its own bucket's size, and each global batch
    still comes from one bucket (the cached dataset keeps the buckets' batch order)."""
    from flowalign.data.buckets import BucketConfig
    from flowalign.training.runs import run_dpo

    random_image_pairs(tmp_path, [(32, 32), (40, 40), (32, 56), (36, 64)])
    run = DPORun(
        model=str(tiny_model_dir("sd3")),
        data=str(tmp_path / "pairs.jsonl"),
        train=TrainConfig(output_dir=tmp_path / "run", max_steps=2, batch_size=2, cpu=True, trackers=[]),
        lora=LoraConfig(rank=4, export_merged=False),
        buckets=BucketConfig(resolution=32, aspect_ratios=[1.0, 16 / 9], multiple=16),
        cache_latents=True,
    )
    seen = []
    original = FlowDPO.pair_latents

    def spy(self, batch):
        assert batch.media_w is None  # the typed PairBatch carries the cached latents, not the pixels
        seen.append(tuple(batch.latents_w.shape))
        return original(self, batch)

    monkeypatch.setattr(FlowDPO, "pair_latents", spy)
    result = run_dpo(run, progress=False)
    assert result.step == 2
    assert sorted(seen) == [(2, 16, 4, 4), (2, 16, 4, 6)]
