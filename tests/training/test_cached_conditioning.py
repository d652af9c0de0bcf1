"""Cached conditioning beyond DPO and RWR: SFT, latent reward, f-distill's real data and prompts, and
the condition images of image-to-video families. Each cached run equals the per-step one, and after
the caches are built a training step calls no text encoder, VAE or image encoder."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from torch import nn

from flowalign.config import LoraConfig, TrainConfig
from flowalign.data.items import ManifestDataset
from flowalign.data.media import save_image
from flowalign.models import load_flow_model
from flowalign.models.tiny_conditioned import save_tiny_conditioned
from flowalign.training.condition_cache import cache_condition_images
from flowalign.training.latent_cache import cache_media_latents, data_identity, offload_vae
from flowalign.training.loop import train
from flowalign.training.method import StepContext
from flowalign.training.methods.dpo import DPOConfig, FlowDPO
from flowalign.training.methods.fdistill import FDistill, FDistillConfig
from flowalign.training.methods.latent_reward import LatentRewardTraining, LatentRewardTrainingConfig
from flowalign.training.methods.onestep_cache import cache_onestep_conditioning
from flowalign.training.methods.onestep_data import MediaTextDataset, OneStepData
from flowalign.training.methods.sft import FlowMatchingSFT, SFTConfig
from flowalign.training.placement import dataset_prompts
from flowalign.training.runs import PairDataset

EPS64 = torch.finfo(torch.float64).eps
EPS32 = torch.finfo(torch.float32).eps
REL64 = 1e4 * EPS64
"""fp64 bound on the relative difference of a cached and a per-step loss: the cached rows differ from
the per-step encodings only by the rounding of a batch of another size (a few eps64 per value), and
fewer than 1e4 dependent fp64 roundings of these tiny networks lie between an input and the loss."""
REL32 = 1e3 * EPS32
"""The same bound for networks that compute in fp32 (f-distill's generator and fake score are fp32
copies of the fp64 teacher): fp64 conditioning rows that differ in their last bits can flip the rounding
of their fp32 casts, and fewer than 1e3 dependent fp32 roundings lie between those and the loss."""


class Calls:
    """Counts the forward calls of modules (text encoders, image encoder) and of the VAE's encode."""

    def __init__(self, model, names: list[str]) -> None:
        self.calls = dict.fromkeys(names, 0)
        modules = model.modules()
        for name in names:
            target = modules[name]
            attr = "encode" if name == "vae" else "forward"
            original = getattr(target, attr)

            def counted(*args, _name=name, _original=original, **kwargs):
                self.calls[_name] += 1
                return _original(*args, **kwargs)

            setattr(target, attr, counted)

    def total(self) -> int:
        return sum(self.calls.values())


def _encoders(model) -> list[str]:
    return sorted(n for n in model.modules() if n.startswith("text_encoder"))


def _close(a: float, b: float, rel: float = REL64) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1.0)


def _images(folder, n: int, side: int = 32) -> list[str]:
    g = torch.Generator().manual_seed(0)
    names = []
    for k in range(n):
        save_image(torch.rand(3, side, side, generator=g), folder / f"{k}.png")
        names.append(f"{k}.png")
    return names


def _manifest(folder, n: int = 4, side: int = 32) -> str:
    rows = [{"file": f, "prompt": f"shape {k % 3}"} for k, f in enumerate(_images(folder, n, side))]
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _cfg(out, steps: int = 2) -> TrainConfig:
    return TrainConfig(output_dir=out, max_steps=steps, batch_size=2, cpu=True, trackers=[], log_every=1)


# ------------------------------------------------------------------------------------------------ SFT
def _sft(model_dir, manifest, out, *, cached: bool):
    model = load_flow_model(model_dir, torch_dtype=torch.float64, device="cpu")
    method = FlowMatchingSFT(model, SFTConfig(caption_dropout=0.5))
    data = ManifestDataset(manifest)
    if cached:
        method.cache_prompts(dataset_prompts(data), cache_dir=out / "prompts")
        data = cache_media_latents(model, data, out / "latents", identity=data_identity(manifest))
        offload_vae(method)
    calls = Calls(model, [*_encoders(model), "vae"])
    losses = []
    for step in range(2):
        batch = method.collate([{**data[2 * step + j], "index": 2 * step + j} for j in range(2)])
        ctx = StepContext(step=step, seed=0, modules=method.trainable_modules())
        losses.append(method.compute_loss(batch, ctx, "default")[0].item())
    return losses, calls, method


def test_sft_cached_loss_equals_per_step_without_encoders(tiny_model_dir, tmp_path):
    manifest = _manifest(tmp_path)
    plain, plain_calls, _ = _sft(tiny_model_dir("sd3"), manifest, tmp_path / "plain", cached=False)
    cached, cached_calls, method = _sft(tiny_model_dir("sd3"), manifest, tmp_path / "cached", cached=True)
    assert plain_calls.calls["vae"] == 2 and plain_calls.total() > 2  # the per-step path encodes
    assert cached_calls.total() == 0, cached_calls.calls
    assert "" in method.prompt_cache.prompts  # caption dropout's empty prompt is cached too
    assert set(method.frozen_modules()).isdisjoint([*_encoders(method.model), "vae"])
    assert len(plain) == len(cached) == 2
    assert all(_close(a, b) for a, b in zip(cached, plain, strict=True)), (cached, plain)


def test_sft_with_a_trained_text_encoder_refuses_a_prompt_cache(tiny_model_dir):
    model = load_flow_model(tiny_model_dir("sd3"), device="cpu")
    method = FlowMatchingSFT(model, SFTConfig(train_text_encoder=True))
    assert not method.caches_prompts
    with pytest.raises(ValueError, match="train_text_encoder"):
        method.cache_prompts(["a"])


# ------------------------------------------------------------------------------------------------ latent reward
class _Pairs(torch.utils.data.Dataset):
    def __init__(self, n: int = 4, side: int = 32) -> None:
        g = torch.Generator().manual_seed(1)
        self.items = [
            {
                "prompt": f"shape {k % 2}",
                "media_w": torch.rand(3, side, side, generator=g, dtype=torch.float64),
                "media_l": torch.rand(3, side, side, generator=g, dtype=torch.float64),
                "labels": {"vq": 1, "ta": [1, -1, 0][k % 3]},
            }
            for k in range(n)
        ]
        self.prompts = [item["prompt"] for item in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {**self.items[i], "index": i}


def _reward_losses(model_dir, out, *, cached: bool):
    model = load_flow_model(model_dir, torch_dtype=torch.float64, device="cpu")
    torch.manual_seed(0)
    cfg = LatentRewardTrainingConfig(num_blocks=1, head_hidden=8, trunk_training="frozen")
    method = LatentRewardTraining(model, cfg)
    data = _Pairs()
    if cached:
        method.cache_prompts(data.prompts, cache_dir=out / "prompts")
        data = cache_media_latents(model, data, out / "latents", identity="pairs")
        offload_vae(method)
    calls = Calls(model, [*_encoders(model), "vae"])
    losses = []
    for step in range(2):
        batch = method.collate([data[2 * step], data[2 * step + 1]])
        ctx = StepContext(step=step, seed=0, modules=method.trainable_modules())
        losses.append(method.compute_loss(batch, ctx, "default")[0].item())
    return losses, calls, method, data


def test_latent_reward_cached_loss_equals_per_step_without_encoders(tiny_model_dir, tmp_path):
    plain, plain_calls, _, _ = _reward_losses(tiny_model_dir("sd3"), tmp_path / "plain", cached=False)
    cached, cached_calls, method, data = _reward_losses(
        tiny_model_dir("sd3"), tmp_path / "cached", cached=True
    )
    assert plain_calls.calls["vae"] == 4 and plain_calls.total() > 4
    assert cached_calls.total() == 0, cached_calls.calls
    assert data[3]["labels"] == {"vq": 1, "ta": 1} and "latents_w" in data[3]  # labels kept in the cache
    assert set(method.frozen_modules()).isdisjoint([*_encoders(method.model), "vae"])
    assert all(_close(a, b) for a, b in zip(cached, plain, strict=True)), (cached, plain)


# ------------------------------------------------------------------------------------------------ f-distill
def _fdistill(model_dir, manifest, out, *, cached: bool):
    teacher = load_flow_model(model_dir, torch_dtype=torch.float64, device="cpu")
    cfg = FDistillConfig(divergence="js", gan_weight=1e-2, guidance_scale=3.0, height=32, width=32)
    method = FDistill(teacher, cfg)
    data = MediaTextDataset(manifest)
    if cached:
        run = SimpleNamespace(
            train=_cfg(out),
            cache_prompts=True,
            cache_latents=True,
            latent_cache_dir=None,
            data=OneStepData(real_manifest=manifest),
        )
        data = cache_onestep_conditioning(run, method, data)
    calls = Calls(teacher, [*_encoders(teacher), "vae"])
    losses = []
    for step, group in enumerate(("generator", "critic")):
        batch = method.collate([data[0], data[1]])
        ctx = StepContext(step=step, seed=0, group=group, modules=method.trainable_modules())
        losses.append(method.compute_loss(batch, ctx, group)[0].item())
    return losses, calls, method


def test_fdistill_cached_prompts_and_real_latents_equal_per_step(tiny_model_dir, tmp_path):
    """The generator step (CFG: prompts and the empty prompt) and the critic step (discriminator on
    the real media) give the per-step losses with no teacher encoder called."""
    manifest = _manifest(tmp_path)
    plain, plain_calls, _ = _fdistill(tiny_model_dir("sd3"), manifest, tmp_path / "plain", cached=False)
    cached, cached_calls, method = _fdistill(tiny_model_dir("sd3"), manifest, tmp_path / "c", cached=True)
    assert plain_calls.calls["vae"] == 1 and plain_calls.total() > 1
    assert cached_calls.total() == 0, cached_calls.calls
    assert method.media_cached and set(method.frozen_modules()).isdisjoint(
        [*_encoders(method.teacher), "vae"]
    )
    assert all(_close(a, b, REL32) for a, b in zip(cached, plain, strict=True)), (cached, plain)


# ------------------------------------------------------------------------------------------------ I2V conditions
@pytest.fixture(scope="module")
def wan_i2v_dir(tmp_path_factory):
    return save_tiny_conditioned("wan-i2v", tmp_path_factory.mktemp("tiny-wan-i2v"))


def _i2v_pairs(folder, n: int = 2) -> str:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        for side in "AB":
            np.save(folder / f"{i}{side}.npy", rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8))
        PIL.Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(folder / f"c{i}.png")
        rows.append({"prompt": f"a moving shape {i}", "path_A": f"{i}A.npy", "path_B": f"{i}B.npy"})
        rows[-1].update(label="A", image=f"c{i}.png")
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _i2v_dpo(model_dir, pairs, out, *, cached: bool):
    model = load_flow_model(model_dir, device="cpu")
    torch.manual_seed(0)
    method = FlowDPO(
        model, DPOConfig(beta=500.0), lora=LoraConfig(rank=4, init="gaussian", export_merged=False)
    )
    for name, p in model.transformer.named_parameters():  # B != 0: policy and reference differ
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)
    data = PairDataset(pairs)
    if cached:
        method.cache_prompts(data.prompts(), cache_dir=out / "prompts")
        data = cache_condition_images(model, data, out / "conditions", identity=data_identity(pairs))
        method.conditions_cached = True
    calls = Calls(model, [*_encoders(model), "image_encoder"])
    vae_calls = Calls(model, ["vae"])
    train(method, data, _cfg(out, steps=1), progress=False)
    return _losses(out), calls, vae_calls, method, data


def test_i2v_condition_images_are_encoded_once_per_row(wan_i2v_dir, tmp_path):
    """fp32 (the tiny CLIP processor feeds fp32 pixels). A row's cached condition equals the encoding
    of its image alone bit for bit (the step encodes the latents image by image too); the step's CLIP
    tokens come from a batch of two and its text rows from another batch than the cache's, equal up to
    fp32 rounding: the DPO loss, which scales error differences by beta / 2 = 250, then agrees within
    REL32 * beta relative."""
    pairs = _i2v_pairs(tmp_path)
    plain, plain_calls, _, _, _ = _i2v_dpo(wan_i2v_dir, pairs, tmp_path / "plain", cached=False)
    cached, calls, vae_calls, method, data = _i2v_dpo(wan_i2v_dir, pairs, tmp_path / "cached", cached=True)
    assert plain_calls.calls["image_encoder"] == 1 and plain_calls.total() > 1
    assert calls.total() == 0, calls.calls
    assert vae_calls.total() == 1  # the pair media only (no latent cache here), not the condition
    assert "image_encoder" not in method.frozen_modules()
    item = data[1]
    assert "condition" not in item and {"condition/image_latents", "condition/image_embeds"} <= set(item)
    model = method.model
    image = PairDataset(pairs)[1]["condition"]
    with torch.no_grad():
        direct, _ = model.encode_prompt(
            ["a moving shape 1"], images=[image], height=32, width=32, num_frames=5
        )
    assert torch.equal(item["condition/image_latents"], direct.image_latents[0].cpu())
    assert torch.equal(item["condition/image_embeds"], direct.image_embeds[0].cpu())  # one image: same sums
    assert _close(cached[0], plain[0], rel=REL32 * 500.0), (cached, plain)


def test_condition_cache_follows_the_data_file_and_the_model(wan_i2v_dir, tmp_path):
    pairs = _i2v_pairs(tmp_path)
    model = load_flow_model(wan_i2v_dir, device="cpu")
    folder = tmp_path / "conditions"
    first = cache_condition_images(model, PairDataset(pairs), folder, identity=data_identity(pairs))
    index = folder / "index.json"
    stamp = index.read_text()
    calls = Calls(model, ["vae", "image_encoder"])
    again = cache_condition_images(model, PairDataset(pairs), folder, identity=data_identity(pairs))
    assert calls.total() == 0 and again.fingerprint == first.fingerprint and index.read_text() == stamp
    with open(pairs, "a") as f:  # a changed data file rebuilds the cache
        f.write(
            json.dumps(
                {"prompt": "p", "path_A": "0A.npy", "path_B": "1B.npy", "label": "B", "image": "c1.png"}
            )
            + "\n"
        )
    grown = cache_condition_images(model, PairDataset(pairs), folder, identity=data_identity(pairs))
    assert grown.fingerprint != first.fingerprint and len(grown) == 3 and calls.calls["vae"] == 3
    with torch.no_grad():  # a changed image encoder (the model) rebuilds it too
        next(model.pipe.image_encoder.parameters()).add_(1e-3)
    changed = cache_condition_images(model, PairDataset(pairs), folder, identity=data_identity(pairs))
    assert changed.fingerprint != grown.fingerprint and calls.calls["image_encoder"] == 6


def test_prompt_and_latent_caches_follow_the_model(tiny_model_dir, tmp_path):
    """A run on the same data and model opens its caches; changed text-encoder or VAE weights rebuild them."""
    from flowalign.training.cache import PromptEmbedCache

    manifest = _manifest(tmp_path)
    model = load_flow_model(tiny_model_dir("sd3"), device="cpu")
    data = ManifestDataset(manifest)

    def build():
        calls = Calls(model, [*_encoders(model), "vae"])
        PromptEmbedCache.build(model, dataset_prompts(data), cache_dir=tmp_path / "prompts")
        cache_media_latents(model, data, tmp_path / "latents", identity=data_identity(manifest))
        for name in calls.calls:  # unwrap: the next build counts afresh
            target = model.modules()[name]
            vars(target).pop("encode" if name == "vae" else "forward")
        return calls.calls

    assert build()["vae"] == 1  # four items in one batch of the cache
    assert sum(build().values()) == 0  # same data and model: both caches are opened
    with torch.no_grad():
        next(model.pipe.text_encoder.parameters()).add_(1e-3)
    rebuilt = build()
    assert rebuilt["text_encoder"] > 0 and rebuilt["vae"] == 0  # only the prompt cache depends on it
    with torch.no_grad():
        next(model.pipe.vae.parameters()).add_(1e-3)
    rebuilt = build()
    assert rebuilt["vae"] == 1 and rebuilt["text_encoder"] == 0
