"""Every training method of flowalign, built tiny (CPU, milliseconds per step) for the reliability suite.

``METHOD_SPECS[name]()`` returns a fresh :class:`MethodCase`: the method on freshly built networks (the
same weights on every call), a small map-style dataset and the loop settings it needs. Each call builds
new networks because methods change them (LoRA adapters, trainable copies), so a straight run and a
resumed run never share state except through the checkpoint.

The datasets hold 6 items and the loop uses batches of 2, so an epoch ends after 3 steps: a run of 4
steps resumed at step 2 crosses an epoch boundary after the resume (the data cursor must be exact).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from flowalign.config import CheckpointConfig, EMAConfig, LoraConfig, OptimConfig, TrainConfig
from flowalign.rewards.base import RewardModel

SIZE = 16
NUM_ITEMS = 6
PROMPTS = [
    "a small red circle in the center",
    "a large blue square in the top left",
    "a small green triangle in the bottom right",
]


@dataclass
class MethodCase:
    """A method ready for ``train(method, dataset, config)``."""

    method: Any
    dataset: Dataset
    train_overrides: dict[str, Any] = field(default_factory=dict)


class ListDataset(Dataset):
    """A list of item dicts; ``index`` is added as the position."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {**self.items[i], "index": i}


def _rand(*shape: int, seed: int) -> Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def toy_model(kind: str = "image", *, seed: int = 0):
    """A fresh tiny toy flow model (16x16 images, width 32, 1 layer, text width 16), same weights per seed."""
    from flowalign.models.toy import ToyModel, build_toy_pipeline

    pipe = build_toy_pipeline(
        kind, size=SIZE, num_frames=4, width=32, num_layers=1, text_width=16, patch_size=4, seed=seed
    )
    return ToyModel(pipe)


def _images(seed: int) -> list[dict]:
    return [
        {"prompt": PROMPTS[i % 3], "pixels": _rand(3, SIZE, SIZE, seed=seed + i)} for i in range(NUM_ITEMS)
    ]


class MeanColourReward(RewardModel):
    """Differentiable pixel reward for DI*: "bright" = mean brightness, "red" = mean red minus mean blue."""

    name = "rel-mean-colour"
    dimensions = ("bright", "red")
    needs_prompts = False

    def _score_images(self, images: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        return {"bright": images.mean(dim=(1, 2, 3)), "red": (images[:, 0] - images[:, 2]).mean(dim=(1, 2))}


# ---------------------------------------------------------------------------------------- builders


def sft_case() -> MethodCase:
    from flowalign.training.methods.sft import FlowMatchingSFT, SFTConfig

    method = FlowMatchingSFT(toy_model(), SFTConfig(train_text_encoder=True, caption_dropout=0.3))
    return MethodCase(method, ListDataset(_images(0)))


def dpo_case() -> MethodCase:
    from flowalign.training.methods.dpo import DPOConfig, FlowDPO

    method = FlowDPO(toy_model(), DPOConfig(beta=500.0), lora=LoraConfig(rank=2, alpha=2.0))
    items = [
        {
            "prompt": PROMPTS[i % 3],
            "media_w": _rand(3, SIZE, SIZE, seed=100 + i),
            "media_l": _rand(3, SIZE, SIZE, seed=200 + i),
        }
        for i in range(NUM_ITEMS)
    ]
    return MethodCase(method, ListDataset(items))


def rwr_case() -> MethodCase:
    from flowalign.training.methods.rwr import FlowRWR, RWRConfig, WeightedSamples

    config = RWRConfig(temperature=0.5)
    method = FlowRWR(toy_model(), config, lora=LoraConfig(rank=2, alpha=2.0))
    media = torch.stack([_rand(3, SIZE, SIZE, seed=300 + i) for i in range(NUM_ITEMS)])
    prompts = [PROMPTS[i % 2] for i in range(NUM_ITEMS)]
    rewards = torch.linspace(0.0, 1.0, NUM_ITEMS)
    return MethodCase(method, WeightedSamples(media, prompts, rewards, config))


def latent_reward_case() -> MethodCase:
    from flowalign.training.methods.latent_reward import LatentRewardTraining, LatentRewardTrainingConfig

    cfg = LatentRewardTrainingConfig(
        num_blocks=1,
        head_hidden=8,
        trunk_training="lora",
        lora=LoraConfig(rank=2, alpha=2.0),
        norm_momentum=0.9,  # the score normaliser is method state and must resume exactly
    )
    method = LatentRewardTraining(toy_model(), cfg)
    items = [
        {
            "prompt": PROMPTS[i % 3],
            "latents_w": _rand(3, SIZE, SIZE, seed=400 + i) * 2 - 1,
            "latents_l": _rand(3, SIZE, SIZE, seed=500 + i) * 2 - 1,
            "labels": {"VQ": [1, -1, 0][i % 3], "TA": [1, -2][i % 2]},
        }
        for i in range(NUM_ITEMS)
    ]
    return MethodCase(method, ListDataset(items))


def fdistill_case() -> MethodCase:
    """Generator, online fake score and discriminator heads (three trained networks, two groups)."""
    from flowalign.training.methods.fdistill import FDistill, FDistillConfig

    cfg = FDistillConfig(
        divergence="js",
        ratio_decay=0.5,  # per-bin ratio statistics carried across steps (method state)
        gan_weight=1e-2,
        r1_weight=0.1,
        generator_every=2,
        discriminator_hidden=8,
        height=SIZE,
        width=SIZE,
        critic_optim=OptimConfig(lr=2e-3, schedule="cosine", warmup_steps=1),
    )
    method = FDistill(toy_model(), cfg)
    assert set(method.trainable_modules()) == {"generator", "fake_score", "discriminator"}
    return MethodCase(method, ListDataset(_images(600)))


def distar_case() -> MethodCase:
    from flowalign.training.methods.distar import DiffInstructStar, DistarConfig

    cfg = DistarConfig(
        reward_scale=1.0,
        reward_weights={"bright": 1.0, "red": 0.5},
        generator_every=2,
        fake_score="lora",
        fake_score_lora=LoraConfig(rank=2, alpha=2.0),
        height=SIZE,
        width=SIZE,
    )
    method = DiffInstructStar(toy_model(), cfg, reward=MeanColourReward())
    items = [{"prompt": PROMPTS[i % 3]} for i in range(NUM_ITEMS)]
    return MethodCase(method, ListDataset(items))


def cdt_case() -> MethodCase:
    from flowalign.tokenizers.cdt import CDTConfig, ConditionedDiffusionTokenizer
    from flowalign.training.methods.cdt import CDTLossConfig, CDTTraining

    torch.manual_seed(0)
    config = CDTConfig.tiny(
        encoder_channels=(4, 8, 8, 8),
        unet_channels=(8, 8, 8, 8, 8),
        space_down=(True, True, True, False),
        pad_mode="replicate",
        cond_out_channels=3,
    )
    model = ConditionedDiffusionTokenizer.from_cdt_config(config)
    method = CDTTraining(model, lpips_fn=None, config=CDTLossConfig(lpips_weight=0.0, time_power=2.0))
    clips = [{"pixels": _rand(5, 3, SIZE, SIZE, seed=700 + i)} for i in range(NUM_ITEMS)]
    return MethodCase(method, ListDataset(clips))


def reward_model_case() -> MethodCase:
    """BTT training of the multi-head (VQ/TA) reward model on a tiny config-built CLIP."""
    from flowalign.rewards.multihead import MultiHeadConfig, MultiHeadRewardModel
    from flowalign.training.methods.reward_model import RewardModelTraining, RewardModelTrainingConfig

    config = MultiHeadConfig(
        dimensions=["vq", "ta"],
        media_kind="image",
        embed_dim=16,
        vision={"image_size": SIZE, "patch_size": 8, "width": 16, "layers": 1, "head_width": 8},
        text={"context_length": 16, "width": 16, "heads": 2, "layers": 1},
        hidden=16,
    )
    model = MultiHeadRewardModel.build(config, corpus=PROMPTS, seed=0)
    method = RewardModelTraining(model, RewardModelTrainingConfig(norm_momentum=0.9))
    items = [
        {
            "prompt": PROMPTS[i % 3],
            "media_w": _rand(3, SIZE, SIZE, seed=800 + i),
            "media_l": _rand(3, SIZE, SIZE, seed=900 + i),
            "labels": {"VQ": [1, -1, 0][i % 3], "TA": [1, -2][i % 2]},
        }
        for i in range(NUM_ITEMS)
    ]
    return MethodCase(method, ListDataset(items))


METHOD_SPECS: dict[str, Callable[[], MethodCase]] = {
    "sft": sft_case,
    "dpo": dpo_case,
    "rwr": rwr_case,
    "latent_reward": latent_reward_case,
    "fdistill": fdistill_case,
    "distar": distar_case,
    "cdt": cdt_case,
}
if importlib.util.find_spec("flowalign.training.methods.reward_model") is not None:
    METHOD_SPECS["reward_model"] = reward_model_case


def loop_config(out: Path, *, steps: int, **overrides: Any) -> TrainConfig:
    """The loop settings of the resume test: EMA, warm-up + cosine LR, checkpoints every 2 steps."""
    cfg = TrainConfig(
        output_dir=out,
        seed=5,
        max_steps=steps,
        batch_size=2,
        log_every=1,
        trackers=[],
        cpu=True,
        optim=OptimConfig(lr=1e-3, schedule="cosine", warmup_steps=1),
        ema=EMAConfig(use=True, decay=0.9),
        checkpoint=CheckpointConfig(every=2, keep_last=None),
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg
