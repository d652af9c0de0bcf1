"""Run configs and entry points behind ``flowalign train sft|dpo|rwr``.

Each run config nests the loop's :class:`TrainConfig` and the method's own config; it loads from
YAML plus ``key=value`` overrides (:func:`flowalign.config.load_config`) and is saved next to every
checkpoint, so ``--resume`` continues with exactly the settings of the run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from flowalign.config import LoraConfig, TrainConfig
from flowalign.data.errors import DataError
from flowalign.data.media import load_media
from flowalign.models import load_flow_model
from flowalign.models.base import FlowModel
from flowalign.training.loop import TrainResult, train
from flowalign.training.methods.dpo import DPOConfig, FlowDPO
from flowalign.training.methods.rwr import FlowRWR, RWRConfig, WeightedSamples
from flowalign.training.methods.sft import FlowMatchingSFT, SFTConfig

TOY_PREFIX = "toy:"


def load_model_spec(spec: str, *, device: str | None = None) -> FlowModel:
    """``toy:image`` / ``toy:video`` builds a fresh toy model; anything else is a hub id or folder."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith(TOY_PREFIX):
        from flowalign.models.toy import ToyModel, build_toy_pipeline

        return ToyModel(build_toy_pipeline(spec[len(TOY_PREFIX) :])).to(device)
    return load_flow_model(spec, device=device)


class ManifestDataset(Dataset):
    """Media + prompts listed in a manifest.jsonl ({"file" or "path", "prompt"}, paths relative to it)."""

    def __init__(self, manifest: str | Path):
        self.manifest = Path(manifest)
        if not self.manifest.is_file():
            raise DataError(self.manifest, "manifest not found")
        self.rows = []
        for number, line in enumerate(self.manifest.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(self.manifest, f"not valid JSON: {err}", where=f"line {number}") from None
            file = row.get("file") or row.get("path")
            prompt = row.get("prompt")
            if not file or not isinstance(prompt, str) or not prompt.strip():
                raise DataError(
                    self.manifest, "needs a non-empty 'prompt' and a 'file'", where=f"line {number}"
                )
            self.rows.append((self.manifest.parent / file, prompt))
        if not self.rows:
            raise DataError(self.manifest, "has no rows")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        path, prompt = self.rows[i]
        return {"pixels": load_media(path), "prompt": prompt, "index": i}


def sft_dataset(spec: str, kind: str, *, num_items: int, seed: int) -> Dataset:
    """``toy:train`` renders the toy world's training split; otherwise a manifest.jsonl path."""
    if spec.startswith(TOY_PREFIX):
        from flowalign.toy.base import PrerenderedToy
        from flowalign.toy.data import ToyDataset

        return PrerenderedToy(ToyDataset(spec[len(TOY_PREFIX) :], kind=kind, num=num_items, seed=seed))
    return ManifestDataset(spec)


@dataclass(kw_only=True)
class SFTRun:
    """``flowalign train sft``."""

    model: str = "toy:image"
    """Hub id or folder to fine-tune, or toy:image / toy:video for a fresh toy model."""
    data: str = "toy:train"
    """toy:train (the toy world's training split) or a manifest.jsonl of media + prompts."""
    num_items: int = 60_000
    """Items rendered for toy data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)


@dataclass(kw_only=True)
class DPORun:
    """``flowalign train dpo``."""

    model: str
    """Hub id or folder of the base (reference) model."""
    data: str
    """A preference dataset: pairs.jsonl, a VideoAlign csv, a Pick-a-Pic parquet (file or folder)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    lora: LoraConfig | None = field(default_factory=LoraConfig)
    """LoRA on the transformer (reference = adapters off); null for a full fine-tune with a frozen copy."""


@dataclass(kw_only=True)
class RWRRun:
    """``flowalign train rwr``."""

    model: str
    data: str
    """candidates.jsonl written by ``flowalign pairs`` (every sample with its scores)."""
    reward_key: str = "overall"
    """Which score of candidates.jsonl weights the samples."""
    train: TrainConfig = field(default_factory=TrainConfig)
    rwr: RWRConfig = field(default_factory=RWRConfig)
    lora: LoraConfig | None = field(default_factory=LoraConfig)


class PairDataset(Dataset):
    """Preference pairs as training items for :class:`FlowDPO`."""

    def __init__(self, path: str | Path):
        from flowalign.data.preference import load_preference_dataset

        self.pairs = load_preference_dataset(path)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        pair = self.pairs[i]
        return {"media_w": pair.media_w, "media_l": pair.media_l, "prompt": pair.prompt, "index": i}


def load_candidates(path: str | Path, reward_key: str) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Media, prompts and rewards of a candidates.jsonl (errors name the line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "candidates file not found")
    media, prompts, rewards = [], [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        scores = row.get("scores", {})
        if reward_key not in scores:
            raise DataError(path, f"no score {reward_key!r} (has {sorted(scores)})", where=f"line {number}")
        media.append(load_media(path.parent / row["file"]))
        prompts.append(row["prompt"])
        rewards.append(float(scores[reward_key]))
    if not media:
        raise DataError(path, "has no rows")
    return torch.stack(media), prompts, torch.tensor(rewards)


def run_sft(run: SFTRun, *, resume: bool = False, progress: bool = True) -> TrainResult:
    model = load_model_spec(run.model, device="cpu" if run.train.cpu else None)
    kind = "video" if model.is_video else "image"
    data = sft_dataset(run.data, kind, num_items=run.num_items, seed=run.train.seed)
    return train(
        FlowMatchingSFT(model, run.sft), data, run.train, resume=resume, progress=progress, run_config=run
    )


def run_dpo(run: DPORun, *, resume: bool = False, progress: bool = True) -> TrainResult:
    model = load_model_spec(run.model, device="cpu" if run.train.cpu else None)
    method = FlowDPO(model, run.dpo, lora=run.lora)
    return train(method, PairDataset(run.data), run.train, resume=resume, progress=progress, run_config=run)


def run_rwr(run: RWRRun, *, resume: bool = False, progress: bool = True) -> TrainResult:
    model = load_model_spec(run.model, device="cpu" if run.train.cpu else None)
    media, prompts, rewards = load_candidates(run.data, run.reward_key)
    data = WeightedSamples(media, prompts, rewards, run.rwr)
    method = FlowRWR(model, run.rwr, lora=run.lora)
    return train(method, data, run.train, resume=resume, progress=progress, run_config=run)
