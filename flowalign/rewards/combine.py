"""Combine several reward models into per-dimension normalised scores and one weighted total.

Scales differ wildly between scorers (CLIPScore ~30, PickScore ~21, HPS ~0.27, aesthetics ~5),
so dimensions are z-scored before they are mixed (VideoAlign ``inference.py``; GDPO-style):

    r~_d    = (r_d - mu_d) / sigma_d
    overall = sum_d w_d * r~_d

mu_d, sigma_d come, in order of precedence, from the ``normalisation`` argument, from
:meth:`RewardCombiner.calibrate` on a calibration set, from statistics stored with the model
(``RewardModel.normalisation``), or default to (0, 1).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from flowalign.files import atomic_write_json
from flowalign.rewards.base import RewardModel

__all__ = [
    "RewardCombiner",
    "load_normalisation",
    "parse_weights",
    "save_normalisation",
    "stats_from_scores",
]

NORM_SUFFIX = "_norm"
OVERALL = "overall"


def parse_weights(spec: str) -> dict[str, float]:
    """Parse ``"vq=1,mq=0.5,ta=2"`` into ``{"vq": 1.0, "mq": 0.5, "ta": 2.0}``.

    Whitespace around names and values is ignored; an empty or blank spec gives ``{}``.

    Raises:
        ValueError: a token without ``=``, an empty name, a value that is not a finite number,
            or a name given twice; the message quotes the token.
    """
    weights: dict[str, float] = {}
    if not spec.strip():
        return weights
    for token in spec.split(","):
        if "=" not in token:
            raise ValueError(f"reward weights {spec!r}: token {token!r} is not of the form name=number")
        name, value = (part.strip() for part in token.split("=", 1))
        if not name:
            raise ValueError(f"reward weights {spec!r}: token {token!r} has an empty dimension name")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"reward weights {spec!r}: token {token!r}: {value!r} is not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"reward weights {spec!r}: token {token!r}: weight must be finite")
        if name in weights:
            raise ValueError(f"reward weights {spec!r}: dimension {name!r} is given twice")
        weights[name] = number
    return weights


def stats_from_scores(scores: Mapping[str, Tensor]) -> dict[str, tuple[float, float]]:
    """Per-dimension (mean, std) of raw scores, std with Bessel's correction.

    Args:
        scores: ``{dimension: [N]}`` with N >= 2.

    Raises:
        ValueError: fewer than 2 values, non-finite values, or zero spread (naming the dimension).
    """
    stats: dict[str, tuple[float, float]] = {}
    for dim, values in scores.items():
        values = values.detach().double().flatten()
        if values.numel() < 2:
            raise ValueError(f"calibration: dimension {dim!r} needs at least 2 scores, got {values.numel()}")
        if not torch.isfinite(values).all():
            raise ValueError(f"calibration: dimension {dim!r} has non-finite scores")
        mean, std = float(values.mean()), float(values.std())
        if not std > 0:
            raise ValueError(f"calibration: dimension {dim!r} has zero spread (all scores = {mean:.6g})")
        stats[dim] = (mean, std)
    return stats


def _check_stats(stats: Mapping[str, Sequence[float]], *, source: str) -> dict[str, tuple[float, float]]:
    out: dict[str, tuple[float, float]] = {}
    for dim, pair in stats.items():
        if len(pair) != 2:
            raise ValueError(f"{source}: normalisation for {dim!r} must be (mean, std), got {pair!r}")
        mean, std = float(pair[0]), float(pair[1])
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise ValueError(
                f"{source}: normalisation for {dim!r} needs finite mean and std > 0, got {pair!r}"
            )
        out[dim] = (mean, std)
    return out


def save_normalisation(path: str | Path, stats: Mapping[str, tuple[float, float]]) -> None:
    """Write ``{dimension: {"mean": m, "std": s}}`` as JSON."""
    data = {dim: {"mean": float(m), "std": float(s)} for dim, (m, s) in stats.items()}
    atomic_write_json(path, data, sort_keys=True)


def load_normalisation(path: str | Path) -> dict[str, tuple[float, float]]:
    """Read what :func:`save_normalisation` wrote.

    Raises:
        ValueError: invalid JSON or entries, naming the file and the dimension.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected an object {{dimension: {{mean, std}}}}, got {type(data).__name__}"
        )
    pairs = {}
    for dim, entry in data.items():
        if not isinstance(entry, dict) or set(entry) != {"mean", "std"}:
            raise ValueError(f'{path}: entry {dim!r} must be {{"mean": ..., "std": ...}}, got {entry!r}')
        pairs[dim] = (entry["mean"], entry["std"])
    return _check_stats(pairs, source=str(path))


class RewardCombiner:
    """Score with several rewards; normalise each dimension; add a weighted ``overall``.

    Args:
        rewards: reward models; their dimension names must not overlap.
        weights: ``{dimension: w}``; None weights every scored dimension 1 (VideoAlign's
            Overall); dimensions left out get weight 0 (scored and reported, not in ``overall``).
        normalisation: ``{dimension: (mean, std)}``, overriding calibration and model statistics.

    Raises:
        ValueError: two rewards share a dimension name, a weight names a dimension no reward
            provides (the message lists the available ones), or a statistic is invalid.
    """

    def __init__(
        self,
        rewards: Sequence[RewardModel],
        weights: Mapping[str, float] | None = None,
        normalisation: Mapping[str, Sequence[float]] | None = None,
    ) -> None:
        if not rewards:
            raise ValueError("RewardCombiner: needs at least one reward model")
        self.rewards = list(rewards)
        owner: dict[str, str] = {}
        for reward in self.rewards:
            for dim in reward.dimensions:
                if dim in owner:
                    raise ValueError(
                        f"RewardCombiner: dimension {dim!r} is provided by both {owner[dim]!r} and {reward.name!r}"
                    )
                if dim == OVERALL or dim.endswith(NORM_SUFFIX):
                    raise ValueError(f"RewardCombiner: dimension name {dim!r} of {reward.name!r} is reserved")
                owner[dim] = reward.name
        self.dimensions: tuple[str, ...] = tuple(owner)
        # Default weights cover whatever is scored (a video-only "mq" is skipped for images);
        # explicit weights must all be scored.
        self._default_weights = weights is None
        if weights is None:
            weights = dict.fromkeys(self.dimensions, 1.0)
        unknown = [dim for dim in weights if dim not in owner]
        if unknown:
            raise ValueError(
                f"reward weights: no loaded reward provides dimension(s) {unknown}; "
                f"available dimensions: {', '.join(self.dimensions)}"
            )
        self.weights = {dim: float(w) for dim, w in weights.items()}
        self._explicit = _check_stats(normalisation or {}, source="normalisation")
        unknown = [dim for dim in self._explicit if dim not in owner]
        if unknown:
            raise ValueError(
                f"normalisation: no loaded reward provides dimension(s) {unknown}; "
                f"available dimensions: {', '.join(self.dimensions)}"
            )
        self._calibrated: dict[str, tuple[float, float]] = {}

    @property
    def normalisation(self) -> dict[str, tuple[float, float]]:
        """The (mean, std) in use for every dimension, after precedence (see module docstring)."""
        stats = {dim: (0.0, 1.0) for dim in self.dimensions}
        for reward in self.rewards:
            stored = _check_stats(reward.normalisation or {}, source=f"{reward.name} stored normalisation")
            stats.update({d: s for d, s in stored.items() if d in stats})
        stats.update(self._calibrated)
        stats.update(self._explicit)
        return stats

    def raw_scores(
        self,
        media: Tensor,
        prompts: Sequence[str] | None = None,
        *,
        batch_size: int | None = None,
        differentiable: bool = False,
    ) -> dict[str, Tensor]:
        """Raw ``{dimension: [B]}`` from every reward (see :meth:`RewardModel.score`)."""
        raw: dict[str, Tensor] = {}
        for reward in self.rewards:
            out = reward.score(
                media,
                prompts if reward.needs_prompts else None,
                batch_size=batch_size,
                differentiable=differentiable,
            )
            raw.update(out)
        return raw

    def combine(self, raw: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Add ``{d}_norm`` and ``overall`` to raw scores; pure given the current statistics.

        Raises:
            ValueError: a weighted dimension is absent from ``raw`` (e.g. a video-only ``mq``
                weighted while scoring images).
        """
        stats = self.normalisation
        out = dict(raw)
        total: Tensor | None = None
        for dim in self.dimensions:
            if dim not in raw:
                continue
            mean, std = stats[dim]
            out[dim + NORM_SUFFIX] = (raw[dim] - mean) / std
        for dim, weight in self.weights.items():
            if dim not in raw and self._default_weights:
                continue
            if dim not in raw:
                raise ValueError(
                    f"reward weights: dimension {dim!r} has weight {weight} but was not scored for this media "
                    f"(scored: {', '.join(raw)})"
                )
            term = weight * out[dim + NORM_SUFFIX]
            total = term if total is None else total + term
        if total is None:
            total = torch.zeros_like(next(iter(raw.values())))
        out[OVERALL] = total
        return out

    def score(
        self,
        media: Tensor,
        prompts: Sequence[str] | None = None,
        *,
        batch_size: int | None = None,
        differentiable: bool = False,
    ) -> dict[str, Tensor]:
        """Raw, normalised (``{d}_norm``) and ``overall`` scores, each [B] float32.

        Args:
            media: [B, 3, H, W] or [B, T, 3, H, W] in [0, 1].
            prompts: B prompts (None only if no reward needs prompts).
            batch_size: forwarded to every reward.
            differentiable: keep the graph (reward guidance on ``overall``).
        """
        return self.combine(
            self.raw_scores(media, prompts, batch_size=batch_size, differentiable=differentiable)
        )

    def calibrate(
        self,
        media: Tensor,
        prompts: Sequence[str] | None = None,
        *,
        batch_size: int | None = None,
    ) -> dict[str, tuple[float, float]]:
        """Set each dimension's (mean, std) from a calibration set and return them.

        Explicit ``normalisation`` given to the constructor still takes precedence.

        Raises:
            ValueError: fewer than 2 items or a dimension with zero spread.
        """
        stats = stats_from_scores(self.raw_scores(media, prompts, batch_size=batch_size))
        self._calibrated.update(stats)
        return stats
