"""Rasterise toy scenes: flat shapes with a one-pixel anti-aliased edge on a fixed background.

Coverage is the distance approximation alpha = clamp(1/2 - sd, 0, 1), with sd the signed distance (in
pixels, negative inside) from the pixel centre to the shape boundary, measured in units of the pixel's
footprint across the edge (see ``_shape_sdf``). It gives crisp,
one-pixel-wide edges and sub-pixel motion, and it is cheap enough that the oracles reuse the same function
(:func:`shape_alpha`) to fit templates, which is what makes them exact on ground-truth renders.

Every pixel is an exact mixture background + alpha * (colour - background).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from flowalign.toy.world import (
    ANCHORS,
    BACKGROUND_RGB,
    EXTENT,
    EXTENT_JITTER,
    PALETTE,
    POSITION_JITTER,
    SHAPES,
    Scene,
    parse_caption,
)


def background_rgb(*, device: torch.device | str | None = None) -> Tensor:
    """The fixed background colour, float32 [3] in [0, 1]."""
    return torch.tensor(BACKGROUND_RGB, dtype=torch.float32, device=device) / 255.0


def palette_rgb(*, device: torch.device | str | None = None) -> Tensor:
    """The palette as float32 [K, 3] in [0, 1], rows in the order of ``COLOURS``."""
    return torch.tensor(list(PALETTE.values()), dtype=torch.float32, device=device) / 255.0


def _shape_sdf(shape: str, u: Tensor, v: Tensor, h: Tensor) -> Tensor:
    """Footprint distance (pixels, < 0 inside) for local coordinates u, v and half-extent h (broadcast).

    The signed distance to each edge is divided by |n_x| + |n_y| (n the edge's unit normal): the width of
    a pixel's footprint across that edge. Then clamp(1/2 - distance, 0, 1) ramps over exactly the band
    where the pixel straddles the edge, so coverage sums to the true area for any sub-pixel offset
    (a plain Euclidean distance makes 45-degree edges, e.g. a diamond's, pulse by ~7% in area as it moves).
    """
    au, av = u.abs(), v.abs()
    if shape == "circle":  # normal (u, v) / |(u, v)|
        radius = torch.sqrt(u * u + v * v)
        return (radius - h) * radius / (au + av).clamp_min(1e-6)
    if shape == "square":
        return torch.maximum(au, av) - h
    if shape == "diamond":  # normals (+-1, +-1) / sqrt(2): footprint sqrt(2)
        return (au + av - h) / 2.0
    if shape == "triangle":  # apex (0, -h) at the top, base y = +h; slanted normals (+-2, -1) / sqrt(5)
        return torch.maximum(v - h, (2.0 * au - v - h) / 3.0)
    if shape == "cross":  # plus sign, arm thickness = extent / 3
        arm = h / 3.0
        vertical = torch.maximum(au - arm, av - h)
        horizontal = torch.maximum(au - h, av - arm)
        return torch.minimum(vertical, horizontal)
    raise ValueError(f"unknown toy shape {shape!r}; expected one of {list(SHAPES)}")


def shape_alpha(shape_ids: Tensor, cx: Tensor, cy: Tensor, extent: Tensor, *, size: int) -> Tensor:
    """Anti-aliased coverage of N shapes, each on its own size x size canvas.

    alpha(pixel) = clamp(1/2 - sd(pixel centre), 0, 1), sd the footprint distance of ``_shape_sdf``.

    Args:
        shape_ids: [N] long, index into ``SHAPES``.
        cx, cy: [N] bounding-box centre, fractions of the width (y down).
        extent: [N] side of the bounding box, fraction of the width.
        size: canvas side in pixels.

    Returns:
        float32 [N, size, size] in [0, 1].
    """
    device = cx.device
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5)[None]  # [1, S] pixel centres
    u = (coords - cx.float()[:, None] * size)[:, None, :]  # [N, 1, S]
    v = (coords - cy.float()[:, None] * size)[:, :, None]  # [N, S, 1]
    h = (extent.float() * size / 2.0)[:, None, None]  # [N, 1, 1]
    alpha = torch.zeros(cx.shape[0], size, size, device=device)
    for k, shape in enumerate(SHAPES):
        rows = (shape_ids == k).nonzero(as_tuple=True)[0]
        if rows.numel():
            sd = _shape_sdf(shape, u[rows], v[rows], h[rows])
            alpha[rows] = (0.5 - sd).clamp(0.0, 1.0)
    return alpha


def compose(alpha: Tensor, rgb: Tensor) -> Tensor:
    """Paint colour ``rgb`` [N, 3] with coverage ``alpha`` [N, H, W] over the background -> [N, 3, H, W]."""
    bg = background_rgb(device=alpha.device)[None, :, None, None]  # [1, 3, 1, 1]
    return bg + alpha[:, None] * (rgb[:, :, None, None] - bg)


def _scene_tensors(scenes: Sequence[Scene], device: torch.device | str | None) -> tuple[Tensor, Tensor]:
    shape_ids = torch.tensor([SHAPES.index(s.attributes.shape) for s in scenes], device=device)
    rgb = torch.tensor([PALETTE[s.attributes.colour] for s in scenes], dtype=torch.float32, device=device)
    return shape_ids, rgb / 255.0


def render_images(
    scenes: Sequence[Scene], *, size: int = 32, device: torch.device | str | None = None
) -> Tensor:
    """Render scenes as still images (a video scene is drawn at its mean centre).

    Args:
        scenes: B scenes.
        size: image side in pixels (32 is the calibrated default; the oracle needs >= 24).
        device: where to build the tensor.

    Returns:
        float32 [B, 3, size, size] in [0, 1].
    """
    if not scenes:
        raise ValueError("render_images needs at least one scene, got an empty list")
    shape_ids, rgb = _scene_tensors(scenes, device)
    cx = torch.tensor([s.cx for s in scenes], device=device)
    cy = torch.tensor([s.cy for s in scenes], device=device)
    extent = torch.tensor([s.extent for s in scenes], device=device)
    return compose(shape_alpha(shape_ids, cx, cy, extent, size=size), rgb)


def render_image(scene: Scene, *, size: int = 32, device: torch.device | str | None = None) -> Tensor:
    """Render one scene: float32 [3, size, size] in [0, 1] (see :func:`render_images`)."""
    return render_images([scene], size=size, device=device)[0]


def render_videos(
    scenes: Sequence[Scene],
    *,
    num_frames: int = 8,
    size: int = 32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Render scenes as clips with constant-velocity motion (see ``Scene.centre_at``).

    Args:
        scenes: B scenes (an image scene gives a still clip).
        num_frames: T, frames per clip.
        size: frame side in pixels.
        device: where to build the tensor.

    Returns:
        float32 [B, T, 3, size, size] in [0, 1].
    """
    if not scenes:
        raise ValueError("render_videos needs at least one scene, got an empty list")
    if num_frames < 1:
        raise ValueError(f"render_videos needs num_frames >= 1, got {num_frames}")
    b, t = len(scenes), num_frames
    shape_ids, rgb = _scene_tensors(scenes, device)
    centres = torch.tensor(
        [[s.centre_at(f, t) for f in range(t)] for s in scenes], dtype=torch.float32, device=device
    )  # [B, T, 2]
    extent = torch.tensor([s.extent for s in scenes], device=device)
    alpha = shape_alpha(
        shape_ids.repeat_interleave(t),
        centres[..., 0].reshape(b * t),
        centres[..., 1].reshape(b * t),
        extent.repeat_interleave(t),
        size=size,
    )  # [B*T, S, S]
    frames = compose(alpha, rgb.repeat_interleave(t, dim=0))  # [B*T, 3, S, S]
    return frames.reshape(b, t, 3, size, size)


def render_video(
    scene: Scene, *, num_frames: int = 8, size: int = 32, device: torch.device | str | None = None
) -> Tensor:
    """Render one clip: float32 [T, 3, size, size] in [0, 1] (see :func:`render_videos`)."""
    return render_videos([scene], num_frames=num_frames, size=size, device=device)[0]


def render_prompts(prompts: Sequence[str], *, seed: int = 0, size: int = 32) -> Tensor:
    """Ground-truth renders [N, 3, size, size] of image captions with the world's own jitter (the data row)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    scenes = []
    for p in prompts:
        a = parse_caption(p)
        u = rng.uniform(-1.0, 1.0, size=3)
        ax, ay = ANCHORS[a.position]
        scenes.append(
            Scene(
                a,
                EXTENT[a.size] + EXTENT_JITTER * u[0],
                ax + POSITION_JITTER * u[1],
                ay + POSITION_JITTER * u[2],
            )
        )
    return render_images(scenes, size=size)
