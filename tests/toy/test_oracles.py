"""Oracle rewards: exact on ground truth, sensitive to each attribute, to noise, blur and bad motion."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from flowalign.toy import world
from flowalign.toy.oracles import detect_attributes, score_images, score_videos
from flowalign.toy.render import background_rgb, render_images, render_video, render_videos
from flowalign.toy.world import COLOURS, MOTIONS, POSITIONS, SHAPES, SIZES, Attributes, Scene, sample_scenes

IMAGE_KEYS = {"ta", "vq", "ta_shape", "ta_colour", "ta_size", "ta_position", "all_correct"}
VIDEO_KEYS = IMAGE_KEYS | {"mq", "ta_motion"}


def _captions(scenes: list[Scene]) -> list[str]:
    return [s.caption for s in scenes]


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [..., H, W] with replicate padding."""
    k = 2 * math.ceil(3 * sigma) + 1
    r = torch.arange(k, dtype=torch.float32) - k // 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    flat = x.reshape(-1, 1, *x.shape[-2:])
    flat = F.pad(flat, (k // 2,) * 4, mode="replicate")
    flat = F.conv2d(F.conv2d(flat, g.view(1, 1, 1, k)), g.view(1, 1, k, 1))
    return flat.reshape(x.shape)


def _noisy(x: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return (x + sigma * noise).clamp(0.0, 1.0)


def _with(scene: Scene, **attrs: str) -> Scene:
    """The scene with some attributes changed; a new size or position also moves the geometry."""
    new = dataclasses.replace(scene.attributes, **attrs)
    old_x, old_y = world.ANCHORS[scene.attributes.position]
    new_x, new_y = world.ANCHORS[new.position]
    return dataclasses.replace(
        scene,
        attributes=new,
        extent=scene.extent - world.EXTENT[scene.attributes.size] + world.EXTENT[new.size],
        cx=scene.cx - old_x + new_x,
        cy=scene.cy - old_y + new_y,
    )


def test_ground_truth_images_score_at_least_095_on_every_dimension(gt_images):
    scenes, images = gt_images
    scores = score_images(images, _captions(scenes))
    assert set(scores) == IMAGE_KEYS
    for key, value in scores.items():
        assert value.shape == (len(scenes),) and value.dtype == torch.float32, key
        assert float(value.min()) >= 0.95, key
    assert float(scores["all_correct"].mean()) == 1.0


def test_ground_truth_videos_score_at_least_095_on_every_dimension(gt_videos):
    scenes, videos = gt_videos
    scores = score_videos(videos, _captions(scenes))
    assert set(scores) == VIDEO_KEYS
    for key, value in scores.items():
        assert value.shape == (len(scenes),) and value.dtype == torch.float32, key
        assert float(value.min()) >= 0.95, key
    assert float(scores["all_correct"].mean()) == 1.0


def test_detected_attributes_and_geometry_match_the_scene(gt_images, gt_videos):
    for scenes, media in (gt_images, gt_videos):
        for scene, found in zip(scenes, detect_attributes(media), strict=True):
            assert found["present"]
            for key, value in scene.attributes.as_dict().items():
                if value is not None:
                    assert found[key] == value, (scene.caption, key)
            assert found["extent"] == pytest.approx(scene.extent, abs=0.3 / 32)
            assert found["cx"] == pytest.approx(scene.cx, abs=0.2 / 32)
            assert found["cy"] == pytest.approx(scene.cy, abs=0.2 / 32)


@pytest.mark.parametrize("size", [24, 48, 64])
def test_oracle_is_exact_at_other_resolutions(size):
    scenes = sample_scenes(60, seed=21, split="train", kind="image")
    scores = score_images(render_images(scenes, size=size), _captions(scenes))
    assert float(scores["all_correct"].min()) == 1.0 and float(scores["vq"].min()) >= 0.95


@pytest.mark.parametrize(
    ("key", "values"),
    [("colour", COLOURS), ("shape", SHAPES), ("position", POSITIONS), ("size", SIZES)],
)
def test_one_wrong_attribute_scores_low_on_it_but_keeps_visual_quality(key, values):
    base = sample_scenes(12, seed=31, split="train", kind="image")
    variants, captions = [], []
    for scene in base:
        for value in values:
            if value != getattr(scene.attributes, key):  # every other value, the closest colours included
                variants.append(_with(scene, **{key: value}))
                captions.append(scene.caption)
    scores = score_images(render_images(variants), captions)
    assert float(scores[f"ta_{key}"].max()) == 0.0
    assert torch.equal(scores["ta"], torch.full_like(scores["ta"], 0.75))
    assert float(scores["all_correct"].max()) == 0.0
    assert float(scores["vq"].min()) >= 0.95


def test_all_four_attributes_wrong_gives_zero_alignment():
    scene = Scene(Attributes("circle", "orange", "small", "top left"), extent=9 / 32, cx=11 / 32, cy=11 / 32)
    wrong = Scene(
        Attributes("cross", "yellow", "large", "bottom right"), extent=14 / 32, cx=21 / 32, cy=21 / 32
    )
    scores = score_images(render_images([wrong, scene]), [scene.caption, scene.caption])
    assert scores["ta"].tolist() == [0.0, 1.0]


def test_gaussian_noise_lowers_visual_quality_monotonically(gt_images):
    scenes, images = gt_images
    images, captions = images[:100], _captions(scenes[:100])
    means = [float(score_images(_noisy(images, s), captions)["vq"].mean()) for s in (0.0, 0.02, 0.05, 0.1)]
    assert means[0] >= 0.99
    assert means == sorted(means, reverse=True)
    noisy = score_images(_noisy(images, 0.1), captions)
    assert means[-1] < 0.1 and float(noisy["vq"].max()) < 0.3


def test_blur_lowers_visual_quality_monotonically(gt_images):
    scenes, images = gt_images
    images, captions = images[:100], _captions(scenes[:100])
    means = [float(score_images(_blur(images, s), captions)["vq"].mean()) for s in (0.3, 0.6, 0.8, 1.0)]
    assert means[0] >= 0.99
    assert means == sorted(means, reverse=True)
    assert means[-1] < 0.1 and float(score_images(_blur(images, 1.0), captions)["vq"].max()) < 0.4


def test_a_stray_speck_or_a_ghost_lowers_visual_quality_but_not_alignment(gt_images):
    scenes, _ = gt_images
    scenes = [s for s in scenes if s.attributes.position in ("top left", "top right", "center")][:40]
    captions = _captions(scenes)
    clean = render_images(scenes)
    speck = clean.clone()
    speck[:, :, 28:31, 14:17] = torch.tensor([0.2, 0.2, 0.8])[:, None, None]  # 3x3 speck near the bottom edge
    bg = background_rgb()[None, :, None, None]
    shifted = render_images([dataclasses.replace(s, cy=s.cy + 0.3) for s in scenes])
    on_object = (clean - bg).abs().amax(dim=1, keepdim=True) > 0
    ghost = torch.where(
        on_object, clean, bg + 0.4 * (shifted - bg)
    )  # faint copy 9.6 px lower, touching large ones
    before = score_images(clean, captions)
    assert float(before["vq"].min()) >= 0.95
    after_speck = score_images(speck, captions)
    assert float(after_speck["vq"].mean()) < 0.6 and bool((after_speck["vq"] < before["vq"] - 0.2).all())
    after_ghost = score_images(ghost, captions)
    assert float(after_ghost["vq"].max()) < 0.1
    for after in (after_speck, after_ghost):
        assert torch.equal(after["ta"], before["ta"])  # the object is still found and read correctly


def test_noise_and_blank_frames_show_no_object():
    scenes = sample_scenes(50, seed=41, split="train", kind="image")
    gen = torch.Generator().manual_seed(0)
    blank = background_rgb()[None, :, None, None].expand(50, 3, 32, 32).contiguous()
    for media in (torch.rand(50, 3, 32, 32, generator=gen), blank):
        scores = score_images(media, _captions(scenes))
        assert float(scores["ta"].max()) == 0.0 and float(scores["vq"].max()) < 0.05
        assert not any(d["present"] or d["shape"] for d in detect_attributes(media))
    vscenes = sample_scenes(20, seed=41, split="train", kind="video")
    scores = score_videos(torch.rand(20, 8, 3, 32, 32, generator=gen), _captions(vscenes))
    assert float(scores["ta"].max()) == 0.0 and float(scores["mq"].max()) < 0.05


def test_mismatched_renders_score_near_chance(gt_images):
    scenes, images = gt_images
    shuffled = _captions(scenes)[1:] + _captions(scenes)[:1]
    scores = score_images(images, shuffled)
    assert 0.15 < float(scores["ta"].mean()) < 0.4
    assert float(scores["all_correct"].mean()) < 0.05
    assert float(scores["vq"].min()) >= 0.95


def test_scores_do_not_depend_on_the_rest_of_the_batch(gt_images):
    scenes, images = gt_images
    captions = _captions(scenes[:20])
    batch = score_images(_blur(images[:20], 0.6), captions)
    for i in (0, 7, 19):
        single = score_images(_blur(images[i : i + 1], 0.6), captions[i : i + 1])
        for key in IMAGE_KEYS:
            assert float(single[key][0]) == pytest.approx(float(batch[key][i]), abs=1e-5), key


def _moving_scenes(n: int, seed: int) -> list[Scene]:
    return [s for s in sample_scenes(4 * n, seed=seed, split="train", kind="video") if s.travel > 0][:n]


def test_teleporting_object_scores_low_on_motion_quality():
    scenes = _moving_scenes(30, seed=51)
    clips = []
    for s in scenes:
        jumped = dataclasses.replace(s, cx=s.cx + (0.25 if s.cx < 0.5 else -0.25))
        clips.append(torch.cat([render_video(s)[:4], render_video(jumped)[4:]]))
    scores = score_videos(torch.stack(clips), _captions(scenes))
    assert float(scores["mq"].max()) < 0.05
    assert float(scores["vq"].min()) >= 0.95  # every frame on its own is a clean render


@pytest.mark.parametrize(("missing", "bound"), [([4], 0.6), ([3, 4], 0.35), ([0, 3, 6], 0.2)])
def test_vanishing_object_scores_low_on_motion_quality(gt_videos, missing, bound):
    scenes, videos = gt_videos
    clips = videos[:40].clone()
    clips[:, missing] = background_rgb()[:, None, None]
    scores = score_videos(clips, _captions(scenes[:40]))
    assert float(scores["mq"].max()) < bound
    assert float(scores["ta"].min()) == 1.0  # the remaining frames still show the caption


def test_flicker_scores_low_on_motion_quality(gt_videos):
    scenes, videos = gt_videos
    clips = videos[:40].clone()
    bg = background_rgb()[:, None, None]
    clips[:, 1::2] = bg + 0.5 * (clips[:, 1::2] - bg)  # every other frame half-faded
    assert float(score_videos(clips, _captions(scenes[:40]))["mq"].max()) < 0.1


def test_accelerating_motion_scores_lower_than_constant_velocity():
    scenes = _moving_scenes(20, seed=52)
    clips = []
    for s in scenes:
        frames = []
        for f in range(8):
            lin_x, lin_y = s.centre_at(f, 8)
            start_x, start_y = s.centre_at(0, 8)
            ease = (f / 7) ** 2 * 7  # same start and end, quadratic in time
            x = start_x + (lin_x - start_x) * (ease / f if f else 0.0)
            y = start_y + (lin_y - start_y) * (ease / f if f else 0.0)
            frames.append(render_images([dataclasses.replace(s, cx=x, cy=y)])[0])
        clips.append(torch.stack(frames))
    eased = score_videos(torch.stack(clips), _captions(scenes))["mq"]
    steady = score_videos(render_videos(scenes), _captions(scenes))["mq"]
    assert float(steady.min()) >= 0.99
    assert float(eased.max()) < 0.9


def test_wrong_motion_scores_zero_on_motion_only(gt_videos):
    scenes, videos = gt_videos
    clips, captions = [], []
    for scene, clip in zip(scenes[:30], videos[:30], strict=True):
        for motion in MOTIONS:
            if motion != scene.attributes.motion:
                clips.append(clip)
                captions.append(_with(scene, motion=motion).caption)
    scores = score_videos(torch.stack(clips), captions)
    assert float(scores["ta_motion"].max()) == 0.0
    assert torch.equal(scores["ta"], torch.full_like(scores["ta"], 0.8))
    assert float(scores["mq"].min()) >= 0.95


def test_frozen_clip_is_smooth_but_not_moving(gt_videos):
    scenes, videos = gt_videos
    moving = [i for i, s in enumerate(scenes) if s.travel > 0][:30]
    frozen = videos[moving][:, 3:4].expand(-1, 8, -1, -1, -1).contiguous()
    scores = score_videos(frozen, [scenes[i].caption for i in moving])
    assert float(scores["ta_motion"].max()) == 0.0 and float(scores["mq"].min()) >= 0.95
    still = [_with(scenes[i], motion="still").caption for i in moving]
    assert float(score_videos(frozen, still)["ta_motion"].min()) == 1.0


@pytest.mark.parametrize(
    ("media", "prompts", "match"),
    [
        (torch.rand(2, 3, 32), ["a small red circle in the center"] * 2, r"\[B, 3, H, W\]"),
        (torch.rand(2, 3, 32, 30), ["a small red circle in the center"] * 2, "square"),
        (torch.rand(2, 3, 16, 16), ["a small red circle in the center"] * 2, ">= 24"),
        (torch.rand(2, 3, 32, 32) + 1.0, ["a small red circle in the center"] * 2, r"in \[0, 1\], got min 1"),
        ((torch.rand(2, 3, 32, 32) * 255).to(torch.uint8), ["a small red circle in the center"] * 2, "uint8"),
        (torch.rand(2, 3, 32, 32), ["a small red circle in the center"], "list of 2 prompts"),
        (
            torch.rand(2, 3, 32, 32),
            ["a small red circle in the center", "a red blob"],
            "prompt 1: .*'a red blob'",
        ),
        (
            torch.rand(1, 3, 32, 32),
            ["a small red circle in the center moving up"],
            "prompt 0 .* image caption",
        ),
    ],
)
def test_score_images_rejects_bad_input_with_a_clear_message(media, prompts, match):
    with pytest.raises(ValueError, match=match):
        score_images(media, prompts)


def test_score_videos_rejects_bad_input_with_a_clear_message():
    with pytest.raises(ValueError, match=r"\[B, T, 3, H, W\]"):
        score_videos(torch.rand(2, 3, 32, 32), ["a small red circle in the center moving up"] * 2)
    with pytest.raises(ValueError, match="prompt 0 .* video caption"):
        score_videos(torch.rand(1, 8, 3, 32, 32), ["a small red circle in the center"])
    with pytest.raises(ValueError, match="finite"):
        score_videos(
            torch.full((1, 8, 3, 32, 32), float("nan")), ["a small red circle in the center moving up"]
        )


def test_large_batches_are_scored_in_chunks_with_the_same_result(monkeypatch, gt_images):
    scenes, images = gt_images
    captions = _captions(scenes[:50])
    whole = score_images(_blur(images[:50], 0.6), captions)
    monkeypatch.setattr("flowalign.toy.oracles._CHUNK_PIXELS", 7 * 32 * 32)  # chunks of 7 frames
    chunked = score_images(_blur(images[:50], 0.6), captions)
    for key in IMAGE_KEYS:
        assert torch.allclose(chunked[key], whole[key], atol=1e-6), key
