"""``flowalign train reward``: data, model and loop settings, and the run that trains and evaluates.

Data (``data.source``):
- ``toy:image`` / ``toy:video``: oracle-labelled toy pairs (:mod:`flowalign.toy.reward_pairs`), training
  pairs on the toy world's training captions and held-out pairs on its held-out captions;
- a preference dataset :mod:`flowalign.data.preference` reads (jsonl, VideoAlign csv/tsv, parquet,
  ``save_to_disk`` folder) with per-dimension labels; the held-out pairs are ``data.eval_source`` or a
  seeded ``data.eval_fraction`` of the rows. Media are resized to ``data.media_size`` squares (shortest
  side, centre crop) so they batch; clips keep their first ``data.num_frames`` frames.

The model is new (``model``: architecture; dimensions and media kind default to the data's) or starts
from a saved one (``init_from``: every weight that fits, e.g. an image reward model's towers for a video
model). The run writes ``<output_dir>/initial`` (the model before training: architecture, word tokenizer
and starting weights, so a resumed run rebuilds exactly the same network), trains on the shared loop
(``final/`` is the trained model, loadable with ``load_reward("multihead", path=...)``), then scores the
held-out pairs and writes ``<output_dir>/eval_metrics.json``: per dimension the accuracy without ties,
the tie-calibrated accuracy and the pair counts, plus the pair counts and this call's training time.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset

from flowalign.config import OptimConfig, TrainConfig
from flowalign.files import atomic_write_json
from flowalign.rewards.multihead import MultiHeadConfig, MultiHeadRewardModel
from flowalign.training.loop import TrainResult, train
from flowalign.training.methods.reward_model import (
    RewardModelTraining,
    RewardModelTrainingConfig,
    evaluate_pairs,
)

__all__ = ["EVAL_METRICS", "RewardDataConfig", "RewardModelRun", "RewardRunResult", "run_reward_model"]

EVAL_METRICS = "eval_metrics.json"
TOY_SOURCES = ("toy:image", "toy:video")


@dataclass(kw_only=True)
class RewardDataConfig:
    """Training and held-out pairs."""

    source: str = "toy:image"
    """toy:image, toy:video, or a preference dataset (jsonl, csv/tsv, parquet, save_to_disk folder)."""
    eval_source: str | None = None
    """A separate held-out preference dataset; None = ``eval_fraction`` of ``source`` (toy: held-out captions)."""
    eval_fraction: float = 0.1
    """Fraction of ``source`` rows held out (seeded by train.seed) when ``eval_source`` is None."""
    label_columns: list[str] | None = None
    """Label columns to read (e.g. [VQ, MQ, TA]); None = every label column found."""
    media_size: int | None = None
    """Square side every item is resized to (None = the model's input size)."""
    num_frames: int | None = None
    """Clips: keep the first this many frames."""
    toy_train_pairs: int = 6000
    """Toy: training pairs (training captions)."""
    toy_eval_pairs: int = 1000
    """Toy: held-out pairs (held-out captions)."""
    toy_seed: int = 0
    """Toy: seed of the pair stream."""
    toy_num_frames: int = 8
    """Toy: frames per clip."""
    toy_wrong_motion: float | None = None
    """Toy clips: probability that a wrong attribute is the motion direction (None: as likely as each other)."""

    def __post_init__(self) -> None:
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"data.eval_fraction must be in (0, 1), got {self.eval_fraction}")
        for key in ("toy_train_pairs", "toy_eval_pairs"):
            if getattr(self, key) < 1:
                raise ValueError(f"data.{key} must be >= 1, got {getattr(self, key)}")


@dataclass(kw_only=True)
class RewardModelRun:
    """``flowalign train reward``: data, architecture, BTT settings and the loop."""

    data: RewardDataConfig = field(default_factory=RewardDataConfig)
    """Training and held-out pairs."""
    model: MultiHeadConfig = field(default_factory=MultiHeadConfig)
    """Architecture (dimensions and media_kind default to the data's)."""
    pretrained: str | None = None
    """open_clip pretrained tag or weights file for model.open_clip_model (None = random init)."""
    init_from: Path | None = None
    """Start from a saved multihead reward folder: its architecture and word tokenizer, and every weight whose
    name and shape fit (an image model's towers and heads into a video model; the rest starts fresh).
    ``model.dimensions``/``media_kind`` still apply; its other fields are ignored."""
    method: RewardModelTrainingConfig = field(default_factory=RewardModelTrainingConfig)
    """BTT loss settings."""
    eval_batch_size: int = 64
    """Pairs per forward pass in the held-out evaluation."""
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            output_dir=Path("runs/reward"), batch_size=32, optim=OptimConfig(lr=1e-3, weight_decay=0.0)
        )
    )
    """The loop's settings."""


@dataclass
class RewardRunResult:
    """What :func:`run_reward_model` leaves behind."""

    train: TrainResult
    """The loop's result (``train.export_dir`` is the trained model)."""
    metrics: dict[str, dict[str, float]] | None
    """Held-out metrics per dimension (None if the run was interrupted)."""
    metrics_path: Path | None
    """``<output_dir>/eval_metrics.json``."""


def _square(size: int, num_frames: int | None):
    """Transform: keep ``num_frames`` frames, resize the shortest side to ``size`` and centre-crop."""

    def transform(media: Tensor) -> Tensor:
        x = media if media.ndim == 4 else media[None]  # [T, 3, H, W]
        if num_frames is not None:
            x = x[:num_frames]
        h, w = x.shape[-2:]
        if (h, w) != (size, size):
            scale = size / min(h, w)
            new = (max(size, round(h * scale)), max(size, round(w * scale)))
            x = F.interpolate(x, size=new, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
            top, left = (new[0] - size) // 2, (new[1] - size) // 2
            x = x[..., top : top + size, left : left + size]
        return x if media.ndim == 4 else x[0]

    return transform


def _preference_items(path: str, data: RewardDataConfig, size: int) -> Dataset:
    from flowalign.data.errors import DataError
    from flowalign.data.preference import load_preference_dataset
    from flowalign.training.methods.latent_reward import PreferenceItems

    if not Path(path).exists():
        raise DataError(path, "preference dataset not found")
    pairs = load_preference_dataset(
        path,
        dimensions=data.label_columns,
        max_frames=data.num_frames,
        transform=_square(size, data.num_frames),
    )
    pairs.validate()  # every row's prompt, labels and files now, not at the step that first draws it
    return PreferenceItems(pairs)


def build_datasets(run: RewardModelRun, size: int) -> tuple[Dataset, Dataset, list[str], str, list[str]]:
    """(train pairs, held-out pairs, label dimensions, media kind, training prompts) of ``run.data``."""
    data = run.data
    if data.source in TOY_SOURCES:
        from flowalign.data.sources import open_source
        from flowalign.toy.reward_pairs import toy_dimensions

        kind = data.source.split(":")[1]
        common = dict(seed=data.toy_seed, size=size, num_frames=data.toy_num_frames)
        train_set = open_source(
            data.source, "pairs", num=data.toy_train_pairs, wrong_motion_share=data.toy_wrong_motion, **common
        )
        # held-out pairs keep the natural mix (a wrong motion as likely as each other wrong attribute)
        eval_set = open_source(data.source, "pairs", num=data.toy_eval_pairs, split="heldout", **common)
        from flowalign.models.toy import toy_corpus

        # the toy vocabulary is closed (held-out captions use no new words): one tokenizer for images and
        # clips lets a video model start from an image model (init_from)
        return train_set, eval_set, toy_dimensions(kind), kind, toy_corpus()
    if data.source.startswith("toy:"):
        raise ValueError(f"data.source {data.source!r}: toy data is one of {list(TOY_SOURCES)}")
    items = _preference_items(data.source, data, size)
    pairs = items.pairs
    if data.eval_source is not None:
        train_set, eval_set = items, _preference_items(data.eval_source, data, size)
    else:
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(run.train.seed)).tolist()
        n_eval = max(1, round(data.eval_fraction * len(items)))
        if n_eval >= len(items):
            raise ValueError(f"{data.source}: {len(items)} pairs are too few to hold out {n_eval}")
        train_set, eval_set = Subset(items, sorted(order[n_eval:])), Subset(items, sorted(order[:n_eval]))
    label_map = run.method.label_map
    dims = [label_map.get(n, n.lower()) for n in pairs.dimensions]
    kind = "video" if items[0]["media_w"].ndim == 4 else "image"
    rows = train_set.indices if isinstance(train_set, Subset) else range(len(items))
    return train_set, eval_set, dims, kind, _prompts(data.source, rows)


def _prompts(path: str, rows) -> list[str]:
    """The prompt column of ``rows`` (the word tokenizer's corpus), without decoding any media."""
    from flowalign.data.tables import open_table

    table = open_table(path)
    column = next(c for c in ("prompt", "caption", "Prompt") if c in table.columns)  # as data.preference
    return [str(table.row(i)[column]) for i in rows]


def _model_input_size(config: MultiHeadConfig) -> int:
    if config.open_clip_model is None:
        size = config.vision.get("image_size", 224)
        return int(size if isinstance(size, int) else size[0])
    import open_clip

    cfg: dict[str, Any] = open_clip.get_model_config(config.open_clip_model) or {}
    size = cfg.get("vision_cfg", {}).get("image_size", 224)
    return int(size if isinstance(size, int) else size[0])


def _build_model(run: RewardModelRun, dims: list[str], kind: str, prompts: list[str]) -> MultiHeadRewardModel:
    config = run.model
    tokenizer, source = None, None
    if run.init_from is not None:
        source = MultiHeadRewardModel.from_pretrained(run.init_from, trainable=True)
        config = dataclasses.replace(
            source.config, dimensions=None, media_kind=None, normalisation=None, metadata={}
        )
        tokenizer = source.tokenizer if source.config.open_clip_model is None else None
    config = dataclasses.replace(
        config, dimensions=run.model.dimensions or dims, media_kind=run.model.media_kind or kind
    )
    config.text_dimensions = [d for d in config.text_dimensions if d in config.dimensions]
    model = MultiHeadRewardModel.build(
        config, corpus=prompts, tokenizer=tokenizer, pretrained=run.pretrained, seed=run.train.seed
    )
    if source is not None:
        copied, fresh = model.load_matching_weights(source.state_dict())
        model.config.metadata["init_from"] = {
            "path": str(run.init_from),
            "copied": len(copied),
            "fresh": fresh,
        }
    missing = [d for d in dims if d not in model.dimensions]
    if missing:
        raise ValueError(
            f"the data's label dimensions {missing} are not reward dimensions {list(model.dimensions)}; "
            "set model.dimensions, method.label_map or data.label_columns"
        )
    if model.media_kind != kind:
        raise ValueError(f"the data holds {kind}s but the reward model scores {model.media_kind}s")
    return model


def run_reward_model(
    run: RewardModelRun, *, resume: bool | str | os.PathLike = False, progress: bool = True
) -> RewardRunResult:
    """Build the pairs and the model of ``run``, train with BTT, evaluate the held-out pairs."""
    out_dir = Path(run.train.output_dir)
    initial = out_dir / "initial"
    size = run.data.media_size or _model_input_size(
        MultiHeadRewardModel.from_pretrained(run.init_from).config if run.init_from else run.model
    )
    train_set, eval_set, dims, kind, prompts = build_datasets(run, size)
    if resume and (initial / "config.json").is_file():
        model = MultiHeadRewardModel.from_pretrained(initial, trainable=True)
    else:
        model = _build_model(run, dims, kind, prompts)
        model.save_pretrained(initial)
    method = RewardModelTraining(model, run.method)
    wall, cpu = time.perf_counter(), time.process_time()
    result = train(method, train_set, run.train, resume=resume, progress=progress, run_config=run)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if result.export_dir is None:
        return RewardRunResult(result, None, None)
    device = "cpu" if run.train.cpu or not torch.cuda.is_available() else "cuda"
    trained = MultiHeadRewardModel.from_pretrained(result.export_dir, device=device)
    metrics = evaluate_pairs(
        trained, eval_set, batch_size=run.eval_batch_size, label_map=run.method.label_map
    )
    summary = {
        "num_eval_pairs": len(eval_set),
        "num_train_pairs": len(train_set),
        "dimensions": metrics,
        "train_wall_s": round(wall, 1),  # this call's training (a resumed run counts only its own part)
        "train_cpu_s": round(cpu, 1),
    }
    path = atomic_write_json(out_dir / EVAL_METRICS, summary)
    return RewardRunResult(result, metrics, path)
