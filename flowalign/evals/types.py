"""Types and small helpers shared by the evaluation stages (samples, summary, report, runner).

:class:`EvalOptions` (everything about an evaluation besides models, prompts, rewards and seeds),
:class:`ModelSpec` (what to evaluate under one name), :class:`Sample` (one sample on disk), and the
helpers that name folders and files (:func:`safe_name`, :func:`digest`, :func:`relative_path`),
record failures (:func:`failure`) and make the report strict JSON (:func:`clean_json`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flowalign.pipelines.generate_files import MANIFEST, GenerationSettings

__all__ = [
    "EvalOptions",
    "ModelSpec",
    "Sample",
    "clean_json",
    "digest",
    "failure",
    "relative_path",
    "safe_name",
]

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class EvalOptions:
    """Everything about an evaluation besides models, prompts, rewards, samples and seeds.

    Attributes:
        settings: generation settings shared by all models (``seed``/``samples_per_prompt`` are set
            by :func:`run_eval`); unset fields take each family's defaults.
        weights: ``{dimension: w}`` for the ``overall`` column (sum of w times the z-scored
            dimension); None weighs every dimension 1. Only reported with two or more dimensions.
        base: name of the base model: every other model gets paired reward changes, drift and
            reward-hacking flags against it.
        trained_rewards: dimensions the tuned models were trained on; the others count as held-out
            rewards for the hacking flags (None: no held-out analysis).
        tie_tolerance: win-rate tie tolerance, one number or ``{dimension: tol}``.
        lpips_weights: local torchvision AlexNet weights for LPIPS diversity and drift.
        lpips_random_backbone: use LPIPS with a random backbone when no weights are given (tests).
        fid_weights: local Inception weights for FID and KID against ``fid_reference``: the standard
            ``inception-2015-12-05.pt`` TorchScript (clean-fid's features, comparable with papers) or
            torchvision Inception-v3 weights (comparable between runs only); see
            ``flowalign.evals.fid.load_fid_extractor``.
        fid_reference: reference media (a folder of media files or a manifest) for that FID.
        clip_fd_model: a CLIP model (as the ``clip`` reward takes it: an open_clip ``local-dir:`` folder or a
            transformers CLIP folder) whose image embeddings give a second Frechet distance (CLIP-FD)
            against ``fid_reference``; reported as ``fid[model]["clip"]``.
        kid_subsets: KID's number of random subsets (its standard error is taken over them).
        kid_subset_size: KID's subset size (clipped to the smaller set).
        calibration_pairs: a preference dataset (see ``flowalign.data.preference``) to measure each
            reward's accuracy and calibration against human labels.
        device: where models and rewards run.
        dtype: their dtype.
        batch_size: generation and scoring batch size.
        num_resamples: bootstrap resamples for every interval.
        max_grid_prompts: prompts shown in the report's grids, spread over each set.
    """

    settings: GenerationSettings = field(default_factory=GenerationSettings)
    weights: dict[str, float] | None = None
    base: str | None = None
    trained_rewards: list[str] | None = None
    tie_tolerance: float | dict[str, float] = 0.0
    lpips_weights: str | None = None
    lpips_random_backbone: bool = False
    fid_weights: str | None = None
    fid_reference: str | None = None
    clip_fd_model: str | None = None
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    calibration_pairs: str | None = None
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    batch_size: int = 16
    num_resamples: int = 2000
    max_grid_prompts: int = 12


@dataclass
class ModelSpec:
    """What to evaluate under one name.

    Attributes:
        path: a model folder or hub id, or existing samples (a ``manifest.jsonl`` or a folder with one).
        settings: overrides of :class:`GenerationSettings` for this model only, e.g.
            ``{"one_step": True}`` for a one-step generator or ``{"sampler": "heun"}`` to compare samplers.
        guidance: inference-time guidance (Flow-NRG): ``(model, prompts) -> velocity transforms`` for a
            pipeline call on exactly those prompts (one per sample), e.g.
            ``lambda m, p: [latent_reward_guidance(m, guide, p, {"ta": 1.0}, strength=0.5)]``.
        guidance_key: a stable description of that guidance (its reward checkpoint, weights, strength):
            part of the key of the samples folder, so changed guidance draws new samples. A spec with a
            key but no ``guidance`` reuses guided samples drawn before (what :func:`rerun_eval` does) and
            reports a failure if any are missing.
    """

    path: str
    settings: dict[str, Any] = field(default_factory=dict)
    guidance: Callable[[Any, list[str]], list[Any]] | None = None
    guidance_key: str = ""

    def __post_init__(self) -> None:
        if self.guidance is not None and not self.guidance_key:
            raise ValueError(
                f"ModelSpec({self.path!r}): a guided model needs guidance_key, a stable description of the "
                "guidance (reward, weights, strength) that keys its samples folder"
            )

    @property
    def is_samples(self) -> bool:
        """True when ``path`` names existing samples rather than a model."""
        p = Path(self.path)
        if p.suffix == ".jsonl":
            return True
        return p.is_dir() and (p / MANIFEST).is_file() and not (p / "model_index.json").is_file()


@dataclass(frozen=True)
class Sample:
    """One sample of one model on one prompt set.

    Attributes:
        key: (prompt index in the set, repetition): the pairing key across models.
        prompt: the prompt.
        seed: its generation seed (None for external samples without one).
        file: the media file.
        score_id: its id in ``scores/manifest.jsonl`` and the scores files.
    """

    key: tuple[int, int]
    prompt: str
    seed: int | None
    file: Path
    score_id: str


def safe_name(name: str) -> str:
    """``name`` with every run of characters other than letters, digits, ``._-`` replaced by ``_``."""
    return _SAFE.sub("_", name).strip("._") or "unnamed"


def digest(obj: Any, length: int = 10) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``obj`` as sorted JSON (a stable folder or cache key)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def failure(stage: str, error: BaseException | str, **where: Any) -> dict[str, Any]:
    """One entry of the report's failure list: the stage, where it happened and the error message."""
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return {"stage": stage, **where, "error": message}


def relative_path(path: Path, root: Path) -> str:
    """A path relative to the report folder when inside it (so the folder can move), else absolute."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def clean_json(obj: Any) -> Any:
    """NaN/inf -> None and tuples -> lists, so the report is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean_json(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
