"""The latent reward model's description: ``latent_reward.json`` (spec, format, checks against a flow model).

Split from :mod:`flowalign.rewards.latent` (the model itself); everything here is re-exported there.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowalign.formats import read_tagged_json
from flowalign.models.base import FlowModel
from flowalign.rewards.latent_trunks import (
    ADAPTER_TRUNKS,
    PART_TRUNKS,
    AdapterTrunk,
    PartsTrunk,
    source_transformer,
    trunk_kind,
)

CONFIG_NAME = "latent_reward.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "flowalign.latent_reward"
FORMAT_VERSION = 1


class LatentRewardLoadError(ValueError):
    """A latent reward folder that cannot be read, or that belongs to another model family."""


def supported_transformers() -> list[str]:
    """Transformer classes a latent reward trunk can be cut from."""
    return sorted(set(PART_TRUNKS) | set(ADAPTER_TRUNKS))


def trunk_spec(class_name: str, kind: str = "parts") -> PartsTrunk | AdapterTrunk:
    table = PART_TRUNKS if kind == "parts" else ADAPTER_TRUNKS
    if class_name not in table:
        raise ValueError(
            f"latent reward: no trunk for transformer class {class_name!r}; supported: {supported_transformers()}"
        )
    return table[class_name]


def plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-normalised public transformer config (tuples -> lists, private ``_`` keys dropped)."""
    return json.loads(
        json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, default=list)
    )


@dataclass
class LatentRewardSpec:
    """Everything needed to rebuild a :class:`LatentRewardModel` (written as ``latent_reward.json``)."""

    family: str
    """``FlowModel.family`` of the base model (e.g. "toy", "sd3", "wan")."""
    transformer_class: str
    """Class name of the base transformer the trunk was cut from."""
    transformer_config: dict[str, Any]
    """The base transformer's public diffusers config."""
    num_blocks: int
    """Trunk depth k (first k transformer blocks)."""
    dimensions: tuple[str, ...]
    """Reward dimensions, e.g. ("vq", "ta") for images, ("vq", "mq", "ta") for videos."""
    head_hidden: int = 128
    """Hidden width of each per-dimension head."""
    normalisation: dict[str, tuple[float, float]] | None = None
    """Per-dimension (mean, std) of raw scores; None = not calibrated (then (0, 1))."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (training time range, steps, ...)."""
    trunk: str = "parts"
    """"parts" (the forward repeated up to block k) or "adapter" (run through the family adapter)."""


def check_dimensions(dimensions: Sequence[str]) -> tuple[str, ...]:
    dims = tuple(dimensions)
    if not dims or not all(isinstance(d, str) and d for d in dims):
        raise ValueError(f"latent reward: dimensions must be non-empty names, got {list(dims)}")
    if len(set(dims)) != len(dims):
        raise ValueError(f"latent reward: dimensions must be unique, got {list(dims)}")
    return dims


def check_stats(stats: Mapping[str, Sequence[float]], dims: tuple[str, ...], source: str) -> dict:
    unknown = sorted(set(stats) - set(dims))
    if unknown:
        raise ValueError(
            f"{source}: normalisation names unknown dimension(s) {unknown}; dimensions are {list(dims)}"
        )
    out = {}
    for dim, pair in stats.items():
        mean, std = (float(v) for v in pair)
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise ValueError(
                f"{source}: normalisation of {dim!r} needs finite mean and std > 0, got {tuple(pair)}"
            )
        out[dim] = (mean, std)
    return out


def read_spec(path: str | os.PathLike) -> LatentRewardSpec:
    """Read and validate ``latent_reward.json`` of a saved model folder."""
    path = Path(path)
    file = path / CONFIG_NAME
    data = read_tagged_json(
        file,
        FORMAT,
        error=LatentRewardLoadError,
        version=FORMAT_VERSION,
        missing=f"no {CONFIG_NAME} inside ({path} is not a latent reward model folder)",
    )
    try:
        norm = data.get("normalisation")
        spec = LatentRewardSpec(
            family=str(data["family"]),
            transformer_class=str(data["transformer_class"]),
            transformer_config=dict(data["transformer_config"]),
            num_blocks=int(data["num_blocks"]),
            dimensions=check_dimensions(data["dimensions"]),
            head_hidden=int(data.get("head_hidden", 128)),
            normalisation=None if norm is None else {d: (float(m), float(s)) for d, (m, s) in norm.items()},
            metadata=dict(data.get("metadata") or {}),
            trunk=str(data.get("trunk", "parts")),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise LatentRewardLoadError(f"{file}: invalid entry ({type(err).__name__}: {err})") from err
    table = {"parts": PART_TRUNKS, "adapter": ADAPTER_TRUNKS}.get(spec.trunk, {})
    if spec.transformer_class not in table:
        raise LatentRewardLoadError(
            f"{file}: transformer_class {spec.transformer_class!r} is not supported; supported: {supported_transformers()}"
        )
    return spec


def check_spec_compatible(spec: LatentRewardSpec, model: FlowModel, *, source: str) -> None:
    """Raise :class:`LatentRewardLoadError` if ``spec`` was built for another family or transformer."""
    if spec.family != model.family:
        raise LatentRewardLoadError(
            f"{source}: latent reward was trained for family {spec.family!r}, but the model is family {model.family!r}"
        )
    class_name = type(source_transformer(model)).__name__
    if spec.transformer_class != class_name:
        raise LatentRewardLoadError(
            f"{source}: latent reward reads a {spec.transformer_class} trunk, but the model's transformer is a "
            f"{class_name} (an image guide for a video model or the reverse)"
        )
    if spec.trunk != trunk_kind(model):
        raise LatentRewardLoadError(
            f"{source}: latent reward has a {spec.trunk!r} trunk, but this {model.family} model needs "
            f"{trunk_kind(model)!r} (a text-to-video guide for an image-conditioned model or the reverse)"
        )
    current = plain_config(source_transformer(model).config)
    for key, value in spec.transformer_config.items():
        if key != "num_layers" and key in current and current[key] != value:
            raise LatentRewardLoadError(
                f"{source}: transformer config {key!r} is {value!r} in the latent reward but {current[key]!r} "
                "in the model"
            )
