"""Fixtures for the eval tests: tiny random toy models on disk and counting rewards in the registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

from flowalign.rewards.base import RewardModel
from flowalign.rewards.registry import available_rewards, register_reward


class CountingReward(RewardModel):
    """Brightness and redness of images; counts every scored item and every load (class attributes)."""

    name = "evals-count"
    dimensions = ("bright", "red")
    media_kind = "image"
    needs_prompts = True
    scored: list[int] = []
    loads: list[int] = []

    def _score_images(self, images: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        CountingReward.scored.append(images.shape[0])
        red = images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))
        return {"bright": images.mean(dim=(1, 2, 3)), "red": red}


class FailingReward(RewardModel):
    """Always raises while scoring (a reward that breaks mid-run)."""

    name = "evals-fail"
    dimensions = ("boom",)
    media_kind = "image"

    def _score_images(self, images: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        raise RuntimeError("evals-fail: scorer crashed")


if "evals-count" not in available_rewards():

    @register_reward("evals-count")
    def _load_counting(*, device="cpu", dtype=torch.float32, **kwargs) -> CountingReward:
        CountingReward.loads.append(1)
        return CountingReward(**kwargs)

    @register_reward("evals-fail")
    def _load_failing(*, device="cpu", dtype=torch.float32, **kwargs) -> FailingReward:
        return FailingReward(**kwargs)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test in this folder runs on one thread (the shared ``one_thread`` fixture)."""


@pytest.fixture
def counting():
    """The counting reward class with its counters reset."""
    CountingReward.scored.clear()
    CountingReward.loads.clear()
    return CountingReward


def save_tiny_toy(folder: Path, *, kind: str = "image", seed: int = 0) -> Path:
    from flowalign.models.toy import build_toy_pipeline

    pipe = build_toy_pipeline(kind, width=32, num_layers=1, text_width=32, seed=seed, num_frames=4)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def toy_models(tmp_path_factory) -> dict[str, Path]:
    """Two tiny random toy image models (different seeds), saved in diffusers' layout."""
    root = tmp_path_factory.mktemp("toy-models")
    return {name: save_tiny_toy(root / name, seed=seed) for name, seed in (("a", 1), ("b", 2))}


@pytest.fixture(scope="session")
def toy_video_model(tmp_path_factory) -> Path:
    """A tiny random toy video model."""
    return save_tiny_toy(tmp_path_factory.mktemp("toy-video") / "v", kind="video", seed=3)


def write_toy_pairs(folder: Path, count: int = 6) -> Path:
    """Preference pairs of toy renders: the clean render is chosen over a noisy copy of it."""
    from flowalign.data.media import save_image
    from flowalign.evals.fid import toy_reference_media
    from flowalign.toy.world import toy_prompts

    folder.mkdir(parents=True, exist_ok=True)
    prompts = toy_prompts("heldout")[:count]
    clean = toy_reference_media(prompts, seed=3)
    noisy = (clean + 0.25 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    lines = []
    for i, prompt in enumerate(prompts):
        save_image(clean[i], folder / f"{i}_w.png")
        save_image(noisy[i], folder / f"{i}_l.png")
        lines.append(json.dumps({"prompt": prompt, "chosen": f"{i}_w.png", "rejected": f"{i}_l.png"}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"


@pytest.fixture(scope="session")
def rich_run(toy_models, tmp_path_factory):
    """One evaluation shared by the report and browser tests: three toy models (one is the first with
    one-step sampling, named with markup), a model that cannot load, a missing prompt file, the toy
    oracles plus a counting reward, a base model for drift and hacking."""
    from flowalign.evals import EvalOptions, ModelSpec, run_eval
    from flowalign.pipelines.generate_files import GenerationSettings

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # session fixtures run before the per-test thread fixture
    root = tmp_path_factory.mktemp("rich")
    models = {
        "a": toy_models["a"],
        "b": toy_models["b"],
        "fast <b>": ModelSpec(str(toy_models["a"]), {"one_step": True}),
        "broken": root / "no-such-model",
    }
    options = EvalOptions(
        settings=GenerationSettings(num_inference_steps=3),
        base="a",
        trained_rewards=["ta"],
        num_resamples=200,
        calibration_pairs=str(write_toy_pairs(root / "pairs")),
    )
    try:
        return run_eval(
            models, ["toy-heldout@3", root / "missing.txt"], ["toy", "evals-count"],
            samples_per_prompt=2, seeds=[0], out_dir=root / "eval", options=options, progress=False,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def toy_dpo_run(toy_models, tmp_path_factory) -> Path:
    """A finished two-step LoRA Flow-DPO run of toy model "a" on toy pairs, through the CLI."""
    from typer.testing import CliRunner

    from flowalign.cli import app

    root = tmp_path_factory.mktemp("dpo-run")
    args = ["train", "dpo", "--model", str(toy_models["a"]), "--data", str(write_toy_pairs(root / "pairs")),
            "--out", str(root / "run"), "--steps", "2", "--set", "train.batch_size=2", "--set", "train.trackers=[]",
            "--set", "train.cpu=true", "--set", "lora.rank=4"]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = CliRunner().invoke(app, args)
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    return root / "run"
