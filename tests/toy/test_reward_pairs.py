"""Toy preference pairs for reward-model training: oracle labels, ties, held-out captions, determinism."""

from __future__ import annotations

import pytest
import torch

from flowalign.toy.oracles import score_images, score_videos
from flowalign.toy.reward_pairs import TIE_MARGIN, build_toy_reward_pairs, toy_dimensions
from flowalign.toy.world import parse_caption, split_attributes, toy_prompts


@pytest.fixture(scope="module")
def image_pairs():
    return build_toy_reward_pairs(96, kind="image", split="train", seed=3)


@pytest.fixture(scope="module")
def video_pairs():
    return build_toy_reward_pairs(48, kind="video", split="heldout", seed=3)


def test_labels_are_the_oracle_differences_with_a_tie_margin(image_pairs, video_pairs):
    for pairs, score in ((image_pairs, score_images), (video_pairs, score_videos)):
        a, b = pairs.media_a.float() / 255, pairs.media_b.float() / 255
        oracle_a, oracle_b = score(a, pairs.prompts), score(b, pairs.prompts)
        for dim in toy_dimensions(pairs.kind):
            diff = oracle_a[dim] - oracle_b[dim]
            expected = (diff > TIE_MARGIN[dim]).long() - (diff < -TIE_MARGIN[dim]).long()
            assert torch.equal(pairs.labels[dim], expected), dim
            counts = pairs.label_counts()[dim]
            assert min(counts.values()) >= len(pairs) // 10, (dim, counts)  # A, B and ties all occur


def test_items_are_floats_with_labels_by_dimension(image_pairs, video_pairs):
    item = image_pairs[0]
    assert item["media_w"].shape == (3, 32, 32) and item["media_w"].dtype == torch.float32
    assert set(item["labels"]) == {"vq", "ta"} and item["prompt"] == image_pairs.prompts[0]
    clip = video_pairs[0]
    assert clip["media_l"].shape == (8, 3, 32, 32) and set(clip["labels"]) == {"vq", "mq", "ta"}
    assert 0 <= float(clip["media_l"].min()) and float(clip["media_l"].max()) <= 1


def test_defects_lower_the_dimension_they_target(image_pairs, video_pairs):
    defects = [d for pair in image_pairs.defects for d in pair]
    ta = torch.stack([image_pairs.scores_a["ta"], image_pairs.scores_b["ta"]], dim=1).flatten()
    vq = torch.stack([image_pairs.scores_a["vq"], image_pairs.scores_b["vq"]], dim=1).flatten()
    clean = [i for i, d in enumerate(defects) if d.wrong is None and d.visual is None]
    wrong = [i for i, d in enumerate(defects) if d.wrong is not None and d.visual is None]
    blurred = [i for i, d in enumerate(defects) if d.visual is not None]
    assert ta[clean].mean() == 1.0 and ta[wrong].mean() <= 0.8  # one of four attributes wrong
    assert vq[clean].mean() > 0.95 and vq[blurred].mean() < 0.7
    clip_defects = [d for pair in video_pairs.defects for d in pair]
    mq = torch.stack([video_pairs.scores_a["mq"], video_pairs.scores_b["mq"]], dim=1).flatten()
    smooth = [i for i, d in enumerate(clip_defects) if d.motion is None and d.visual is None]
    shaky = [i for i, d in enumerate(clip_defects) if d.motion is not None and d.visual is None]
    assert mq[smooth].mean() > 0.95 and mq[shaky].mean() < 0.7


def test_held_out_pairs_use_held_out_captions_and_pair_i_is_stable(video_pairs):
    assert set(video_pairs.prompts) <= set(toy_prompts("heldout", "video"))
    fewer = build_toy_reward_pairs(5, kind="video", split="heldout", seed=3)
    assert fewer.prompts == video_pairs.prompts[:5]
    assert torch.equal(fewer.media_a, video_pairs.media_a[:5])
    other = build_toy_reward_pairs(5, kind="video", split="heldout", seed=4)
    assert not torch.equal(other.media_a, fewer.media_a)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="kind"):
        build_toy_reward_pairs(4, kind="audio")
    with pytest.raises(ValueError, match="split"):
        build_toy_reward_pairs(4, split="test")
    with pytest.raises(ValueError, match="p_visual"):
        build_toy_reward_pairs(4, p_visual=1.5)
    with pytest.raises(ValueError, match="size >= 24"):
        build_toy_reward_pairs(4, size=16)


def test_training_pairs_never_show_a_held_out_combination(image_pairs):
    train = set(split_attributes("train", "image"))
    shown = [d.shown for pair in image_pairs.defects for d in pair]
    assert all(a in train for a in shown)
    wrong = [
        (d.shown, p)
        for pair, p in zip(image_pairs.defects, image_pairs.prompts, strict=True)
        for d in pair
        if d.wrong
    ]
    assert wrong and all(shown != parse_caption(p) for shown, p in wrong)


def test_the_share_of_wrong_motions_in_clips_can_be_raised():
    pairs = build_toy_reward_pairs(32, kind="video", seed=7, wrong_motion_share=1.0)
    wrong = [d.wrong for pair in pairs.defects for d in pair if d.wrong]
    assert wrong and set(wrong) == {"motion"}
    with pytest.raises(ValueError, match="wrong_motion_share"):
        build_toy_reward_pairs(4, kind="video", wrong_motion_share=2.0)
