"""The textured toy world (flowalign.toy.texture): patterns, shading, rendering, the dataset and its spec."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

import flowalign.toy  # noqa: F401  (registers the toy: data sources)
from flowalign.data.errors import DataError
from flowalign.data.sources import open_source
from flowalign.toy.data import ToyDataset
from flowalign.toy.render import render_videos
from flowalign.toy.texture import (
    Pattern,
    Texture,
    TexturedToyDataset,
    pattern_field,
    render_textured_videos,
    sample_texture,
    shade,
)
from flowalign.toy.world import Attributes, Scene, sample_scenes

# sha256 of round(255 * render_videos(...)) for 16 clips of the (seed 3, train, video) stream, 9 frames at
# 32 x 32, taken from the flat renderer before the textured world existed: the default world is unchanged.
_FLAT_RENDER_SHA256 = "207cded1e50217534c0582e5cdfac4b5ba8cc220b1c637d46b2a7e4fc675b6a2"


def test_flat_world_renders_as_before():
    video = render_videos(sample_scenes(16, seed=3, split="train", kind="video"), num_frames=9, size=32)
    digest = hashlib.sha256((video * 255).round().to(torch.uint8).numpy().tobytes()).hexdigest()
    assert digest == _FLAT_RENDER_SHA256
    assert type(open_source("toy:video", "clips", num=2, size=16, num_frames=5)) is ToyDataset


def test_zero_amplitude_texture_is_the_flat_render_exactly():
    scenes = sample_scenes(6, seed=1, split="heldout", kind="video")
    flat = Texture(Pattern("stripes", 4.0, amplitude=0.0), Pattern("noise", 5.0, seed=3, amplitude=0.0))
    textured = render_textured_videos(scenes, [flat] * len(scenes), num_frames=5, size=32)
    assert torch.equal(textured, render_videos(scenes, num_frames=5, size=32))


@pytest.mark.parametrize("kind", ["stripes", "checks"])
def test_periodic_patterns_repeat_every_period(kind):
    pattern = Pattern(kind, 5.0, angle=0.0, phase=0.3)
    x = torch.linspace(0.0, 20.0, 81, dtype=torch.float64)
    y = torch.linspace(0.0, 20.0, 81, dtype=torch.float64)[:, None]
    field = pattern_field(pattern, x, y)
    # float32 phases up to ~32: a few ulps (4e-6 each) of phase error, times the slope 3 / tanh(3)
    assert torch.allclose(pattern_field(pattern, x + 5.0, y), field, atol=1e-4)
    assert field.abs().max() <= 1.0 + 1e-6 and field.max() > 0.99 and field.min() < -0.99


def test_noise_is_smooth_bounded_and_seeded():
    pattern = Pattern("noise", 4.0, seed=11)
    x = torch.linspace(-30.0, 30.0, 601)
    field = pattern_field(pattern, x, torch.zeros(1))
    assert field.abs().max() <= 1.0 and field.std() > 0.2
    # lattice spacing 2 px, smoothstep weights: the slope is at most 1.5 * 2 / 2 per px, steps are 0.1 px
    assert (field.diff().abs() <= 0.15 + 1e-5).all()
    assert not torch.equal(pattern_field(Pattern("noise", 4.0, seed=12), x, torch.zeros(1)), field)


def test_shade_goes_to_white_and_black_and_stays_in_range():
    colour = torch.tensor([0.2, 0.5, 0.9])[:, None, None]
    field = torch.tensor([[1.0, -1.0, 0.0, 0.5]])
    out = shade(colour, field, 1.0)  # [3, 1, 4]
    assert torch.allclose(out[:, 0, 0], torch.ones(3)) and torch.allclose(out[:, 0, 1], torch.zeros(3))
    assert torch.equal(out[:, 0, 2], colour[:, 0, 0])
    assert torch.allclose(out[:, 0, 3], colour[:, 0, 0] + 0.5 * (1 - colour[:, 0, 0]))
    assert 0.0 <= shade(colour, torch.rand(1, 8, 8) * 2 - 1, 0.7).min() <= 1.0


def test_texture_moves_with_the_shape():
    # travel 4 px over 5 frames at 32 px: exactly 1 px a frame, so the frames are shifts of each other
    scene = Scene(Attributes("square", "blue", "large", "center", "right"), 14 / 32, 16 / 32, 16 / 32, 4 / 32)
    texture = Texture(Pattern("checks", 4.5, angle=0.4), Pattern("stripes", 4.0, amplitude=0.0))
    clip = render_textured_videos([scene], [texture], num_frames=5, size=32)[0]
    inside = (slice(None), slice(12, 20), slice(12, 19))  # rows and columns inside the square in both frames
    assert torch.allclose(clip[1][inside], clip[0].roll(1, dims=-1)[inside], atol=1e-5)
    assert clip[0][inside].std() > 0.05  # and there is texture to move


def test_sample_texture_is_deterministic_and_varies():
    a = sample_texture(3, seed=0, split="train")
    assert a == sample_texture(3, seed=0, split="train")
    draws = {sample_texture(i, seed=0, split="train") for i in range(20)}
    assert len(draws) == 20 and {t.shape.kind for t in draws} == {"stripes", "checks", "noise"}
    assert a != sample_texture(3, seed=0, split="heldout")
    with pytest.raises(ValueError, match="split"):
        sample_texture(0, seed=0, split="test")
    with pytest.raises(ValueError, match="pattern"):
        Pattern("waves", 3.0)
    with pytest.raises(ValueError, match="period"):
        Pattern("noise", 0.0)


def test_textured_dataset_keeps_the_flat_scenes_and_captions():
    textured = open_source(
        "toy:video-textured", "clips", split="heldout", num=4, size=32, num_frames=5, seed=2
    )
    flat = ToyDataset("heldout", kind="video", num=4, size=32, num_frames=5, seed=2)
    assert isinstance(textured, TexturedToyDataset)
    for i in range(4):
        item, plain = textured[i], flat[i]
        assert item["prompt"] == plain["prompt"] and item["pixels"].shape == plain["pixels"].shape
        assert 0.0 <= item["pixels"].min() and item["pixels"].max() <= 1.0
        # texture adds detail: far more frame-to-neighbour pixel variation than the flat render
        tv = item["pixels"].diff(dim=-1).abs().mean()
        assert tv > 3 * plain["pixels"].diff(dim=-1).abs().mean()
        assert torch.equal(item["pixels"], textured[i]["pixels"])
    image = TexturedToyDataset("train", kind="image", num=2, size=32)[1]["pixels"]
    assert image.shape == (3, 32, 32)
    assert not math.isnan(float(image.sum()))


def test_textured_spec_errors_name_the_spec():
    with pytest.raises(DataError, match="toy:video-textured"):
        open_source("toy:video-textured", "media", num=2)
    with pytest.raises(DataError, match="toy:image-textured"):
        open_source("toy:image-textured", "clips", num=2)
    with pytest.raises(DataError, match="unknown toy data"):
        open_source("toy:cats-textured", "clips", num=2)
