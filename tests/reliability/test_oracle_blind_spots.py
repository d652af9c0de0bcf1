"""Oracle blind spots: images that do not draw the scene must not score well, rendered scenes unchanged.

Each test builds a family of images an optimiser could learn instead of the scene (a frame filled by one
colour, noise, copies of the shape, a shape cut by the frame, shapes too large or too small, stripes,
checkerboards, an off-palette object) and asserts the oracle gives them no visual quality and no text
alignment (or, for the off-palette object, no colour hit), while ground-truth renders still score 1.
"""

from __future__ import annotations

import time

import pytest
import rel_summary
import torch

from flowalign.toy.oracle_inputs import MAX_SIZE
from flowalign.toy.oracles import score_images, score_videos
from flowalign.toy.render import background_rgb, compose, palette_rgb, render_images, shape_alpha
from flowalign.toy.world import COLOURS, EXTENT, PALETTE, SHAPES, sample_scenes

S = 32
CAPTIONS = [
    "a large red circle in the center",
    "a small blue square in the top left",
    "a large green cross in the bottom right",
    "a small yellow diamond in the top right",
    "a large pink triangle in the bottom left",
]


def _shapes(
    shape: str, centres: list[tuple[float, float]], extent: float, colour: str = "red"
) -> torch.Tensor:
    """One image [3, S, S] with ``shape`` drawn at each centre (the union of their coverages)."""
    n = len(centres)
    alpha = shape_alpha(
        torch.full((n,), SHAPES.index(shape)),
        torch.tensor([c[0] for c in centres]),
        torch.tensor([c[1] for c in centres]),
        torch.full((n,), extent),
        size=S,
    ).amax(dim=0)
    rgb = palette_rgb()[COLOURS.index(colour)]
    return compose(alpha[None], rgb[None])[0]


def _pattern(mask: torch.Tensor, colour: str) -> torch.Tensor:
    return compose(mask.float()[None], palette_rgb()[COLOURS.index(colour)][None])[0]


def _assert_low(name: str, images: list[torch.Tensor]) -> None:
    """Against every caption, each image scores vq 0 and ta 0."""
    batch = torch.stack(images).clamp(0.0, 1.0)
    for caption in CAPTIONS:
        scores = score_images(batch, [caption] * len(images))
        assert float(scores["vq"].max()) == 0.0, (name, caption, scores["vq"])
        assert float(scores["ta"].max()) == 0.0, (name, caption, scores["ta"])
    rel_summary.count(
        "oracle blind spots", f"{name} (images x captions, all vq 0, ta 0)", len(batch) * len(CAPTIONS)
    )


def test_a_frame_filled_by_one_colour_scores_nothing():
    greys = [torch.full((3, S, S), v) for v in (0.0, 0.25, 0.5, 0.75, 1.0)]
    palette = [c[:, None, None].expand(3, S, S).clone() for c in palette_rgb()]
    gen = torch.Generator().manual_seed(0)
    random = [torch.rand(3, 1, 1, generator=gen).expand(3, S, S).clone() for _ in range(20)]
    far = [img for img in random if float((img[:, 0, 0] - background_rgb()).norm()) > 0.12]
    _assert_low("flat frame", greys + palette + far)


def test_noise_scores_nothing():
    gen = torch.Generator().manual_seed(1)
    uniform = [torch.rand(3, S, S, generator=gen) for _ in range(10)]
    binary = [_pattern(torch.rand(S, S, generator=gen) < p, "red") for p in (0.1, 0.3, 0.5, 0.7, 0.9)]
    _assert_low("noise", uniform + binary)


def test_several_copies_of_the_shape_score_nothing():
    apart = [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)]  # 7 px gaps between small shapes
    images = []
    for shape in SHAPES:
        images.append(_shapes(shape, apart, EXTENT["small"]))
        images.append(_shapes(shape, apart[:2], EXTENT["small"]))
        images.append(_shapes(shape, [(0.5, 0.5), *apart], EXTENT["small"] * 0.8))
    _assert_low("separate copies of the shape", images)


def test_touching_copies_make_a_lump_with_no_visual_quality_and_not_the_shape():
    """Copies 10 px apart touch and form one crisp, clean lump: it is no shape (template error >= 0.43),
    so it gets no visual quality and is not read as the copied shape. (Five overlapping squares make a
    near-square, which is fairly read as one large square, so squares are left out of the second lump.)"""
    anchors = [(11 / 32, 11 / 32), (21 / 32, 11 / 32), (11 / 32, 21 / 32), (21 / 32, 21 / 32)]
    lumps, captions = [], []
    for shape in SHAPES:
        lumps.append(_shapes(shape, anchors, EXTENT["small"]))
        if shape != "square":
            lumps.append(_shapes(shape, [(0.5, 0.5), *anchors], EXTENT["small"] * 0.8))
        captions += [f"a large red {shape} in the center"] * (len(lumps) - len(captions))
    scores = score_images(torch.stack(lumps), captions)
    assert float(scores["vq"].max()) == 0.0 and float(scores["ta_shape"].max()) == 0.0, scores
    rel_summary.count("oracle blind spots", "touching copies (vq 0, shape not read)", len(lumps))


def test_a_shape_cut_by_the_frame_or_flush_with_it_scores_nothing():
    images = []
    for shape in SHAPES:
        for extent in (EXTENT["small"], EXTENT["large"]):
            half = extent / 2
            images += [
                _shapes(shape, [(half * 0.3, 0.5)], extent),  # cut by the left edge
                _shapes(shape, [(0.5, 1.0 - half * 0.5)], extent),  # cut by the bottom edge
                _shapes(shape, [(0.95, 0.05)], extent),  # cut by a corner
            ]
            if shape in ("square", "cross", "triangle"):  # a flat side (the triangle's base) on the edge
                images.append(_shapes(shape, [(0.5, 1.0 - half)], extent))
            if shape in ("square", "cross"):
                images.append(_shapes(shape, [(half, 0.5)], extent))
    _assert_low("shape cut by or flush with the frame", images)


def test_shapes_larger_or_smaller_than_the_world_draws_score_nothing():
    images = []
    for shape in SHAPES:
        for px in (2, 3, 4, 5, 6, 17.5, 20, 24, 28):  # world: 9 and 14 px (+-0.5), accepted 6.5-16.5 px
            images.append(_shapes(shape, [(0.5, 0.5)], px / 32))
        images.append(_shapes(shape, [(0.5, 0.5)], 1.0))  # the largest possible shape
    _assert_low("shape of no toy size", images)


def test_stripes_checkerboards_rings_and_gradients_score_nothing():
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    images = []
    for period in (1, 2, 3, 4, 8):
        images.append(_pattern((xx // period) % 2 == 0, "blue"))
        images.append(_pattern((yy // period) % 2 == 0, "green"))
        images.append(_pattern((xx // period + yy // period) % 2 == 0, "red"))
        images.append(_pattern(((xx + yy) // period) % 2 == 0, "pink"))  # diagonal stripes
    radius = ((xx - 15.5) ** 2 + (yy - 15.5) ** 2).sqrt()
    images.append(_pattern((radius > 5) & (radius < 8), "red"))  # ring
    images.append(_pattern((xx < 3) | (xx > 28) | (yy < 3) | (yy > 28), "red"))  # frame border
    images.append(_pattern((xx < 10) | (xx > 21) | (yy < 10) | (yy > 21), "teal"))  # filled with a hole
    red = palette_rgb()[0]
    images.append(compose((xx.float() / (S - 1))[None], red[None])[0])  # horizontal gradient
    _assert_low("stripes, checkerboards, rings, gradients", images)


def test_an_off_palette_object_gets_no_colour_hit():
    """A well-drawn circle in black, white-ish grey or a colour far from every palette entry is read as
    the nearest entry only when it lies within half the closest palette pair's distance of it."""
    off = [(0.0, 0.0, 0.0), (0.45, 0.45, 0.45), (0.1, 0.1, 0.1), (0.05, 0.5, 0.05)]
    alpha = shape_alpha(
        torch.tensor([0]), torch.tensor([0.5]), torch.tensor([0.5]), torch.tensor([0.4]), size=S
    )
    images = torch.stack([compose(alpha, torch.tensor([rgb]))[0] for rgb in off])
    for colour in COLOURS:
        scores = score_images(images, [f"a large {colour} circle in the center"] * len(off))
        assert float(scores["ta_colour"].max()) == 0.0, (colour, scores["ta_colour"])
        assert torch.equal(scores["ta_shape"], torch.ones(len(off)))  # the shape itself is still read
    rel_summary.count("oracle blind spots", "off-palette object (images x colours, no colour hit)", 32)


def test_a_clip_of_flat_frames_scores_nothing():
    frames = torch.stack([torch.full((8, 3, S, S), v) for v in (0.0, 0.5, 1.0)])
    red = palette_rgb()[0][None, :, None, None].expand(8, 3, S, S)
    clips = torch.cat([frames, red[None]])
    scenes = sample_scenes(len(clips), seed=5, split="train", kind="video")
    scores = score_videos(clips, [s.caption for s in scenes])
    for key in ("vq", "mq", "ta"):
        assert float(scores[key].max()) == 0.0, (key, scores[key])
    rel_summary.count("oracle blind spots", "flat clips (vq, mq, ta all 0)", len(clips))


def test_rendered_scenes_still_score_one():
    for split in ("train", "heldout"):
        scenes = sample_scenes(200, seed=7, split=split)
        scores = score_images(render_images(scenes), [s.caption for s in scenes])
        assert float(scores["vq"].min()) >= 0.99 and float(scores["all_correct"].min()) == 1.0
    assert PALETTE  # the palette tolerance is derived from it at import
    rel_summary.record("oracle blind spots", "rendered scenes scoring vq 1 and all_correct 1", "400/400")


def test_an_oversized_frame_is_refused_before_reading_its_pixels():
    huge = torch.zeros(1, 3, 1, 1).expand(1, 3, 8000, 8000)  # a view: no 768 MB allocation
    start = time.perf_counter()
    try:
        score_images(huge, [CAPTIONS[0]])
    except ValueError as err:
        assert "8000x8000" in str(err) and str(MAX_SIZE) in str(err)
    else:
        raise AssertionError("an 8000x8000 frame was scored")
    elapsed = time.perf_counter() - start
    assert elapsed < 0.1, elapsed
    real = torch.zeros(1, 3, 8000, 8000, dtype=torch.uint8)  # a real 192 MB array (a decoded 8000^2 PNG)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="8000x8000"):
        score_images(real, [CAPTIONS[0]])
    elapsed = max(elapsed, time.perf_counter() - start)
    assert elapsed < 0.1, elapsed
    del real
    videos = torch.zeros(1, 1, 3, 1, 1).expand(1, 4, 3, MAX_SIZE + 1, MAX_SIZE + 1)
    try:
        score_videos(videos, ["a large red circle in the center staying still"])
    except ValueError as err:
        assert f"{MAX_SIZE + 1}x{MAX_SIZE + 1}" in str(err)
    else:
        raise AssertionError("an oversized clip was scored")
    rel_summary.record("oracle blind spots", "8000x8000 frame refused in (ms)", f"{elapsed * 1e3:.2f}")
