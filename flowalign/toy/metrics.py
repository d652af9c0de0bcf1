"""Sample-set metrics on the toy world from the exact oracle's detections (no learned features).

:func:`attribute_histogram_distance`: exact total-variation distances between the attribute histograms of
two sample sets; :func:`diversity`: within-prompt pixel spread and the spread of the object's free jitter.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from flowalign.toy.world import COLOURS, POSITIONS, SHAPES, SIZES

ATTRIBUTES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("shape", SHAPES),
    ("colour", COLOURS),
    ("size", SIZES),
    ("position", POSITIONS),
)


def _keys(rows: list[dict[str, object]]) -> list[tuple]:
    return [tuple(r[n] for n, _ in ATTRIBUTES) if r["present"] else ("absent",) for r in rows]


def _tv(a: Sequence[Any], b: Sequence[Any]) -> float:
    ca, cb = Counter(a), Counter(b)
    na, nb = len(a), len(b)
    return 0.5 * sum(abs(ca[k] / na - cb[k] / nb) for k in set(ca) | set(cb))


def attribute_histogram_distance(media_a: Tensor, media_b: Tensor) -> dict[str, float]:
    """Exact total-variation distances between what the oracle detects in two sample sets.

    TV(P, Q) = 1/2 sum_k |P(k) - Q(k)| over the joint (shape, colour, size, position) histogram (with
    an "absent" bin for samples where no object is detected), and over each attribute's marginal.

    Args:
        media_a: images [N, 3, H, W] in [0, 1].
        media_b: images [M, 3, H, W] in [0, 1].

    Returns:
        {"tv_joint", "tv_shape", "tv_colour", "tv_size", "tv_position"} in [0, 1].
    """
    from flowalign.toy.oracles import detect_attributes

    rows_a, rows_b = detect_attributes(media_a), detect_attributes(media_b)
    out = {"tv_joint": _tv(_keys(rows_a), _keys(rows_b))}
    for name, _ in ATTRIBUTES:
        out[f"tv_{name}"] = _tv([r[name] for r in rows_a], [r[name] for r in rows_b])
    return out


def diversity(media: Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """Within-prompt diversity of samples (higher = more diverse; mode collapse drives both to 0).

    - "pixel": mean over prompts of the mean pairwise RMS pixel distance between that prompt's samples;
    - "jitter": mean over prompts of the std of the detected object's (extent, cx, cy), in pixels at 32x32
      (the renders' own jitter the caption leaves free: a generator that always draws the same
      object drops it).

    Args:
        media: images [N, 3, H, W] in [0, 1].
        prompts: N prompts; groups of equal prompts need >= 2 samples to count.

    Returns:
        {"pixel": float, "jitter": float, "groups": number of prompts with >= 2 samples}.
    """
    from flowalign.toy.oracles import detect_attributes

    if len(prompts) != media.shape[0]:
        raise ValueError(f"diversity: {media.shape[0]} samples but {len(prompts)} prompts")
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    rows = detect_attributes(media)
    flat = media.reshape(media.shape[0], -1).double()
    pixel, jitter = [], []
    for idx in groups.values():
        if len(idx) < 2:
            continue
        pairs = list(itertools.combinations(idx, 2))
        pixel.append(sum((flat[i] - flat[j]).pow(2).mean().sqrt().item() for i, j in pairs) / len(pairs))
        present = [rows[i] for i in idx if rows[i]["present"]]
        if len(present) >= 2:
            geo = torch.tensor([[r["extent"], r["cx"], r["cy"]] for r in present], dtype=torch.float64) * 32
            jitter.append(geo.std(dim=0, unbiased=True).mean().item())
    if not pixel:
        raise ValueError("diversity: no prompt has two or more samples")
    return {
        "pixel": sum(pixel) / len(pixel),
        "jitter": sum(jitter) / len(jitter) if jitter else 0.0,
        "groups": len(pixel),
    }
