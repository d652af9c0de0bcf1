"""Toy preference pairs for training a multi-dimensional reward model, labelled by the exact oracles.

A pair is two renders of one caption ("a small red circle in the top left moving right"), each made
from its own scene jitter and its own random *defects*, drawn independently per member:

- **text alignment** (``ta``): with probability ``p_wrong``, one attribute (shape, colour, size,
  position, and for clips the motion direction) is rendered with another value than the caption says;
- **visual quality** (``vq``): with probability ``p_visual``, one of
  blur (Gaussian, sigma 0.4-1.2 px), noise (Gaussian, std 0.005-0.06), smear (a mix, weight 0.3-1, with
  a 5-px box blur along x or y) or ghost (a faint second copy of the object, opacity 0.15-0.5, 6-10 px
  away);
- **motion quality** (``mq``, clips only): with probability ``p_motion``, one of
  jump (from a random frame on, the object is displaced by 1.5-4 px), vanish (1-2 frames without the
  object) or jitter (per-frame Gaussian displacement, std 0.3-1 px).

(Pixel numbers are at 32x32 and scale with ``size``.)
Each member is stored as uint8 (as a PNG would hold it) and scored by :mod:`flowalign.toy.oracles`
from those pixels; per dimension the label is A better / B better / tie, a tie when the oracle scores
differ by at most :data:`TIE_MARGIN` (ta moves in steps of 1/4 or 1/5, so equal ta is a tie).
Held-out pairs use the toy world's held-out attribute combinations (``split="heldout"``): captions
never seen in training. Training pairs show training combinations only, their wrong-attribute members
included: a held-out combination seen in training only as the worse member would be learnt as "worse"
whatever the caption (measured: held-out accuracy on wrong-position pairs fell to 0.21 that way).
Pair i depends only on (seed, split, kind, i).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from flowalign.toy.render import compose, palette_rgb, shape_alpha
from flowalign.toy.world import (
    COLOURS,
    KINDS,
    MOTIONS,
    POSITIONS,
    SHAPES,
    SIZES,
    SPLITS,
    Attributes,
    Scene,
    jittered_scene,
    split_attributes,
)

__all__ = ["TIE_MARGIN", "Defects", "ToyRewardPairs", "build_toy_reward_pairs", "toy_dimensions"]

TIE_MARGIN: dict[str, float] = {"vq": 0.05, "mq": 0.05, "ta": 0.1}
"""Oracle score differences up to this are ties, per dimension."""
VISUAL_DEFECTS: tuple[str, ...] = ("blur", "noise", "smear", "ghost")
MOTION_DEFECTS: tuple[str, ...] = ("jump", "vanish", "jitter")
_CHUNK = 512  # pairs rendered and scored at once


def toy_dimensions(kind: str) -> list[str]:
    """Reward dimensions of toy pairs: [vq, ta] for images, [vq, mq, ta] for clips."""
    if kind not in KINDS:
        raise ValueError(f"toy kind must be one of {list(KINDS)}, got {kind!r}")
    return ["vq", "ta"] if kind == "image" else ["vq", "mq", "ta"]


@dataclass(frozen=True)
class Defects:
    """What was done to one member of a pair (for inspection and tests).

    Attributes:
        shown: the attribute combination rendered.
        wrong: the attribute rendered differently from the caption, or None.
        visual: (kind, strength) of the visual defect, or None.
        motion: (kind, strength) of the motion defect, or None (always None for images).
    """

    shown: Attributes
    wrong: str | None = None
    visual: tuple[str, float] | None = None
    motion: tuple[str, float] | None = None


def _wrong_attribute(
    attrs: Attributes,
    rng: np.random.Generator,
    allowed: frozenset[Attributes] | None,
    motion_share: float | None = None,
) -> tuple[Attributes, str]:
    """``attrs`` with one attribute changed: the attribute uniformly among those with a possible new value
    (the motion with probability ``motion_share`` if given), then the value uniformly; with ``allowed``,
    only changes that give an allowed combination count."""
    vocab = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS}
    if attrs.motion is not None:
        vocab["motion"] = MOTIONS
    options: dict[str, list[Attributes]] = {}
    for name, values in vocab.items():
        changed = [replace(attrs, **{name: v}) for v in values if v != getattr(attrs, name)]
        options[name] = [c for c in changed if allowed is None or c in allowed]
    names = [name for name, changes in options.items() if changes]
    if motion_share is not None and "motion" in names and len(names) > 1:
        static = [n for n in names if n != "motion"]
        name = "motion" if rng.random() < motion_share else static[int(rng.integers(len(static)))]
    else:
        name = names[int(rng.integers(len(names)))]
    return options[name][int(rng.integers(len(options[name])))], name


def _draw_defects(kind: str, rng: np.random.Generator, p_wrong: float, p_visual: float, p_motion: float):
    wrong = rng.random() < p_wrong
    visual = None
    if rng.random() < p_visual:
        name = VISUAL_DEFECTS[int(rng.integers(len(VISUAL_DEFECTS)))]
        lo, hi = {"blur": (0.4, 1.2), "noise": (0.005, 0.06), "smear": (0.3, 1.0), "ghost": (0.15, 0.5)}[name]
        visual = (name, float(rng.uniform(lo, hi)))
    motion = None
    if kind == "video" and rng.random() < p_motion:
        name = MOTION_DEFECTS[int(rng.integers(len(MOTION_DEFECTS)))]
        lo, hi = {"jump": (1.5, 4.0), "vanish": (1, 2.99), "jitter": (0.3, 1.0)}[name]
        motion = (name, float(rng.uniform(lo, hi)))
    return wrong, visual, motion


def _gaussian_kernel(sigma: float) -> Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _blur_1d(frames: Tensor, kernel: Tensor, axis: str) -> Tensor:
    """Separable blur of [N, 3, S, S] along one axis with replicate padding."""
    r = kernel.numel() // 2
    weight = kernel.view(1, 1, 1, -1).repeat(3, 1, 1, 1)  # depthwise [3, 1, 1, K]
    if axis == "y":
        weight = weight.transpose(2, 3)
    pad = (r, r, 0, 0) if axis == "x" else (0, 0, r, r)
    return F.conv2d(F.pad(frames, pad, mode="replicate"), weight, groups=3)


def _render_member(
    scene: Scene,
    defects: tuple[bool, tuple | None, tuple | None],
    rng: np.random.Generator,
    *,
    kind: str,
    size: int,
    num_frames: int,
    allowed: frozenset[Attributes] | None,
    motion_share: float | None,
) -> tuple[Tensor, Defects]:
    """Render one member with its defects: float [3, S, S] or [T, 3, S, S] in [0, 1]."""
    wrong, visual, motion = defects
    wrong_name = None
    if wrong:
        attrs, wrong_name = _wrong_attribute(scene.attributes, rng, allowed, motion_share)
        scene = jittered_scene(attrs, rng)
    t = 1 if kind == "image" else num_frames
    centres = torch.tensor([scene.centre_at(f, t) for f in range(t)], dtype=torch.float64)  # [T, 2]
    visible = torch.ones(t)
    if motion is not None:
        name, strength = motion
        px = 1.0 / 32  # the world's geometry is in fractions of the width, numbers in pixels at 32
        if name == "jump":
            start = int(rng.integers(1, t))
            angle = rng.uniform(0, 2 * math.pi)
            centres[start:] += torch.tensor([math.cos(angle), math.sin(angle)]) * strength * px
        elif name == "vanish":
            gone = rng.choice(t, size=int(strength), replace=False)
            visible[torch.as_tensor(gone)] = 0.0
        else:
            centres += torch.as_tensor(rng.normal(0.0, strength * px, size=(t, 2)))
        lo, hi = scene.extent / 2 + 0.5 / size, 1 - scene.extent / 2 - 0.5 / size
        centres = centres.clamp(lo, hi)  # stay inside the frame (the oracles assume it)
    shape_id = torch.full((t,), SHAPES.index(scene.attributes.shape))
    rgb = palette_rgb()[COLOURS.index(scene.attributes.colour)]
    extent = torch.full((t,), scene.extent)
    alpha = shape_alpha(shape_id, centres[:, 0].float(), centres[:, 1].float(), extent, size=size)
    alpha = alpha * visible[:, None, None]  # [T, S, S]
    if visual is not None and visual[0] == "ghost":
        angle = rng.uniform(0, 2 * math.pi)
        dist = rng.uniform(6, 10) / 32
        gx = (centres[:, 0] + math.cos(angle) * dist).clamp(scene.extent / 2, 1 - scene.extent / 2)
        gy = (centres[:, 1] + math.sin(angle) * dist).clamp(scene.extent / 2, 1 - scene.extent / 2)
        ghost = shape_alpha(shape_id, gx.float(), gy.float(), extent, size=size) * visible[:, None, None]
        alpha = torch.maximum(alpha, visual[1] * ghost)
    frames = compose(alpha, rgb.expand(t, 3))  # [T, 3, S, S]
    if visual is not None:
        name, strength = visual
        if name == "blur":
            kernel = _gaussian_kernel(strength * size / 32)
            frames = _blur_1d(_blur_1d(frames, kernel, "x"), kernel, "y")
        elif name == "smear":  # mix with a box blur of ~5 px along x or y
            length = 2 * round(2.5 * size / 32) + 1
            box = torch.full((length,), 1.0 / length)
            frames = (1 - strength) * frames + strength * _blur_1d(frames, box, "xy"[int(rng.integers(2))])
        elif name == "noise":
            frames = frames + torch.as_tensor(
                rng.normal(0.0, strength, size=frames.shape), dtype=torch.float32
            )
    frames = frames.clamp(0.0, 1.0)
    out = frames[0] if kind == "image" else frames
    return out, Defects(shown=scene.attributes, wrong=wrong_name, visual=visual, motion=motion)


class ToyRewardPairs(Dataset):
    """Oracle-labelled toy pairs held in memory as uint8 (see the module doc).

    Item i: ``{"prompt": str, "media_w": float [3, S, S] or [T, 3, S, S] (member A), "media_l": (member B),
    "labels": {dim: 1 A better | -1 B better | 0 tie}}``, the same layout as
    :class:`flowalign.training.methods.latent_reward.PreferenceItems`.

    Attributes:
        kind: "image" or "video".
        split: "train" or "heldout".
        dimensions: label dimensions.
        prompts: the N captions.
        media_a, media_b: uint8 [N, 3, S, S] or [N, T, 3, S, S].
        scores_a, scores_b: {dim: float32 [N]} oracle scores of the stored (uint8) members.
        labels: {dim: long [N]}.
        defects: N (Defects of A, Defects of B).
    """

    def __init__(
        self,
        kind: str,
        split: str,
        prompts: list[str],
        media_a: Tensor,
        media_b: Tensor,
        scores_a: dict[str, Tensor],
        scores_b: dict[str, Tensor],
        defects: list[tuple[Defects, Defects]],
    ) -> None:
        from flowalign.objectives.bt_ties import labels_from_scores

        self.kind, self.split, self.prompts = kind, split, prompts
        self.dimensions = toy_dimensions(kind)
        self.media_a, self.media_b = media_a, media_b
        self.scores_a, self.scores_b, self.defects = scores_a, scores_b, defects
        self.labels = {
            d: labels_from_scores(scores_a[d], scores_b[d], tie_margin=TIE_MARGIN[d]) for d in self.dimensions
        }

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {
            "prompt": self.prompts[i],
            "media_w": self.media_a[i].float() / 255.0,
            "media_l": self.media_b[i].float() / 255.0,
            "labels": {d: int(v[i]) for d, v in self.labels.items()},
        }

    def label_counts(self) -> dict[str, dict[str, int]]:
        """Per dimension, how many pairs are labelled A better, B better and tie."""
        return {
            d: {"A": int((v == 1).sum()), "B": int((v == -1).sum()), "tie": int((v == 0).sum())}
            for d, v in self.labels.items()
        }


def build_toy_reward_pairs(
    num_pairs: int,
    *,
    kind: str = "image",
    split: str = "train",
    seed: int = 0,
    size: int = 32,
    num_frames: int = 8,
    p_wrong: float = 0.5,
    p_visual: float = 0.5,
    p_motion: float = 0.5,
    wrong_motion_share: float | None = None,
) -> ToyRewardPairs:
    """Render and oracle-label ``num_pairs`` toy pairs (see the module doc).

    Args:
        num_pairs: number of pairs N.
        kind: "image" or "video".
        split: "train" or "heldout" attribute combinations for the captions.
        seed: stream seed; pair i depends only on (seed, split, kind, i).
        size: frame side in pixels (>= 24, the oracles' minimum).
        num_frames: frames per clip (videos).
        p_wrong, p_visual, p_motion: per-member probability of a wrong attribute, of a visual defect
            and (clips) of a motion defect.
        wrong_motion_share: clips: probability that a wrong attribute is the motion direction (None: as
            likely as each of the four others).

    Returns:
        A :class:`ToyRewardPairs` dataset.

    Raises:
        ValueError: a bad kind, split, count, size or probability.
    """
    from flowalign.toy.oracles import score_images, score_videos

    toy_dimensions(kind)
    if split not in SPLITS:
        raise ValueError(f"toy split must be one of {list(SPLITS)}, got {split!r}")
    if num_pairs < 1 or size < 24 or (kind == "video" and num_frames < 2):
        raise ValueError(
            f"toy reward pairs need num_pairs >= 1, size >= 24 and (clips) num_frames >= 2; "
            f"got {num_pairs}, {size}, {num_frames}"
        )
    probabilities = [("p_wrong", p_wrong), ("p_visual", p_visual), ("p_motion", p_motion)]
    for name, p in probabilities + [
        ("wrong_motion_share", 0.0 if wrong_motion_share is None else wrong_motion_share)
    ]:
        if not 0 <= p <= 1:
            raise ValueError(f"toy reward pairs: {name} must be in [0, 1], got {p}")
    combos = split_attributes(split, kind)
    # Training pairs never show a held-out combination, not even as the wrong member; otherwise held-out
    # images would be learnt as "always worse", a prior that beats reading the caption.
    allowed = frozenset(combos) if split == "train" else None
    prompts, media, scores, defects = [], {"a": [], "b": []}, {"a": {}, "b": {}}, []
    score = score_images if kind == "image" else score_videos
    for lo in range(0, num_pairs, _CHUNK):
        chunk = {"a": [], "b": []}
        chunk_prompts = []
        for i in range(lo, min(num_pairs, lo + _CHUNK)):
            rng = np.random.default_rng([seed, i, KINDS.index(kind), SPLITS.index(split), 17])
            attrs = combos[int(rng.integers(len(combos)))]
            pair = []
            for member in ("a", "b"):
                drawn = _draw_defects(kind, rng, p_wrong, p_visual, p_motion)
                out, info = _render_member(
                    jittered_scene(attrs, rng),
                    drawn,
                    rng,
                    kind=kind,
                    size=size,
                    num_frames=num_frames,
                    allowed=allowed,
                    motion_share=wrong_motion_share,
                )
                chunk[member].append((out * 255.0).round().to(torch.uint8))
                pair.append(info)
            chunk_prompts.append(attrs.caption())
            defects.append((pair[0], pair[1]))
        for member in ("a", "b"):
            stacked = torch.stack(chunk[member])  # [n, 3, S, S] or [n, T, 3, S, S] uint8
            media[member].append(stacked)
            for d, v in score(stacked.float() / 255.0, chunk_prompts).items():
                scores[member].setdefault(d, []).append(v)
        prompts += chunk_prompts
    dims = toy_dimensions(kind)
    return ToyRewardPairs(
        kind,
        split,
        prompts,
        torch.cat(media["a"]),
        torch.cat(media["b"]),
        {d: torch.cat(scores["a"][d]) for d in dims},
        {d: torch.cat(scores["b"][d]) for d in dims},
        defects,
    )
