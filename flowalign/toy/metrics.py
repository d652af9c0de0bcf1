"""Sample-set metrics on the toy world from the exact oracle's detections (no learned features).

:func:`attribute_histogram_distance`: exact total-variation distances between the attribute histograms of
two sample sets; :func:`diversity`: within-prompt pixel spread and the spread of the object's free jitter;
:func:`one_step_report` puts them in one table row beside the oracle scores, :func:`format_table` prints rows.
"""

from __future__ import annotations

import itertools
import math
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


def attribute_entropy(media: Tensor) -> float:
    """Shannon entropy (nats) of the joint attribute histogram the oracle detects in a sample set.

    H = -sum_k P(k) log P(k) over the (shape, colour, size, position) bins plus an "absent" bin; a
    generator that drops modes has a lower entropy than its teacher on the same prompts and seeds.

    Args:
        media: images [N, 3, H, W] in [0, 1], N >= 1.
    """
    from flowalign.toy.oracles import detect_attributes

    if media.shape[0] < 1:
        raise ValueError("attribute_entropy: no samples")
    counts = Counter(_keys(detect_attributes(media)))
    n = media.shape[0]
    return -sum(c / n * math.log(c / n) for c in counts.values())


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


def sample_mean(x: Tensor) -> float:
    """Mean of a score tensor, accumulated in float64."""
    return float(x.double().mean())


def standard_error(x: Tensor) -> float:
    """Standard error s / sqrt(n) of the mean (0 for a single value)."""
    return float(x.double().std() / math.sqrt(x.numel())) if x.numel() > 1 else 0.0


def one_step_report(
    name: str, evaluation, *, reference_media: Tensor, seconds: float | None = None, steps: int | None = None
) -> dict[str, Any]:
    """One table row: oracle TA / all-correct / VQ (mean and SE), TV to the reference, attribute entropy,
    diversity.

    Args:
        name: the row's label.
        evaluation: a toy evaluation (``scores``, ``media``, ``prompts``), e.g.
            :class:`flowalign.experiments.toy_base.ToyEvaluation`.
        reference_media: the samples distances are measured against (the teacher's, same prompts/seeds).
        seconds: training time to record.
        steps: sampling steps (NFE without CFG).
    """
    s = evaluation.scores
    row: dict[str, Any] = {"model": name}
    if steps is not None:
        row["steps"] = steps
    for key in ("ta", "all_correct", "vq"):
        row[key], row[f"{key}_se"] = sample_mean(s[key]), standard_error(s[key])
    row["tv_joint"] = attribute_histogram_distance(evaluation.media, reference_media)["tv_joint"]
    row["entropy"] = attribute_entropy(evaluation.media)
    div = diversity(evaluation.media, evaluation.prompts)
    row["div_pixel"], row["div_jitter"] = div["pixel"], div["jitter"]
    if seconds is not None:
        row["train_cpu_s"] = seconds
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a fixed-width text table (numbers to 3 decimals; "x +- se" where an SE is present)."""
    cols = [k for k in rows[0] if not k.endswith("_se")]
    for row in rows[1:]:
        cols += [k for k in row if not k.endswith("_se") and k not in cols]

    def cell(row: dict, key: str) -> str:
        v = row.get(key, "")
        if isinstance(v, float):
            se = row.get(f"{key}_se")
            return f"{v:.3f}" + (f"+-{se:.3f}" if se is not None else "")
        return str(v)

    table = [cols] + [[cell(r, k) for k in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in table)


# ------------------------------------------------------------------------------------------------ experiments
