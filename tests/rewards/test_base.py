"""RewardModel contract: validation, batching, video averaging, no-grad vs differentiable, text cache."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from flowalign.rewards.base import RewardInputError, RewardModel, TextEmbeddingCache


class BrightnessReward(RewardModel):
    """Score = w * mean pixel + prompt length / 100: cheap, differentiable, prompt-dependent."""

    name = "bright"
    dimensions = ("bright",)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.w = nn.Parameter(torch.tensor(2.0), requires_grad=False)
        self.calls: list[int] = []

    def _score_images(self, images: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        self.calls.append(images.shape[0])
        length = torch.tensor([len(p) / 100 for p in prompts])
        return {"bright": self.w * images.mean(dim=(1, 2, 3)) + length.to(images.device)}


class VideoOnlyReward(BrightnessReward):
    name = "videoonly"
    media_kind = "video"

    def _score_videos(self, videos: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        return {"bright": videos.std(dim=1).mean(dim=(1, 2, 3))}


def _imgs(b: int = 5, seed: int = 0) -> Tensor:
    return torch.rand(b, 3, 8, 10, generator=torch.Generator().manual_seed(seed))


PROMPTS = ["a", "bb", "ccc", "dddd", "eeeee"]


def test_scores_are_float32_per_item_and_batch_size_invariant():
    reward = BrightnessReward(batch_size=2)
    x = _imgs()
    out = reward.score(x.double(), PROMPTS)
    assert out["bright"].dtype == torch.float32 and out["bright"].shape == (5,)
    assert reward.calls == [2, 2, 1]
    whole = reward.score(x, PROMPTS, batch_size=5)["bright"]
    torch.testing.assert_close(out["bright"], whole)
    expected = 2 * x.mean(dim=(1, 2, 3)) + torch.tensor([len(p) / 100 for p in PROMPTS])
    torch.testing.assert_close(whole, expected)


def test_video_score_is_mean_of_frame_scores():
    reward = BrightnessReward(batch_size=4)
    videos = torch.rand(3, 6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    prompts = ["x", "yy", "zzz"]
    out = reward.score(videos, prompts)["bright"]
    frames = torch.stack(
        [reward.score(videos[:, t], prompts)["bright"] for t in range(videos.shape[1])], dim=1
    )  # [B, T]
    torch.testing.assert_close(out, frames.mean(dim=1))
    assert max(reward.calls) <= 4  # frames go through batch_size at a time


def test_video_only_model_rejects_images():
    reward = VideoOnlyReward()
    with pytest.raises(RewardInputError, match="videos"):
        reward.score(_imgs(2), ["a", "b"])
    videos = torch.rand(2, 3, 3, 8, 8)
    assert reward.score(videos, ["a", "b"])["bright"].shape == (2,)


@pytest.mark.parametrize(
    "media, prompts, match",
    [
        (torch.rand(3, 3, 8, 8), ["a", "b"], "got 2 prompts for 3 media items"),
        (torch.rand(2, 3, 8, 8), "a cat", "single str"),
        (torch.rand(2, 3, 8, 8), ["a", 3], r"prompts\[1\]"),
        (torch.rand(3, 8, 8), ["a"], "rank 3"),
        (torch.rand(2, 8, 8, 3), ["a", "b"], "channels-last"),
        (torch.rand(2, 4, 8, 8), ["a", "b"], "3 channels"),
        ((torch.rand(2, 3, 8, 8) * 255).to(torch.uint8), ["a", "b"], "divide uint8"),
        (torch.rand(2, 3, 8, 8) * 2 - 1, ["a", "b"], r"\[0, 1\].*x / 2 \+ 0.5"),
        (torch.full((2, 3, 8, 8), float("nan")), ["a", "b"], "NaN"),
        (torch.rand(0, 3, 8, 8), [], "empty"),
        ([[0.5]], ["a"], "torch.Tensor"),
    ],
)
def test_invalid_input_raises_clear_error(media, prompts, match):
    with pytest.raises(RewardInputError, match=match):
        BrightnessReward().score(media, prompts)


def test_missing_prompts_error_unless_prompt_free():
    with pytest.raises(RewardInputError, match="needs one prompt"):
        BrightnessReward().score(_imgs(2), None)


def test_no_grad_by_default_and_gradient_when_asked():
    reward = BrightnessReward()
    x = _imgs(3).requires_grad_(True)
    plain = reward.score(x, PROMPTS[:3])["bright"]
    assert not plain.requires_grad
    guided = reward.score(x, PROMPTS[:3], differentiable=True)["bright"]
    guided.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0 / x[0].numel()))


def test_differentiable_request_on_non_differentiable_model_raises():
    reward = BrightnessReward()
    reward.differentiable = False
    with pytest.raises(RewardInputError, match="not differentiable"):
        reward.score(_imgs(1), ["a"], differentiable=True)


def test_text_cache_encodes_each_unique_prompt_once_and_evicts_lru():
    cache = TextEmbeddingCache(max_size=2)
    encoded: list[list[str]] = []

    def encode(prompts: list[str]) -> Tensor:
        encoded.append(list(prompts))
        return torch.tensor([[float(len(p))] for p in prompts])

    out = cache.get(["aa", "b", "aa"], encode)
    assert encoded == [["aa", "b"]]
    torch.testing.assert_close(out, torch.tensor([[2.0], [1.0], [2.0]]))
    cache.get(["b"], encode)  # hit; "b" becomes most recent
    assert encoded == [["aa", "b"]] and cache.hits == 2 and cache.misses == 2
    cache.get(["ccc"], encode)  # evicts "aa" (least recently used)
    assert len(cache) == 2
    cache.get(["b", "aa"], encode)
    assert encoded[-1] == ["aa"]


def test_text_cache_cleared_when_model_moves():
    reward = BrightnessReward()
    reward.text_cache.get(["p"], lambda ps: torch.zeros(len(ps), 2))
    assert len(reward.text_cache) == 1
    reward.to(torch.float64)
    assert len(reward.text_cache) == 0


def test_differentiable_request_works_inside_outer_no_grad():
    x = _imgs(2).requires_grad_(True)
    with torch.no_grad():
        out = BrightnessReward().score(x, ["a", "b"], differentiable=True)["bright"]
    assert out.requires_grad
