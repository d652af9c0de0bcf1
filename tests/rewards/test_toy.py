"""The "toy" reward wraps the toy world's exact oracles behind the RewardModel contract."""

from __future__ import annotations

import pytest
import torch

from flowalign.rewards import RewardCombiner, RewardInputError, load_reward
from flowalign.toy.oracles import score_images, score_videos
from flowalign.toy.render import render_images, render_videos
from flowalign.toy.world import sample_scenes


@pytest.fixture(scope="module")
def toy():
    return load_reward("toy")


def test_images_equal_the_oracle_and_true_captions_score_high(toy):
    scenes = sample_scenes(6, seed=0, split="train", kind="image")
    images = render_images(scenes)
    prompts = [s.caption for s in scenes]
    out = toy.score(images, prompts, batch_size=4)
    direct = score_images(images, prompts)
    assert {"vq", "ta"} <= set(out) and "mq" not in out
    for key, value in direct.items():
        torch.testing.assert_close(out[key], value.float())
    assert (out["ta"] == 1).all() and (out["vq"] > 0.5).all()
    shuffled = prompts[1:] + prompts[:1]  # wrong captions lower text alignment
    assert toy.score(images, shuffled)["ta"].mean() < out["ta"].mean()


def test_videos_equal_the_oracle_and_include_motion_quality(toy):
    scenes = sample_scenes(3, seed=1, split="train", kind="video")
    videos = render_videos(scenes, num_frames=6)
    prompts = [s.caption for s in scenes]
    out = toy.score(videos, prompts, batch_size=12)  # 2 clips per oracle call
    direct = score_videos(videos, prompts)
    for key in ("vq", "mq", "ta", "ta_motion"):
        torch.testing.assert_close(out[key], direct[key].float())
    assert (out["mq"] > 0.5).all()
    combined = RewardCombiner([toy]).score(videos, prompts)
    torch.testing.assert_close(combined["overall"], out["vq"] + out["mq"] + out["ta"])


def test_toy_is_not_differentiable(toy):
    scenes = sample_scenes(1, seed=2, split="train", kind="image")
    assert toy.differentiable is False and toy.media_kind == "both"
    with pytest.raises(RewardInputError, match="not differentiable"):
        toy.score(render_images(scenes), [scenes[0].caption], differentiable=True)
