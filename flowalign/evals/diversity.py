"""Diversity of samples: LPIPS or pixel distance between samples of one prompt, attribute entropy (toy).

Alignment methods that collapse onto one high-reward picture per prompt keep their reward and lose
variety; these metrics catch that.

LPIPS (Zhang et al. 2018) uses the ``lpips`` package: its linear calibration layers ship inside the
package, the backbone (AlexNet/VGG/SqueezeNet ImageNet weights) does not and cannot be downloaded here,
so :func:`load_lpips` (:mod:`flowalign.tokenizers.metrics`) takes a local torchvision weights file. ``random_backbone=True`` builds LPIPS on
a randomly initialised backbone: that is for tests only; its distances are not the published metric.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from flowalign.tokenizers.metrics import load_lpips

__all__ = ["attribute_entropy", "load_lpips", "lpips_distance", "pixel_distance", "within_group_diversity"]

Distance = Callable[[Tensor, Tensor], Tensor]
"""(a [P, ...], b [P, ...]) -> [P] distances between paired samples."""


@torch.no_grad()
def lpips_distance(model: nn.Module, a: Tensor, b: Tensor) -> Tensor:
    """LPIPS between paired images [P, 3, H, W] (clips [P, T, 3, H, W]: mean over frames) in [0, 1] -> [P]."""
    if a.shape != b.shape:
        raise ValueError(f"lpips_distance: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim == 5:
        p, t = a.shape[:2]
        return lpips_distance(model, a.flatten(0, 1), b.flatten(0, 1)).reshape(p, t).mean(dim=1)
    device = next(model.parameters()).device
    out = model(a.to(device) * 2 - 1, b.to(device) * 2 - 1)  # lpips expects [-1, 1]
    return out.flatten().float().cpu()


def pixel_distance(a: Tensor, b: Tensor) -> Tensor:
    """Root-mean-square pixel difference of paired media [P, ...] in [0, 1] -> [P] (0 = identical)."""
    if a.shape != b.shape:
        raise ValueError(f"pixel_distance: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a.double() - b.double()).pow(2).flatten(1).mean(dim=1).sqrt().float()


def within_group_diversity(
    groups: Iterable[Tensor],
    distances: Mapping[str, Distance],
    *,
    num_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Mean pairwise distance between samples of the same prompt, averaged over prompts.

        D = mean_g [ 2 / (K_g (K_g - 1)) sum_{i<j} d(x_gi, x_gj) ]

    Args:
        groups: per prompt, its K_g samples stacked [K_g, ...] (an iterable, so groups can be loaded
            one at a time); prompts with K_g < 2 are skipped.
        distances: ``{name: paired distance}``, e.g. ``{"pixel": pixel_distance}`` (LPIPS via
            ``functools.partial(lpips_distance, model)``); every group is loaded once for all of them.
        num_resamples: bootstrap resamples over prompts for the interval.
        seed: bootstrap seed.

    Returns:
        Per distance name: ``mean``, ``ci_low``, ``ci_high`` (95%, resampling prompts) and ``num_groups``;
        NaN values when no prompt has two samples.
    """
    from flowalign.evals.stats import bootstrap_means

    per_group: dict[str, list[float]] = {name: [] for name in distances}
    for media in groups:
        k = media.shape[0]
        if k < 2:
            continue
        i, j = torch.triu_indices(k, k, offset=1)
        for name, distance in distances.items():
            per_group[name].append(float(distance(media[i], media[j]).double().mean()))
    out = {}
    for name, values in per_group.items():
        if not values:
            out[name] = {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "num_groups": 0}
            continue
        v = torch.tensor(values, dtype=torch.float64)
        means = bootstrap_means(v, num_resamples=num_resamples, seed=seed)
        lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        out[name] = {"mean": float(v.mean()), "ci_low": lo, "ci_high": hi, "num_groups": len(values)}
    return out


def _entropy_bits(counts: Counter) -> float:
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values() if c) if total else 0.0


def attribute_entropy(
    detections: Sequence[Mapping[str, object]],
    vocab: Mapping[str, Sequence[str]],
    *,
    reference: Sequence[Mapping[str, object]] | None = None,
) -> dict[str, object]:
    """Entropy of each attribute's histogram over a sample set (toy world: what the oracle detects).

        H_k = -sum_v p_k(v) log2 p_k(v),   normalised H_k / log2 |V_k|

    A model that draws every prompt as, say, a red circle has H_colour = 0 whatever the prompts ask;
    ``reference`` (the attributes the prompts ask for) gives the entropy a faithful model would show.

    Args:
        detections: per sample, ``{attribute: word or None}`` (``flowalign.toy.detect_attributes`` rows);
            samples without an object (``present`` False) are counted as absent and left out of the
            histograms.
        vocab: ``{attribute: words}``, e.g. ``{"shape": SHAPES, "colour": COLOURS}``.
        reference: per prompt sample, the requested attributes (same keys), or None.

    Returns:
        ``{"present": fraction, "attributes": {k: {"entropy_bits", "max_bits", "normalised", "histogram",
        "reference_bits"?}}}``.
    """
    present = [d for d in detections if d.get("present", True)]
    out: dict[str, object] = {"present": len(present) / len(detections) if detections else math.nan}
    attrs: dict[str, dict[str, object]] = {}
    for key, words in vocab.items():
        counts = Counter(str(d[key]) for d in present if d.get(key) is not None)
        max_bits = math.log2(len(words)) if len(words) > 1 else 0.0
        h = _entropy_bits(counts)
        entry: dict[str, object] = {
            "entropy_bits": h,
            "max_bits": max_bits,
            "normalised": h / max_bits if max_bits else 0.0,
            "histogram": {w: counts.get(w, 0) for w in words},
        }
        if reference is not None:
            entry["reference_bits"] = _entropy_bits(
                Counter(str(r[key]) for r in reference if r.get(key) is not None)
            )
        attrs[key] = entry
    out["attributes"] = attrs
    return out
