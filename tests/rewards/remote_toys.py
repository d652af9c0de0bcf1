"""Two toy rewards for the remote-reward tests, registered on import (also by ``serve-reward --plugin``).

``rt-bright``: per-channel means mixed with weights from the prompt's length (dimensions ``bright``,
``warm``), an image reward. ``rt-count``: the share of pixels above a threshold named by the prompt's
word count (dimension ``lit``), native on images and videos. Both take ``delay`` (seconds of sleep per
batch) so a test can stop a server half-way through a run; ``rt-bright`` fails on the prompt ``boom``.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from flowalign.rewards import RewardModel, available_rewards, register_reward


class BrightReward(RewardModel):
    name = "rt-bright"
    dimensions = ("bright", "warm")
    differentiable = False

    def __init__(self, delay: float) -> None:
        super().__init__(batch_size=8, text_cache_size=0)
        self.delay = delay

    def _score_images(self, images: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        time.sleep(self.delay)
        if "boom" in prompts:
            raise RuntimeError("the prompt 'boom' breaks this reward")
        means = images.mean(dim=(2, 3))  # [N, 3]
        length = torch.tensor([len(p) for p in prompts], dtype=images.dtype) / 7
        return {"bright": means.mean(dim=1) * length, "warm": means[:, 0] - means[:, 2] + length}


class CountReward(RewardModel):
    name = "rt-count"
    dimensions = ("lit",)
    differentiable = False
    media_kind = "both"

    def __init__(self, delay: float) -> None:
        super().__init__(batch_size=8, text_cache_size=0)
        self.delay = delay

    def _count(self, media: Tensor, prompts: list[str]) -> Tensor:
        time.sleep(self.delay)
        level = torch.tensor([len(p.split()) / 10 for p in prompts], dtype=media.dtype)
        level = level.view(-1, *([1] * (media.ndim - 1)))
        return (media > level).float().flatten(1).mean(dim=1)

    def _score_images(self, images: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        return {"lit": self._count(images, prompts)}

    def _score_videos(self, videos: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        return {"lit": self._count(videos, prompts)}


if "rt-bright" not in available_rewards():

    @register_reward("rt-bright")
    def _load_bright(*, device="cpu", dtype=torch.float32, delay: float = 0.0) -> BrightReward:
        return BrightReward(float(delay))

    @register_reward("rt-count")
    def _load_count(*, device="cpu", dtype=torch.float32, delay: float = 0.0) -> CountReward:
        return CountReward(float(delay))
