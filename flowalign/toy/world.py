"""The toy world's vocabulary, scenes, captions, train/held-out split and scene sampling.

One flat coloured shape on a fixed light background, described by four discrete attributes (shape,
colour, size, position) and, for videos, a fifth (motion). A :class:`Scene` is those attributes plus
small continuous jitter (exact extent, centre, travel) that the caption does not state.

Geometry is stored as fractions of the image width so a scene renders at any resolution; the numbers
were chosen at 32x32 (the default) and are quoted in pixels at 32 in the comments. Every object stays
fully inside the frame for every frame of a video, which keeps the pixel oracles exact.

Design choice: ONE object per image. Two objects plus a relation would add headroom, but the feasibility
run (docs/toy-world.md) showed a 2.3M-parameter model needs ~13 minutes on 2 CPU cores to
get one object's shape right; a second object would not be learnt in the ~6-minute budget. Headroom comes
instead from 5 shapes (including diamond and cross), 8 colours with close pairs (orange/yellow,
green/teal, blue/purple, red/orange), 2 sizes and 5 positions (4 corners + center).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from functools import cache

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
# RGB in [0, 255]. Close pairs on purpose (distances in [0, 255] units): orange-yellow 67,
# green-teal 85, blue-purple 95, red-orange 100, purple-pink 113.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 45),
    "orange": (240, 140, 30),
    "yellow": (230, 205, 40),
    "green": (60, 165, 70),
    "teal": (35, 150, 150),
    "blue": (45, 80, 215),
    "purple": (135, 60, 190),
    "pink": (235, 110, 180),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
BACKGROUND_RGB: tuple[int, int, int] = (236, 236, 232)
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("center", "top left", "top right", "bottom left", "bottom right")
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still")
KINDS: tuple[str, ...] = ("image", "video")
SPLITS: tuple[str, ...] = ("train", "heldout")

# Geometry as fractions of the image width (pixels at 32x32 in brackets).
EXTENT: dict[str, float] = {"small": 9 / 32, "large": 14 / 32}  # side of the shape's bounding box
EXTENT_JITTER = 0.5 / 32  # uniform +-
SIZE_THRESHOLD = (EXTENT["small"] + EXTENT["large"]) / 2  # [11.5 px]: the oracle's decision boundary
ANCHORS: dict[str, tuple[float, float]] = {  # (x, y) of the bounding-box centre, y pointing down
    "center": (16 / 32, 16 / 32),
    "top left": (11 / 32, 11 / 32),
    "top right": (21 / 32, 11 / 32),
    "bottom left": (11 / 32, 21 / 32),
    "bottom right": (21 / 32, 21 / 32),
}
POSITION_JITTER = 0.75 / 32  # uniform +- per axis
TRAVEL = 5 / 32  # total displacement over a clip, first to last frame
TRAVEL_JITTER = 0.5 / 32  # uniform +-
MOTION_DIRECTION: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "still": (0.0, 0.0),
}
# Worst case for the frame border: anchor 11 - jitter 0.75 - half travel 2.75 - half extent 7.25 = 0.25 px.

HELDOUT_FRACTION = 0.2
_SPLIT_SEED = 20240531  # fixed forever: changing it changes which combinations are held out


@dataclass(frozen=True)
class Attributes:
    """The discrete content of a scene: exactly what its caption states.

    Attributes:
        shape: one of ``SHAPES``.
        colour: one of ``COLOURS``.
        size: one of ``SIZES``.
        position: one of ``POSITIONS``.
        motion: one of ``MOTIONS`` for a video scene, ``None`` for an image scene.
    """

    shape: str
    colour: str
    size: str
    position: str
    motion: str | None = None

    def __post_init__(self) -> None:
        for key, value, vocab in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, COLOURS),
            ("size", self.size, SIZES),
            ("position", self.position, POSITIONS),
        ):
            if value not in vocab:
                raise ValueError(f"toy attribute {key}={value!r} is not one of {list(vocab)}")
        if self.motion is not None and self.motion not in MOTIONS:
            raise ValueError(f"toy attribute motion={self.motion!r} is not one of {list(MOTIONS)} or None")

    @property
    def kind(self) -> str:
        """``"video"`` if the attributes include a motion, else ``"image"``."""
        return "image" if self.motion is None else "video"

    def caption(self) -> str:
        """The canonical caption, e.g. "a small red circle in the top left moving right"."""
        where = "in the center" if self.position == "center" else f"in the {self.position}"
        text = f"a {self.size} {self.colour} {self.shape} {where}"
        if self.motion is None:
            return text
        return f"{text} staying still" if self.motion == "still" else f"{text} moving {self.motion}"

    def as_dict(self) -> dict[str, str | None]:
        """Plain dict of the attributes (``motion`` is ``None`` for images)."""
        return asdict(self)


@dataclass(frozen=True)
class Scene:
    """A renderable scene: attributes plus the continuous jitter the caption does not state.

    Attributes:
        attributes: the discrete content.
        extent: side of the shape's bounding box, fraction of the image width.
        cx, cy: centre of the bounding box (mean over the clip for videos), fractions of the width,
            y pointing down.
        travel: displacement from first to last frame along the motion direction, fraction of the
            width; 0 for images and for "still" videos.
    """

    attributes: Attributes
    extent: float
    cx: float
    cy: float
    travel: float = 0.0

    @property
    def caption(self) -> str:
        """The canonical caption of the scene's attributes."""
        return self.attributes.caption()

    def centre_at(self, frame: int, num_frames: int) -> tuple[float, float]:
        """Bounding-box centre at ``frame`` of a ``num_frames`` clip (constant velocity).

        centre(f) = (cx, cy) + direction * travel * (f / (T - 1) - 1/2), so the clip's mean centre is
        (cx, cy). For an image (motion None) or T = 1 the centre is (cx, cy).
        """
        motion = self.attributes.motion
        if motion is None or num_frames <= 1:
            return self.cx, self.cy
        dx, dy = MOTION_DIRECTION[motion]
        phase = frame / (num_frames - 1) - 0.5
        return self.cx + dx * self.travel * phase, self.cy + dy * self.travel * phase


_CAPTION_ERROR = (
    "expected 'a <size> <colour> <shape> in the <position>' (+ ' moving <dir>' or ' staying still' "
    "for videos) with size in {sizes}, colour in {colours}, shape in {shapes}, position in {positions}, "
    "dir in {motions}"
)


def parse_caption(caption: str) -> Attributes:
    """Parse a toy caption back into its :class:`Attributes` (exact inverse of ``Attributes.caption``).

    Args:
        caption: a canonical caption such as "a large blue square in the center" or
            "a small red circle in the top left moving right".

    Returns:
        The attributes; ``motion`` is ``None`` for an image caption.

    Raises:
        ValueError: naming the caption, if it is not exactly a canonical caption of the toy grammar.
    """
    if not isinstance(caption, str):
        raise ValueError(f"toy caption must be a str, got {type(caption).__name__}: {caption!r}")
    attrs = _caption_table().get(caption)
    if attrs is None:
        hint = _CAPTION_ERROR.format(
            sizes=list(SIZES), colours=list(COLOURS), shapes=list(SHAPES), positions=list(POSITIONS),
            motions=[m for m in MOTIONS if m != "still"],
        )  # fmt: skip
        raise ValueError(f"not a toy caption: {caption!r}; {hint}")
    return attrs


def all_attributes(kind: str) -> list[Attributes]:
    """Every attribute combination of ``kind`` in a fixed order (shape, colour, size, position, motion)."""
    _check_kind(kind)
    motions: tuple[str | None, ...] = (None,) if kind == "image" else MOTIONS
    return [
        Attributes(shape, colour, size, position, motion)
        for shape, colour, size, position, motion in itertools.product(
            SHAPES, COLOURS, SIZES, POSITIONS, motions
        )
    ]


def split_attributes(split: str, kind: str) -> list[Attributes]:
    """The attribute combinations of one split, in the fixed order of :func:`all_attributes`.

    About ``HELDOUT_FRACTION`` of the combinations are held out, chosen by a fixed permutation such
    that every pair of attribute values (e.g. red+circle, small+top left, cross+moving up) still occurs
    in some training combination: held-out prompts test composition, never an unseen word pairing.
    """
    _check_split(split)
    heldout = _heldout_set(kind)
    return [a for a in all_attributes(kind) if (a in heldout) == (split == "heldout")]


def split_of(attributes: Attributes) -> str:
    """``"train"`` or ``"heldout"``: the split an attribute combination belongs to."""
    return "heldout" if attributes in _heldout_set(attributes.kind) else "train"


def toy_prompts(split: str, kind: str = "image") -> list[str]:
    """All captions of a split, in a deterministic order (that of :func:`all_attributes`).

    Args:
        split: "train" or "heldout".
        kind: "image" or "video".

    Returns:
        The captions; train and held-out lists are disjoint.
    """
    return [a.caption() for a in split_attributes(split, kind)]


def sample_scene(index: int, *, seed: int, split: str, kind: str = "image") -> Scene:
    """Scene number ``index`` of the stream defined by (seed, split, kind); pure and deterministic.

    The combination is drawn uniformly from the split's combinations, then extent, centre and travel
    get uniform jitter. Scene i depends only on (seed, split, kind, i), never on how many are drawn.
    """
    _check_split(split)
    _check_kind(kind)
    if index < 0:
        raise ValueError(f"toy scene index must be >= 0, got {index}")
    rng = np.random.default_rng([seed, index, KINDS.index(kind), SPLITS.index(split)])
    combos = _split_tuple(split, kind)
    return jittered_scene(combos[int(rng.integers(len(combos)))], rng)


def jittered_scene(attrs: Attributes, rng: np.random.Generator) -> Scene:
    """A scene of ``attrs`` with uniform jitter of extent, centre and (moving clips) travel, drawn from ``rng``."""
    u = rng.uniform(-1.0, 1.0, size=4)
    ax, ay = ANCHORS[attrs.position]
    travel = 0.0 if attrs.motion in (None, "still") else TRAVEL + TRAVEL_JITTER * float(u[3])
    return Scene(
        attributes=attrs,
        extent=EXTENT[attrs.size] + EXTENT_JITTER * float(u[0]),
        cx=ax + POSITION_JITTER * float(u[1]),
        cy=ay + POSITION_JITTER * float(u[2]),
        travel=travel,
    )


def sample_scenes(num: int, *, seed: int, split: str, kind: str = "image") -> list[Scene]:
    """Scenes 0..num-1 of the (seed, split, kind) stream (see :func:`sample_scene`)."""
    return [sample_scene(i, seed=seed, split=split, kind=kind) for i in range(num)]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"toy kind must be one of {list(KINDS)}, got {kind!r}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"toy split must be one of {list(SPLITS)}, got {split!r}")


@cache
def _caption_table() -> dict[str, Attributes]:
    return {a.caption(): a for kind in KINDS for a in all_attributes(kind)}


@cache
def _split_tuple(split: str, kind: str) -> tuple[Attributes, ...]:
    return tuple(split_attributes(split, kind))


@cache
def _heldout_set(kind: str) -> frozenset[Attributes]:
    """Greedy pick along a fixed permutation, keeping every attribute-value pair in training."""
    combos = all_attributes(kind)
    keys = ("shape", "colour", "size", "position") + (("motion",) if kind == "video" else ())
    pairs = list(itertools.combinations(keys, 2))
    train_count: dict[tuple, int] = {}
    for a in combos:
        for k1, k2 in pairs:
            key = (k1, getattr(a, k1), k2, getattr(a, k2))
            train_count[key] = train_count.get(key, 0) + 1
    target = round(HELDOUT_FRACTION * len(combos))
    order = np.random.default_rng(_SPLIT_SEED + KINDS.index(kind)).permutation(len(combos))
    heldout: set[Attributes] = set()
    for i in order:
        if len(heldout) == target:
            break
        a = combos[int(i)]
        a_pairs = [(k1, getattr(a, k1), k2, getattr(a, k2)) for k1, k2 in pairs]
        if all(train_count[p] > 1 for p in a_pairs):
            heldout.add(a)
            for p in a_pairs:
                train_count[p] -= 1
    return frozenset(heldout)
