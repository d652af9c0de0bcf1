"""Rendering: shapes, ranges, exact background/colour mixtures, geometry and motion."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flowalign.toy.render import background_rgb, render_image, render_images, render_video, render_videos
from flowalign.toy.world import PALETTE, SHAPES, Attributes, Scene, sample_scenes


def _alpha(pixels: torch.Tensor, colour: str) -> torch.Tensor:
    """Coverage of [.., 3, H, W] pixels by `colour`, read back from the exact mixture."""
    bg = background_rgb()[:, None, None]
    c = torch.tensor(PALETTE[colour], dtype=torch.float32)[:, None, None] / 255.0
    return ((pixels - bg) * (c - bg)).sum(-3) / ((c - bg) ** 2).sum()


def test_render_shapes_dtype_and_range(gt_images, gt_videos):
    _, images = gt_images
    _, videos = gt_videos
    assert images.shape == (300, 3, 32, 32) and images.dtype == torch.float32
    assert videos.shape == (300, 8, 3, 32, 32) and videos.dtype == torch.float32
    for x in (images, videos):
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_every_pixel_is_a_mixture_of_background_and_the_object_colour(gt_images):
    scenes, images = gt_images
    bg = background_rgb()[:, None, None]
    for scene, img in zip(scenes[:50], images[:50], strict=True):
        a = _alpha(img, scene.attributes.colour)
        c = torch.tensor(PALETTE[scene.attributes.colour])[:, None, None] / 255.0
        assert torch.allclose(img, bg + a * (c - bg), atol=1e-6)
        assert float(a.min()) >= -1e-6 and float(a.max()) == pytest.approx(1.0)


def test_batched_and_single_renders_agree(gt_images, gt_videos):
    scenes, images = gt_images
    assert torch.equal(render_image(scenes[3]), images[3])
    vscenes, videos = gt_videos
    assert torch.equal(render_video(vscenes[5]), videos[5])


def test_area_and_centroid_match_the_geometry_at_any_resolution():
    # Anti-aliased coverage integrates to the shape's area, and a square's centroid is its centre.
    scene = Scene(Attributes("square", "blue", "large", "center"), extent=14 / 32, cx=0.51, cy=0.47)
    for size in (32, 64, 96):
        a = _alpha(render_image(scene, size=size), "blue")
        assert float(a.sum()) / size**2 == pytest.approx(scene.extent**2, rel=1e-3)
        coords = (torch.arange(size) + 0.5) / size
        assert float((a.sum(0) * coords).sum() / a.sum()) == pytest.approx(scene.cx, abs=1e-4)
        assert float((a.sum(1) * coords).sum() / a.sum()) == pytest.approx(scene.cy, abs=1e-4)


def test_shapes_differ_and_scale_with_extent():
    base = Scene(Attributes("circle", "red", "small", "center"), extent=0.3, cx=0.5, cy=0.5)
    areas = {}
    for shape in SHAPES:
        s = dataclasses.replace(base, attributes=dataclasses.replace(base.attributes, shape=shape))
        small = _alpha(render_image(s, size=64), "red").sum()
        big = _alpha(render_image(dataclasses.replace(s, extent=0.45), size=64), "red").sum()
        assert float(big / small) == pytest.approx((0.45 / 0.3) ** 2, rel=0.03)
        areas[shape] = float(small)
    full = (0.3 * 64) ** 2
    expected = {"square": 1.0, "circle": torch.pi / 4, "diamond": 0.5, "triangle": 0.5, "cross": 5 / 9}
    for shape, frac in expected.items():
        assert areas[shape] / full == pytest.approx(frac, rel=0.03), shape


def test_video_centroid_moves_at_constant_velocity_in_the_stated_direction():
    scenes = [s for s in sample_scenes(40, seed=2, split="train", kind="video")][:12]
    videos = render_videos(scenes, num_frames=8)
    coords = (torch.arange(32) + 0.5) / 32
    for scene, clip in zip(scenes, videos, strict=True):
        a = _alpha(clip, scene.attributes.colour)  # [T, H, W]
        mass = a.sum((1, 2))
        cx = (a.sum(1) * coords).sum(1) / mass
        cy = (a.sum(2) * coords).sum(1) / mass
        assert torch.allclose(mass, mass.mean().expand(8), rtol=0.03)  # in frame: area kept
        step_x, step_y = cx.diff(), cy.diff()
        assert float((step_x - step_x.mean()).abs().max()) < 0.1 / 32  # AA wobble < 0.1 px
        assert float((step_y - step_y.mean()).abs().max()) < 0.1 / 32  # AA wobble < 0.1 px
        if scene.attributes.motion == "still":
            assert float(step_x.abs().max() + step_y.abs().max()) < 1e-6
        else:
            axis = {"left": -step_x, "right": step_x, "up": -step_y, "down": step_y}[scene.attributes.motion]
            assert float(axis.sum()) * 32 == pytest.approx(scene.travel * 32, abs=0.05)


def test_empty_scene_list_is_an_error():
    with pytest.raises(ValueError, match="at least one scene"):
        render_images([])
