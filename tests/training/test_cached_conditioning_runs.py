"""The runs behind ``flowalign train sft | latent-reward | fdistill | distar`` wire their caches: staged
SFT loads, latent reward runs that reuse their caches and equal the per-step run, the identity of a
one-step run's real data, and the planner's load phase of SFT."""

from __future__ import annotations

import json

import torch
from stand_ins import Placements

from flowalign.config import TrainConfig
from flowalign.data.media import save_image
from flowalign.models.sd3 import SD3Model
from flowalign.planning.command import recipe_from_yaml
from flowalign.planning.memory import Recipe, plan
from flowalign.training import runs
from flowalign.training.methods.latent_reward import LatentRewardTrainingConfig
from flowalign.training.methods.onestep_cache import onestep_data_identity
from flowalign.training.methods.onestep_data import OneStepData
from flowalign.training.runs import LatentRewardRun, SFTRun, run_latent_reward, run_sft

TARGET = torch.device("cpu", 0)
REL32 = 1e3 * torch.finfo(torch.float32).eps
"""fp32 runs: cached rows and per-step encodings differ at most by the rounding of another batch size,
and fewer than 1e3 dependent fp32 roundings of these tiny networks lie between them and the loss."""


def _media(folder, n: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    for k in range(n):
        save_image(torch.rand(3, 32, 32, generator=g), folder / f"{k}.png")
    return [f"{k}.png" for k in range(n)]


def _write(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _train(out, steps: int = 1, **extra) -> TrainConfig:
    return TrainConfig(
        output_dir=out, max_steps=steps, batch_size=2, cpu=True, trackers=[], log_every=1, **extra
    )


def test_staged_sft_encodes_with_the_transformer_on_the_cpu(tiny_model_dir, tmp_path, monkeypatch):
    placed = Placements(monkeypatch, TARGET)
    rows = [{"file": f, "prompt": f"shape {k}"} for k, f in enumerate(_media(tmp_path, 4))]
    manifest = _write(tmp_path / "manifest.jsonl", rows)
    seen = []
    encode_prompt = SD3Model.encode_prompt

    def spy(self, prompts, **kwargs):
        seen.append((placed.of(self.transformer), placed.of(self.pipe.text_encoder)))
        return encode_prompt(self, prompts, **kwargs)

    monkeypatch.setattr(SD3Model, "encode_prompt", spy)
    at_train = {}
    train = runs.train

    def start(method, *args, **kwargs):  # where the run placed each component when training starts
        model = method.model
        encoders = [m for n, m in model.modules().items() if n.startswith("text_encoder")]
        at_train.update(
            transformer=placed.of(model.transformer),
            encoders={placed.of(m) for m in encoders},
            vae=placed.of(model.pipe.vae),
            execution_device=model.execution_device,
        )
        return train(method, *args, **kwargs)

    monkeypatch.setattr(runs, "train", start)
    run = SFTRun(
        model=str(tiny_model_dir("sd3")), data=manifest, train=_train(tmp_path / "run"), cache_latents=True
    )
    result = run_sft(run, progress=False)
    assert result.step == 1 and torch.isfinite(torch.tensor(result.metrics["loss"]))
    cpu = torch.device("cpu")
    assert seen and set(seen) == {(cpu, TARGET)}  # encoded before the transformer joined the target
    assert at_train == {"transformer": TARGET, "encoders": {cpu}, "vae": cpu, "execution_device": None}
    for name in ("prompts", "latents"):
        assert (tmp_path / "run" / "cache" / name / "index.json").is_file()


def _candidates(folder) -> str:
    rows = [
        {"file": f, "prompt": f"shape {k // 2}", "scores": {"vq": float(k % 3), "ta": float(k)}}
        for k, f in enumerate(_media(folder, 4))
    ]
    return _write(folder / "candidates.jsonl", rows)


def _reward_run(model_dir, data, out, *, cached: bool, steps: int = 2) -> LatentRewardRun:
    reward = LatentRewardTrainingConfig(num_blocks=1, head_hidden=8, trunk_training="frozen")
    return LatentRewardRun(
        model=str(model_dir),
        data=data,
        train=_train(out, steps=steps),
        reward=reward,
        cache_prompts=cached,
        cache_latents=cached,
        latent_cache_dir=out.parent / "latents",
    )


def test_latent_reward_run_caches_once_and_trains_as_per_step(tiny_model_dir, tmp_path, monkeypatch):
    data = _candidates(tmp_path)
    losses = {}
    for cached in (False, True):
        out = tmp_path / f"run-{cached}"
        run_latent_reward(_reward_run(tiny_model_dir("sd3"), data, out, cached=cached), progress=False)
        lines = (out / "metrics.jsonl").read_text().splitlines()
        losses[cached] = [json.loads(line)["loss"] for line in lines]
    assert len(losses[True]) == 2
    for a, b in zip(losses[True], losses[False], strict=True):
        assert abs(a - b) <= REL32 * max(abs(b), 1.0), losses
    index = tmp_path / "latents" / "index.json"
    meta = json.loads(index.read_text())["meta"]
    assert meta["prompt"] == ["shape 0", "shape 1"] and len(meta["labels"]) == 2
    stamp = index.stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(SD3Model, "encode_media", lambda self, m, **kw: calls.append(1) or m)
    run = _reward_run(tiny_model_dir("sd3"), data, tmp_path / "again", cached=True, steps=1)
    run_latent_reward(run, progress=False)  # same data and model: the latent cache is opened
    assert calls == [] and index.stat().st_mtime_ns == stamp


def test_onestep_data_identity_follows_the_manifest(tmp_path):
    rows = [{"file": f, "prompt": "p"} for f in _media(tmp_path, 2)]
    manifest = tmp_path / "manifest.jsonl"
    _write(manifest, rows)
    first = onestep_data_identity(OneStepData(real_manifest=manifest), "image")
    assert onestep_data_identity(OneStepData(real_manifest=manifest), "image") == first
    _write(manifest, rows[:1])
    assert onestep_data_identity(OneStepData(real_manifest=manifest), "image") != first
    toy = onestep_data_identity(OneStepData(toy_items=8), "image")
    assert toy != onestep_data_identity(OneStepData(toy_items=9), "image")


def test_planner_stages_sft_with_cached_prompts(tmp_path):
    recipe = Recipe("sd35m", method="sft", lora_rank=None)
    assert recipe.staged and plan(recipe).load_phase.endswith("staged")
    assert "frozen weights" not in plan(recipe).load  # the transformer waits on the CPU
    config = tmp_path / "sft.yaml"
    config.write_text("model: stabilityai/stable-diffusion-3.5-medium\nsft: {}\ncache_prompts: false\n")
    assert not recipe_from_yaml(config).staged  # text encoders kept: one-phase load


def test_i2v_dpo_run_with_latents_calls_no_encoder_per_step(tmp_path):
    """Prompts, condition rows and latents cached: a step calls no text encoder, VAE or image encoder,
    and the latent cache holds the condition rows it was built over."""
    from test_cached_conditioning import Calls, _i2v_pairs

    from flowalign.config import LoraConfig
    from flowalign.models.tiny_conditioned import save_tiny_conditioned
    from flowalign.training.loop import train
    from flowalign.training.runs import DPORun, prepare_dpo

    model_dir = save_tiny_conditioned("wan-i2v", tmp_path / "model")
    (tmp_path / "data").mkdir()
    pairs = _i2v_pairs(tmp_path / "data")
    run = DPORun(
        model=str(model_dir),
        data=pairs,
        train=_train(tmp_path / "run"),
        lora=LoraConfig(rank=4),
        cache_latents=True,
    )
    method, data = prepare_dpo(run)
    item = data[0]
    assert {"latents_w", "latents_l", "condition/image_latents", "condition/image_embeds"} <= set(item)
    model = method.model
    names = [n for n in model.modules() if n.startswith("text_encoder")] + ["image_encoder", "vae"]
    calls = Calls(model, names)
    assert set(method.frozen_modules()).isdisjoint(names)
    result = train(method, data, run.train, progress=False, run_config=run)
    assert result.step == 1 and calls.total() == 0, calls.calls
