"""Toy-world pieces of the one-step experiments: the classifier reward, the exact histogram distance, diversity."""

from __future__ import annotations

import pytest
import torch

from flowalign.rewards.registry import available_rewards
from flowalign.rewards.toy_classifier import ToyAttributeClassifier
from flowalign.toy.metrics import attribute_histogram_distance, diversity, format_table
from flowalign.toy.oracles import score_images
from flowalign.toy.render import render_prompts

PROMPTS = [
    "a small red circle in the center",
    "a large blue square in the top left",
    "a small pink cross in the bottom right",
]


def test_rendered_prompts_are_what_the_captions_say():
    media = render_prompts(PROMPTS * 2, seed=1)
    scores = score_images(media, PROMPTS * 2)
    assert float(scores["all_correct"].min()) == 1.0
    assert not torch.equal(media[0], media[3])  # jitter differs between two renders of one prompt


def test_histogram_distance_is_zero_on_itself_and_one_on_disjoint_sets():
    a = render_prompts(PROMPTS, seed=0)
    b = render_prompts(PROMPTS[::-1], seed=5)  # same multiset of attributes, other jitter and order
    c = render_prompts(["a large green triangle in the top right"] * 3, seed=0)
    assert all(v == 0 for v in attribute_histogram_distance(a, a).values())
    assert attribute_histogram_distance(a, b)["tv_joint"] == 0
    d = attribute_histogram_distance(a, c)
    assert d["tv_joint"] == pytest.approx(1.0) and d["tv_shape"] == pytest.approx(1.0)
    assert attribute_histogram_distance(c, a) == pytest.approx(d)  # symmetric
    noise = torch.rand(3, 3, 32, 32)
    assert attribute_histogram_distance(a, noise)["tv_joint"] == pytest.approx(
        1.0
    )  # nothing detected: the "absent" bin


def test_diversity_is_zero_for_copies_and_positive_with_jitter():
    prompts = [PROMPTS[0]] * 4 + [PROMPTS[1]] * 4
    varied = render_prompts(prompts, seed=3)
    copies = torch.cat([varied[:1].expand(4, -1, -1, -1), varied[4:5].expand(4, -1, -1, -1)])
    d_copies, d_varied = diversity(copies, prompts), diversity(varied, prompts)
    assert d_copies["pixel"] == 0 and d_copies["jitter"] == 0 and d_copies["groups"] == 2
    assert d_varied["pixel"] > 0 and d_varied["jitter"] > 0.1
    with pytest.raises(ValueError, match="no prompt has two or more samples"):
        diversity(varied[:2], prompts[3:5])


def test_classifier_reward_is_differentiable_and_registered():
    assert "toy_classifier" in available_rewards()  # listed by the registry, no import needed
    clf = ToyAttributeClassifier(width=8)
    media = render_prompts(PROMPTS).requires_grad_(True)
    ta = clf.score(media, PROMPTS, differentiable=True)["ta"]
    assert ta.shape == (3,) and bool(((ta > 0) & (ta < 1)).all())
    (grad,) = torch.autograd.grad(ta.sum(), media)
    assert grad.abs().sum() > 0
    with pytest.raises(ValueError, match="trained on 32x32 images"):
        clf.score(torch.rand(1, 3, 24, 24), PROMPTS[:1])


def test_format_table_aligns_values_with_their_errors():
    text = format_table(
        [{"model": "a", "ta": 0.5, "ta_se": 0.01}, {"model": "bb", "ta": 0.75, "ta_se": 0.02}]
    )
    lines = text.splitlines()
    assert lines[0].split() == ["model", "ta"] and "0.750+-0.020" in lines[2]
