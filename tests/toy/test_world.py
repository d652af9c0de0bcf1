"""Vocabulary, captions, split and scene sampling of the toy world."""

from __future__ import annotations

import itertools

import pytest

from flowalign.toy import world
from flowalign.toy.world import (
    COLOURS,
    MOTIONS,
    POSITIONS,
    SHAPES,
    SIZES,
    Attributes,
    all_attributes,
    parse_caption,
    sample_scene,
    sample_scenes,
    split_attributes,
    split_of,
    toy_prompts,
)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_parse_caption_round_trips_every_caption(kind):
    combos = all_attributes(kind)
    expected = (
        len(SHAPES) * len(COLOURS) * len(SIZES) * len(POSITIONS) * (len(MOTIONS) if kind == "video" else 1)
    )
    assert len(combos) == expected
    captions = [a.caption() for a in combos]
    assert len(set(captions)) == len(captions)
    for attrs, caption in zip(combos, captions, strict=True):
        assert parse_caption(caption) == attrs


def test_caption_grammar_examples():
    assert Attributes("circle", "red", "small", "top left").caption() == "a small red circle in the top left"
    assert Attributes("square", "blue", "large", "center").caption() == "a large blue square in the center"
    moving = Attributes("cross", "teal", "small", "bottom right", "right")
    assert moving.caption() == "a small teal cross in the bottom right moving right"
    assert Attributes("diamond", "pink", "large", "center", "still").caption().endswith("staying still")


@pytest.mark.parametrize(
    "bad",
    [
        "a big red circle in the center",
        "a small red circle",
        "A small red circle in the center",
        "a small red circle in the center ",
        "a small red circle in the middle",
        "a small red circle in the center moving sideways",
        "a small red circle in the center moving still",
        "",
    ],
)
def test_parse_caption_rejects_bad_caption_naming_it(bad):
    with pytest.raises(ValueError) as info:
        parse_caption(bad)
    assert repr(bad) in str(info.value)


def test_attributes_reject_unknown_values_naming_the_key():
    with pytest.raises(ValueError, match="colour='mauve'"):
        Attributes("circle", "mauve", "small", "center")
    with pytest.raises(ValueError, match="motion='spin'"):
        Attributes("circle", "red", "small", "center", "spin")


@pytest.mark.parametrize("kind", ["image", "video"])
def test_split_is_disjoint_complete_and_about_one_fifth_heldout(kind):
    train, heldout = split_attributes("train", kind), split_attributes("heldout", kind)
    assert not set(train) & set(heldout)
    assert set(train) | set(heldout) == set(all_attributes(kind))
    assert len(heldout) == round(world.HELDOUT_FRACTION * len(all_attributes(kind)))
    assert not set(toy_prompts("train", kind)) & set(toy_prompts("heldout", kind))
    assert all(split_of(a) == "heldout" for a in heldout)
    assert all(split_of(a) == "train" for a in train)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_every_attribute_value_pair_occurs_in_training(kind):
    keys = ["shape", "colour", "size", "position"] + (["motion"] if kind == "video" else [])
    train = split_attributes("train", kind)
    for k1, k2 in itertools.combinations(keys, 2):
        seen = {(getattr(a, k1), getattr(a, k2)) for a in train}
        every = {(getattr(a, k1), getattr(a, k2)) for a in all_attributes(kind)}
        assert seen == every, (k1, k2)


def test_toy_prompts_are_deterministic_and_ordered():
    assert toy_prompts("heldout", "image") == toy_prompts("heldout", "image")
    order = {a.caption(): i for i, a in enumerate(all_attributes("video"))}
    idx = [order[p] for p in toy_prompts("train", "video")]
    assert idx == sorted(idx)


def test_sample_scene_is_a_pure_function_of_seed_split_kind_index():
    a = sample_scenes(20, seed=3, split="train", kind="video")
    b = sample_scenes(40, seed=3, split="train", kind="video")
    assert a == b[:20]
    assert sample_scene(7, seed=3, split="train", kind="video") == a[7]
    other = sample_scenes(20, seed=4, split="train", kind="video")
    assert sum(x != y for x, y in zip(a, other, strict=True)) >= 18


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_sampled_scenes_stay_in_their_split_and_cover_it(split):
    scenes = sample_scenes(2000, seed=0, split=split, kind="image")
    combos = {s.attributes for s in scenes}
    assert combos <= set(split_attributes(split, "image"))
    assert len(combos) >= 0.9 * len(split_attributes(split, "image"))


def test_jitter_stays_within_bounds_and_keeps_objects_in_frame():
    scenes = sample_scenes(3000, seed=5, split="train", kind="video")
    for s in scenes:
        a = s.attributes
        assert abs(s.extent - world.EXTENT[a.size]) <= world.EXTENT_JITTER + 1e-12
        ax, ay = world.ANCHORS[a.position]
        assert max(abs(s.cx - ax), abs(s.cy - ay)) <= world.POSITION_JITTER + 1e-12
        if a.motion == "still":
            assert s.travel == 0.0
        else:
            assert abs(s.travel - world.TRAVEL) <= world.TRAVEL_JITTER + 1e-12
        for f in range(8):
            cx, cy = s.centre_at(f, 8)
            half = s.extent / 2
            assert half <= cx <= 1 - half and half <= cy <= 1 - half


def test_centre_moves_at_constant_velocity_with_the_scene_centre_as_mean():
    s = next(
        x for x in sample_scenes(20, seed=1, split="train", kind="video") if x.attributes.motion != "still"
    )
    centres = [s.centre_at(f, 8) for f in range(8)]
    steps = {(round(b[0] - a[0], 12), round(b[1] - a[1], 12)) for a, b in itertools.pairwise(centres)}
    assert len(steps) == 1
    assert sum(c[0] for c in centres) / 8 == pytest.approx(s.cx)
    assert sum(c[1] for c in centres) / 8 == pytest.approx(s.cy)
    dx, dy = world.MOTION_DIRECTION[s.attributes.motion]
    total = (centres[-1][0] - centres[0][0], centres[-1][1] - centres[0][1])
    assert total == pytest.approx((dx * s.travel, dy * s.travel))


def test_bad_split_kind_and_index_are_rejected():
    with pytest.raises(ValueError, match="'test'"):
        toy_prompts("test", "image")
    with pytest.raises(ValueError, match="'audio'"):
        toy_prompts("train", "audio")
    with pytest.raises(ValueError, match="-1"):
        sample_scene(-1, seed=0, split="train")
