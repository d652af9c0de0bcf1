"""CDT training method: loss, gradients, a short loop run that lowers the loss, export, run config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from cdt_testing import make_model, tiny_config

from flowalign.config import OptimConfig, TrainConfig, load_config, save_config
from flowalign.data.media import MediaError
from flowalign.tokenizers.cdt import ConditionedDiffusionTokenizer
from flowalign.tokenizers.metrics import load_lpips
from flowalign.toy.data import ToyDataset
from flowalign.training.method import StepContext
from flowalign.training.methods.cdt import (
    CDTDataConfig,
    CDTLossConfig,
    CDTRunConfig,
    CDTTraining,
    VideoFolderDataset,
    train_cdt,
)


@pytest.fixture(scope="module")
def lpips_fn():
    return load_lpips("alex", random_backbone=True)


def _batch(num: int = 2, frames: int = 5) -> dict:
    data = ToyDataset("train", kind="video", num=num, size=32, num_frames=frames)
    return {"pixels": torch.stack([data[i]["pixels"] for i in range(num)]), "index": torch.arange(num)}


def _ctx(method: CDTTraining, step: int = 0, seed: int = 0) -> StepContext:
    return StepContext(step=step, seed=seed, modules=method.trainable_modules())


@pytest.mark.parametrize("decoder", ["diffusion", "vae"])
def test_loss_is_finite_deterministic_and_reaches_every_parameter(lpips_fn, decoder):
    method = CDTTraining(make_model(decoder_type=decoder).train(), lpips_fn=lpips_fn)
    batch = _batch()
    loss, metrics = method.compute_loss(batch, _ctx(method), "main")
    again, _ = method.compute_loss(batch, _ctx(method), "main")
    other, _ = method.compute_loss(batch, _ctx(method, step=1), "main")
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() == again.item()
    assert {"mse", "kl", "kl_per_dim", "lpips", "latent_std"} <= set(metrics)
    assert other.item() != loss.item()  # new noise, time and latent draws at another step
    loss.backward()
    no_grad = [n for n, p in method.model.named_parameters() if p.grad is None or not p.grad.abs().max() > 0]
    assert not no_grad
    assert all(p.grad is None for p in lpips_fn.parameters())
    assert set(method.frozen_modules()) == {"lpips"} and set(method.trainable_modules()) == {"tokenizer"}


def test_time_power_moves_the_draws_to_the_noisy_end():
    model = make_model()
    seen = {}

    def spy(self, x, *, timesteps=None, noise=None, latent_noise=None):
        seen["t"] = timesteps
        return ConditionedDiffusionTokenizer.forward(
            self, x, timesteps=timesteps, noise=noise, latent_noise=latent_noise
        )

    model.forward = spy.__get__(model)
    batch = {
        "pixels": _batch(1)["pixels"][..., :16, :16].expand(64, -1, -1, -1, -1),
        "index": torch.arange(64),
    }
    means = []
    for power in (1.0, 4.0):
        method = CDTTraining(model, lpips_fn=None, config=CDTLossConfig(lpips_weight=0.0, time_power=power))
        with torch.no_grad():
            method.compute_loss(batch, _ctx(method), "main")
        means.append(seen["t"].float().mean().item() / model.config.num_train_timesteps)
    assert 0.35 < means[0] < 0.65 and means[1] > 0.7  # E[u^(1/4)] = 0.8


def test_method_refuses_missing_lpips_and_bad_config():
    with pytest.raises(ValueError, match="needs an lpips_fn"):
        CDTTraining(make_model(), lpips_fn=None)
    with pytest.raises(ValueError, match="time_power"):
        CDTLossConfig(time_power=0.0)
    with pytest.raises(ValueError, match="kl_weight"):
        CDTLossConfig(kl_weight=-1.0)


def _fixed_loss(method: CDTTraining, batch: dict) -> float:
    with torch.no_grad():
        return method.compute_loss(batch, _ctx(method, seed=123), "main")[0].item()


@pytest.mark.parametrize("decoder", ["diffusion", "vae"])
def test_short_loop_run_lowers_the_loss_and_exports(tmp_path, decoder):
    from flowalign.training.loop import train

    torch.manual_seed(0)
    model = ConditionedDiffusionTokenizer.from_cdt_config(tiny_config(decoder_type=decoder))
    method = CDTTraining(model, lpips_fn=None, config=CDTLossConfig(time_power=2.0, lpips_weight=0.0))
    data = ToyDataset("train", kind="video", num=2, size=16, num_frames=5)
    batch = method.collate([dict(data[i], index=i) for i in range(2)])
    before = _fixed_loss(method, batch)
    cfg = TrainConfig(
        output_dir=tmp_path / "run",
        max_steps=6,
        batch_size=2,
        trackers=[],
        log_every=3,
        optim=OptimConfig(lr=3e-3),
        cpu=True,
    )
    result = train(method, data, cfg, progress=False)
    after = _fixed_loss(method, batch)
    print(f"fixed-draw loss {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before
    exported = ConditionedDiffusionTokenizer.from_pretrained(result.export_dir / "tokenizer")
    saved, trained = exported.state_dict(), model.state_dict()
    assert all(torch.equal(saved[k], trained[k].cpu()) for k in trained)
    assert exported.config.decoder_type == decoder


def test_run_config_round_trips_through_yaml(tmp_path):
    cfg = CDTRunConfig(
        model=tiny_config(decoder_type="vae"),
        lpips="alex-random",
        train=TrainConfig(output_dir=tmp_path / "r", max_steps=2, trackers=[]),
    )
    loaded = load_config(CDTRunConfig, save_config(cfg, tmp_path / "cdt.yaml"), ["loss.kl_weight=1e-5"])
    assert loaded == dataclasses.replace(cfg, loss=CDTLossConfig(kl_weight=1e-5))
    assert isinstance(loaded.model.encoder_channels, tuple)


def test_train_cdt_end_to_end(tmp_path):
    cfg = CDTRunConfig(
        model=tiny_config(),
        lpips="none",
        loss=CDTLossConfig(lpips_weight=0.0),
        data=CDTDataConfig(num=4, num_frames=5, size=16),
        train=TrainConfig(output_dir=tmp_path / "r", max_steps=2, batch_size=2, trackers=[], cpu=True),
    )
    result = train_cdt(cfg, progress=False)
    model = ConditionedDiffusionTokenizer.from_pretrained(result.export_dir / "tokenizer")
    assert model.cdt_config == tiny_config() and result.step == 2
    assert (Path(result.checkpoint) / "config.yaml").is_file()
    with pytest.raises(ValueError, match="lpips=none needs"):
        train_cdt(dataclasses.replace(cfg, loss=CDTLossConfig()), progress=False)


def test_video_folder_dataset(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", rng.integers(0, 255, (9, 20, 24, 3), dtype=np.uint8))
    np.save(tmp_path / "b.npy", rng.integers(0, 255, (3, 20, 24, 3), dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not a video")
    data = VideoFolderDataset(tmp_path, num_frames=5, size=16)
    assert len(data) == 2
    item = data[0]["pixels"]
    raw = torch.from_numpy(np.load(tmp_path / "a.npy")).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(item, raw[:5, :, 2:18, 4:20])
    with pytest.raises(MediaError, match=r"b\.npy.*need >= 5 frames"):
        data[1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no video files"):
        VideoFolderDataset(tmp_path / "empty", num_frames=5, size=16)
    with pytest.raises(FileNotFoundError, match="video folder not found"):
        VideoFolderDataset(tmp_path / "missing", num_frames=5, size=16)
