"""The textured toy world: the same scenes with procedural texture on the shape and the background.

The flat world (:mod:`flowalign.toy.render`) gives a reconstruction model almost nothing to add once
it knows shape, colour and position. Here every scene also carries a :class:`Texture`: one
:class:`Pattern` painted inside the shape (it moves with the shape) and another on the background
(static), so a frame has detail at the scale of a few pixels. The caption stays the flat world's
(texture is never named), so captions, splits and the scene stream are unchanged.

A pattern is a field p(x, y) in [-1, 1] over "pixels at 32" coordinates (x = 32 * fraction of the
width, so a scene looks the same at any size):

    stripes  p = sq(2 pi w / period + phase),               w = x cos(a) + y sin(a)
    checks   p = sq(2 pi w / period + phase) sq(2 pi w' / period),  w' = -x sin(a) + y cos(a)
    noise    p = value noise: uniform [-1, 1] lattice values every period / 2 pixels, interpolated
             bilinearly with smoothstep weights s(f) = f^2 (3 - 2 f)

with sq(t) = tanh(3 sin t) / tanh(3) (a square wave with soft edges: no aliasing at 32 x 32). A field
shades a colour c towards white (p > 0) or black (p < 0) by the fraction ``amplitude * |p|``:

    shade(c, p) = c + amplitude * p * (1 - c)   if p > 0,     c + amplitude * p * c   otherwise,

which stays inside [0, 1]. A frame is then background + alpha * (shape - background), with alpha the
flat world's coverage (:func:`flowalign.toy.render.shape_alpha`), so with amplitude 0 the textured
render equals the flat one.

Item i of the textured stream draws its texture from its own generator seeded by
(seed, i, kind, split, tag), independent of the scene's: ``TexturedToyDataset(...)[i]`` shows the
scene of ``ToyDataset(...)[i]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from flowalign.toy.data import ToyDataset
from flowalign.toy.render import background_rgb, shape_alpha
from flowalign.toy.world import KINDS, PALETTE, SHAPES, SPLITS, Scene

__all__ = [
    "PATTERNS",
    "Pattern",
    "Texture",
    "TexturedToyDataset",
    "pattern_field",
    "render_textured_videos",
    "sample_texture",
    "shade",
]

PATTERNS: tuple[str, ...] = ("stripes", "checks", "noise")
PERIOD_RANGE: tuple[float, float] = (3.5, 7.0)
"""Pattern period in pixels at 32 (2 px is the Nyquist limit)."""
SHAPE_AMPLITUDE = 0.55
BACKGROUND_AMPLITUDE = 0.35
_TEXTURE_TAG = 7  # separates the texture generator from the scene generator of the same item
_SHARPNESS = 3.0
_NOISE_SPAN = 64.0  # value-noise lattice covers [-32, 32] pixels at 32: local and canvas coordinates


@dataclass(frozen=True)
class Pattern:
    """One procedural field (see the module doc).

    Attributes:
        kind: one of ``PATTERNS``.
        period: pixels at 32 between repeats (twice the lattice spacing for noise).
        angle: orientation in radians (stripes and checks).
        phase: offset in radians (stripes and checks).
        seed: seed of the noise lattice.
        amplitude: shading strength in [0, 1].
    """

    kind: str
    period: float
    angle: float = 0.0
    phase: float = 0.0
    seed: int = 0
    amplitude: float = SHAPE_AMPLITUDE

    def __post_init__(self) -> None:
        if self.kind not in PATTERNS:
            raise ValueError(f"toy texture pattern {self.kind!r} is not one of {list(PATTERNS)}")
        if not self.period > 0:
            raise ValueError(f"toy texture period must be > 0 pixels, got {self.period}")
        if not 0.0 <= self.amplitude <= 1.0:
            raise ValueError(f"toy texture amplitude must be in [0, 1], got {self.amplitude}")


@dataclass(frozen=True)
class Texture:
    """A scene's texture: ``shape`` moves with the shape, ``background`` stays put."""

    shape: Pattern
    background: Pattern


def _soft_square(t: Tensor) -> Tensor:
    return torch.tanh(_SHARPNESS * torch.sin(t)) / math.tanh(_SHARPNESS)


def _value_noise(pattern: Pattern, x: Tensor, y: Tensor) -> Tensor:
    spacing = pattern.period / 2
    cells = math.ceil(_NOISE_SPAN / spacing) + 2
    grid = np.random.default_rng(pattern.seed).uniform(-1.0, 1.0, size=(cells, cells))
    lattice = torch.as_tensor(grid, dtype=torch.float32, device=x.device)
    qx = ((x + _NOISE_SPAN / 2) / spacing).clamp(0, cells - 1.001)
    qy = ((y + _NOISE_SPAN / 2) / spacing).clamp(0, cells - 1.001)
    ix, iy = qx.floor().long(), qy.floor().long()
    fx, fy = qx - ix, qy - iy
    sx, sy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    top = lattice[iy, ix] + sx * (lattice[iy, ix + 1] - lattice[iy, ix])
    bottom = lattice[iy + 1, ix] + sx * (lattice[iy + 1, ix + 1] - lattice[iy + 1, ix])
    return top + sy * (bottom - top)


def pattern_field(pattern: Pattern, x: Tensor, y: Tensor) -> Tensor:
    """The field p(x, y) in [-1, 1] at coordinates x, y (pixels at 32, broadcast together)."""
    x, y = torch.broadcast_tensors(x.float(), y.float())
    if pattern.kind == "noise":
        return _value_noise(pattern, x, y)
    cos, sin = math.cos(pattern.angle), math.sin(pattern.angle)
    along = x * cos + y * sin
    field = _soft_square(2 * math.pi * along / pattern.period + pattern.phase)
    if pattern.kind == "checks":
        across = -x * sin + y * cos
        field = field * _soft_square(2 * math.pi * across / pattern.period)
    return field


def shade(colour: Tensor, field: Tensor, amplitude: float) -> Tensor:
    """Shade ``colour`` [3, 1, 1] (or broadcastable) by ``field`` [..., H, W] (module doc equation)."""
    field = amplitude * field.unsqueeze(-3)
    return torch.where(field > 0, colour + field * (1 - colour), colour + field * colour)


def sample_texture(index: int, *, seed: int, split: str, kind: str = "video") -> Texture:
    """The texture of item ``index`` of the (seed, split, kind) stream; pure and deterministic."""
    if split not in SPLITS or kind not in KINDS:
        raise ValueError(f"toy texture needs split in {list(SPLITS)} and kind in {list(KINDS)}")
    rng = np.random.default_rng([seed, index, KINDS.index(kind), SPLITS.index(split), _TEXTURE_TAG])

    def draw(amplitude: float) -> Pattern:
        return Pattern(
            kind=PATTERNS[int(rng.integers(len(PATTERNS)))],
            period=float(rng.uniform(*PERIOD_RANGE)),
            angle=float(rng.uniform(0.0, math.pi)),
            phase=float(rng.uniform(0.0, 2 * math.pi)),
            seed=int(rng.integers(2**31)),
            amplitude=amplitude,
        )

    return Texture(shape=draw(SHAPE_AMPLITUDE), background=draw(BACKGROUND_AMPLITUDE))


def render_textured_videos(
    scenes: Sequence[Scene],
    textures: Sequence[Texture],
    *,
    num_frames: int = 8,
    size: int = 32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Render textured clips (motion as :func:`flowalign.toy.render.render_videos`).

    Returns:
        float32 [B, T, 3, size, size] in [0, 1].
    """
    if not scenes or len(scenes) != len(textures):
        raise ValueError(f"render_textured_videos needs one texture per scene, got {len(scenes)} scenes "
                         f"and {len(textures)} textures")  # fmt: skip
    if num_frames < 1:
        raise ValueError(f"render_textured_videos needs num_frames >= 1, got {num_frames}")
    t = num_frames
    pix = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) * (32.0 / size)  # pixels at 32
    bg = background_rgb(device=device)[:, None, None]
    clips = []
    for scene, texture in zip(scenes, textures, strict=True):
        centres = torch.tensor([scene.centre_at(f, t) for f in range(t)], device=device) * 32.0  # [T, 2]
        alpha = shape_alpha(
            torch.full((t,), SHAPES.index(scene.attributes.shape), device=device),
            centres[:, 0] / 32.0,
            centres[:, 1] / 32.0,
            torch.full((t,), scene.extent, device=device),
            size=size,
        )  # [T, S, S]
        back = shade(
            bg, pattern_field(texture.background, pix[None, :], pix[:, None]), texture.background.amplitude
        )
        u = pix[None, None, :] - centres[:, 0, None, None]  # [T, 1, S]: the shape's own frame
        v = pix[None, :, None] - centres[:, 1, None, None]  # [T, S, 1]
        colour = torch.tensor(PALETTE[scene.attributes.colour], device=device, dtype=torch.float32) / 255.0
        front = shade(
            colour[:, None, None], pattern_field(texture.shape, u, v), texture.shape.amplitude
        )  # [T, 3, S, S]
        clips.append(back + alpha[:, None] * (front - back))
    return torch.stack(clips)


class TexturedToyDataset(ToyDataset):
    """:class:`~flowalign.toy.data.ToyDataset` with item i's scene textured by :func:`sample_texture`.

    Same arguments and captions as the flat dataset; items are rendered on the fly.
    """

    def texture(self, index: int) -> Texture:
        """The texture of item ``index``."""
        if not 0 <= index < self.num:
            raise IndexError(f"TexturedToyDataset index {index} out of range [0, {self.num})")
        return sample_texture(index, seed=self.seed, split=self.split, kind=self.kind)

    def __getitem__(self, index: int) -> dict[str, Tensor | str]:
        """{"pixels": float32 [3, H, W] (images) or [T, 3, H, W] (clips) in [0, 1], "prompt": str}."""
        scene = self.scene(index)
        frames = 1 if self.kind == "image" else self.num_frames
        pixels = render_textured_videos([scene], [self.texture(index)], num_frames=frames, size=self.size)[0]
        return {"pixels": pixels[0] if self.kind == "image" else pixels, "prompt": scene.caption}
