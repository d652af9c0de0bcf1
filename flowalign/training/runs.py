"""Run configs and entry points behind ``flowalign train sft|dpo|rwr|latent-reward``.

Each run config nests the loop's :class:`TrainConfig` and the method's own config; it loads from
YAML plus ``key=value`` overrides (:func:`flowalign.config.load_config`) and is saved next to every
checkpoint, so ``--resume`` continues with exactly the settings of the run.

Loading follows one dtype policy, set by ``train.mixed_precision`` alone (:func:`compute_dtype`):
frozen components (text encoders, the VAE, a LoRA run's transformer base) are read from disk
straight into the compute dtype, components trained in full (the transformer of a fine-tune
without LoRA) in fp32 as master weights, and LoRA adapters are created in fp32. The device is
this process's own (:func:`training_device`), known before loading, so each rank reads its
model onto its own GPU. A LoRA run may instead load its transformer base quantized by bitsandbytes
(``quantize_base: int8 | nf4``, :mod:`flowalign.models.quantize`; a CUDA GPU only). DPO, RWR and SFT
runs that cache their prompts, and all of them under FSDP2, load in stages
(:mod:`flowalign.training.placement`): the transformer joins the device only once the text encoders
(and the VAE of cached latents) have left it, under FSDP2 as this process's shard alone; latent
reward runs cache the same way and move the encoders off the device after loading.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Dataset

import flowalign.toy  # noqa: F401  (registers the toy: data sources)
from flowalign.config import LoraConfig, TrainConfig
from flowalign.data.buckets import BucketConfig
from flowalign.data.errors import DataError
from flowalign.data.items import ManifestDataset as ManifestDataset  # the datasets of these runs
from flowalign.data.items import PairDataset as PairDataset
from flowalign.data.paths import load_row_media, resolve_data_path
from flowalign.data.sources import open_source
from flowalign.files import read_jsonl
from flowalign.models import load_flow_model
from flowalign.models.base import FlowModel
from flowalign.models.quantize import QuantizeBase, check_quantize_base, load_quantized_transformer
from flowalign.models.vae_savers import enable_vae_savers
from flowalign.training.conditions import load_candidate_conditions, select_train_expert
from flowalign.training.loop import TrainResult, train
from flowalign.training.methods.dpo import DPOConfig, FlowDPO
from flowalign.training.methods.latent_reward import LatentRewardTrainingConfig
from flowalign.training.methods.rwr import FlowRWR, RWRConfig, WeightedSamples
from flowalign.training.methods.sft import FlowMatchingSFT, SFTConfig
from flowalign.training.placement import (
    cache_run_conditioning,
    dataset_prompts,
    stage_components,
    stages_placement,
)

TOY_PREFIX = "toy:"
COMPUTE_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(train: TrainConfig) -> torch.dtype:
    """The dtype of a run's frozen weights and autocast: fp32, bf16 or fp16 for mixed_precision no/bf16/fp16."""
    if train.mixed_precision not in COMPUTE_DTYPES:
        raise ValueError(
            f"train.mixed_precision must be one of {sorted(COMPUTE_DTYPES)}, got {train.mixed_precision!r}"
        )
    return COMPUTE_DTYPES[train.mixed_precision]


def training_device(train: TrainConfig) -> torch.device:
    """This process's training device, before the loop's Accelerator exists (``cuda:<local rank>`` under
    a distributed launch; the CPU with ``train.cpu`` or without a GPU)."""
    if train.cpu:
        return torch.device("cpu")
    from accelerate import PartialState

    return PartialState().device


def load_model_spec(
    spec: str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | dict[str, torch.dtype] = torch.float32,
    drop_t5: bool = False,
) -> FlowModel:
    """``toy:image`` / ``toy:video`` builds a fresh toy model; anything else is a hub id or folder.

    ``dtype``: one dtype for every component or a per-component dict (see
    :meth:`FlowModel.component_dtypes`); ``drop_t5`` loads SD3 / SD3.5 without its T5 encoder.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if drop_t5 and spec.startswith(TOY_PREFIX):
        raise ValueError(f"drop_t5 applies to SD3 / SD3.5 models, not to {spec}")
    if spec.startswith(TOY_PREFIX):
        from flowalign.models.toy import ToyModel, build_toy_pipeline

        model = ToyModel(build_toy_pipeline(spec[len(TOY_PREFIX) :]))
        dtypes = model.component_dtypes(dtype)
        for name, module in model.modules().items():
            module.to(device=device, dtype=dtypes.get(name, dtypes["default"]))
        model.compute_dtype = dtypes["default"]
        return model
    return load_flow_model(spec, device=device, torch_dtype=dtype, drop_t5=drop_t5)


def load_training_model(
    spec: str,
    train: TrainConfig,
    *,
    full: tuple[str, ...] = (),
    quantize_base: str | None = None,
    drop_t5: bool = False,
    staged: bool = False,
) -> FlowModel:
    """The model of a run under the dtype policy, on :func:`training_device`; the components named in
    ``full`` are trained in full and load in fp32, every other one in :func:`compute_dtype`. ``staged``
    keeps the transformer on the CPU (:func:`~flowalign.training.placement.stage_components`).

    ``quantize_base`` (``int8``/``nf4``, LoRA runs only) loads the transformer's Linear weights
    quantized by bitsandbytes (:mod:`flowalign.models.quantize`) instead of in the compute dtype.
    """
    model = _load_training_model(spec, train, full, quantize_base, drop_t5, staged)
    keys = ("train.vae_slicing", "train.vae_tiling")
    return enable_vae_savers(model, slicing=train.vae_slicing, tiling=train.vae_tiling, keys=keys)


def _load_training_model(
    spec: str,
    train: TrainConfig,
    full: tuple[str, ...],
    quantize_base: str | None,
    drop_t5: bool,
    staged: bool,
) -> FlowModel:
    dtypes = {"default": compute_dtype(train)} | {name: torch.float32 for name in full}
    device = training_device(train)
    if quantize_base is None:
        model = load_model_spec(spec, device="cpu" if staged else device, dtype=dtypes, drop_t5=drop_t5)
        return stage_components(model, device) if staged else model
    if "transformer" in full:
        raise ValueError(f"quantize_base={quantize_base} needs a LoRA run, not a full fine-tune")
    if spec.startswith(TOY_PREFIX):
        raise ValueError(f"quantize_base={quantize_base} needs a hub id or model folder, not {spec!r}")
    transformer = load_quantized_transformer(
        spec, quantize_base, compute_dtype=dtypes["default"], device=device
    )
    return load_flow_model(spec, device=device, torch_dtype=dtypes, transformer=transformer, drop_t5=drop_t5)


def sft_dataset(spec: str, kind: str, *, num_items: int, seed: int) -> Dataset:
    """The media + prompts of ``spec`` (:func:`flowalign.data.sources.open_source`): ``toy:image`` /
    ``toy:video`` render ``num_items`` of the toy world's training split, a path is a manifest.jsonl."""
    return open_source(spec, "media", kind=kind, num=num_items, seed=seed)


@dataclass(kw_only=True)
class SFTRun:
    """``flowalign train sft``."""

    model: str = "toy:image"
    """Hub id or folder to fine-tune, or toy:image / toy:video for a fresh toy model."""
    data: str = "toy:train"
    """toy:image / toy:video (the toy world's training split; the older toy:train means the model's
    kind), or a manifest.jsonl of media + prompts (or a folder holding one)."""
    num_items: int = 60_000
    """Items rendered for toy data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    drop_t5: bool = False
    """SD3 / SD3.5 only: load without the T5 text encoder (``text_encoder_3``); its tokens become zeros,
    as in diffusers (``--no-t5`` on the command line)."""
    cache_prompts: bool = True
    """Encode each distinct prompt (and the empty prompt of caption dropout) once before training and
    train with the text encoders off the device (see :attr:`DPORun.cache_prompts`); ignored with
    ``sft.train_text_encoder``, whose encoder changes every step."""
    cache_latents: bool = False
    """Encode the media through the VAE once (see :attr:`DPORun.cache_latents`)."""
    latent_cache_dir: Path | None = None
    """Folder of the latent cache (null: ``<output_dir>/cache/latents``)."""


@dataclass(kw_only=True)
class DPORun:
    """``flowalign train dpo``."""

    model: str
    """Hub id or folder of the base (reference) model."""
    drop_t5: bool = False
    """SD3 / SD3.5 only: load without the T5 text encoder (``text_encoder_3``); its tokens become zeros,
    as in diffusers (``--no-t5`` on the command line)."""
    data: str
    """A preference dataset: pairs.jsonl, a VideoAlign csv, a Pick-a-Pic parquet (file or folder), a
    ``datasets`` save_to_disk folder, or ``hf:<dataset id>`` from the hub (the ``data`` extra)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    lora: LoraConfig | None = field(default_factory=LoraConfig)
    """LoRA on the transformer (reference = adapters off); null for a full fine-tune with a frozen copy."""
    quantize_base: QuantizeBase | None = None
    """Load the frozen transformer base quantized by bitsandbytes: ``int8`` (LLM.int8, about 1 byte per
    weight) or ``nf4`` (4-bit NormalFloat, about 0.5 byte, computing in the run's compute dtype); null
    keeps it in the compute dtype. LoRA runs only, with ``lora.export_merged: false``; the adapters stay
    fp32 and the reference (adapters off) is the quantized base. Needs a CUDA GPU and the
    ``bitsandbytes`` extra."""
    cache_prompts: bool = True
    """Encode each distinct prompt once before training (kept in ``<output_dir>/cache/prompts`` and
    reused on resume) and train with the text encoders off the device; false encodes every step."""
    cache_latents: bool = False
    """Encode every item's media through the VAE once before training (kept in ``latent_cache_dir``,
    reused by a resume or another run on the same data and model); train with the VAE off the device."""
    latent_cache_dir: Path | None = None
    """Folder of the latent cache (null: ``<output_dir>/cache/latents``)."""
    keep_ties: bool = False
    """Train on tie rows too (in file order); by default they are dropped and their number logged."""
    buckets: BucketConfig | None = None
    """Resize + center-crop every pair into an aspect-ratio bucket of about resolution² pixels (clips
    also to ``num_frames``), one bucket per global batch; null trains at file size (one size per pair)."""
    train_expert: Literal["high", "low", "both"] = "both"
    """Wan 2.2 A14B: which expert the run adapts, the high-noise one (timesteps >= boundary), the
    low-noise one, or both; the other stays as loaded. Other models: ``both`` only."""


@dataclass(kw_only=True)
class RWRRun:
    """``flowalign train rwr``."""

    model: str
    data: str
    """candidates.jsonl written by ``flowalign pairs`` (every sample with its scores)."""
    drop_t5: bool = False
    """SD3 / SD3.5 only: load without the T5 text encoder (``text_encoder_3``); its tokens become zeros,
    as in diffusers (``--no-t5`` on the command line)."""
    reward_key: str = "overall"
    """Which score of candidates.jsonl weights the samples."""
    train: TrainConfig = field(default_factory=TrainConfig)
    rwr: RWRConfig = field(default_factory=RWRConfig)
    lora: LoraConfig | None = field(default_factory=LoraConfig)
    quantize_base: QuantizeBase | None = None
    """``int8`` / ``nf4``: a bitsandbytes-quantized frozen transformer base (see :attr:`DPORun.quantize_base`)."""
    train_expert: Literal["high", "low", "both"] = "both"
    """Wan 2.2 A14B: which expert the run adapts (see :attr:`DPORun.train_expert`)."""
    cache_prompts: bool = True
    """Encode each distinct prompt once before training (see :attr:`DPORun.cache_prompts`)."""
    cache_latents: bool = False
    """Encode the media through the VAE once (see :attr:`DPORun.cache_latents`)."""
    latent_cache_dir: Path | None = None
    """Folder of the latent cache (null: ``<output_dir>/cache/latents``)."""


def _read_candidates(
    path: Path, keys: list[str], *, finite: bool
) -> tuple[list[torch.Tensor], list[str], dict[str, list[float]]]:
    """Media, prompts and the scores ``keys`` of every row of a candidates.jsonl (errors name the line).

    ``finite=False`` lets NaN through (a missing score, e.g. for :func:`labels_from_scores`).
    """
    media, prompts, scores = [], [], {k: [] for k in keys}
    for number, row in read_jsonl(path, error=DataError):
        where = f"line {number}"
        row_scores = row.get("scores", {})
        missing = [k for k in keys if not isinstance(row_scores, dict) or k not in row_scores]
        if missing:
            shown = sorted(map(str, row_scores)) if isinstance(row_scores, dict) else f"{row_scores!r:.100}"
            raise DataError(path, f"no score {', '.join(map(repr, missing))} (has {shown})", where=where)
        for k in keys:
            value = row_scores[k]
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or (finite and not math.isfinite(value))
            ):
                kind = "a finite number" if finite else "a number"
                raise DataError(path, f"score {k!r} must be {kind}, got {value!r:.100}", where=where)
            scores[k].append(float(value))
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(path, f"needs a non-empty 'prompt', got {prompt!r:.100}", where=where)
        file = resolve_data_path(path.parent, row.get("file"), source=path, where=where, key="file")
        item = load_row_media(file, source=path, where=where, key="file")
        if media and item.shape != media[0].shape:
            raise DataError(
                path,
                f"media of shape {tuple(item.shape)}, the first row's is {tuple(media[0].shape)}",
                where=where,
            )
        media.append(item)
        prompts.append(prompt)
    if not media:
        raise DataError(path, "has no rows")
    return media, prompts, scores


def load_candidates(path: str | Path, reward_key: str) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Media, prompts and rewards of a candidates.jsonl (errors name the line; rewards must be finite)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "candidates file not found")
    media, prompts, scores = _read_candidates(path, [reward_key], finite=True)
    return torch.stack(media), prompts, torch.tensor(scores[reward_key])


def run_sft(run: SFTRun, *, resume: bool = False, progress: bool = True) -> TrainResult:
    torch.manual_seed(run.train.seed)  # random initialisations (LoRA, heads) follow the run seed
    full = ("transformer", "text_encoder") if run.sft.train_text_encoder else ("transformer",)
    staged = stages_placement(run) and not run.sft.train_text_encoder
    model = load_training_model(run.model, run.train, full=full, drop_t5=run.drop_t5, staged=staged)
    kind = "video" if model.is_video else "image"
    data = sft_dataset(run.data, kind, num_items=run.num_items, seed=run.train.seed)
    method = FlowMatchingSFT(model, run.sft)
    settings = ("sft", kind, run.num_items, run.train.seed)
    data = cache_run_conditioning(run, method, data, lambda: dataset_prompts(data), *settings)
    return train(method, data, run.train, resume=resume, progress=progress, run_config=run)


def run_dpo(run: DPORun, *, resume: bool = False, progress: bool = True) -> TrainResult:
    method, data = prepare_dpo(run)
    return train(method, data, run.train, resume=resume, progress=progress, run_config=run)


def prepare_dpo(run: DPORun) -> tuple[FlowDPO, Dataset]:
    """The method and dataset of a DPO run: model loaded under the dtype policy on this process's
    device, LoRA (fp32) attached, prompts and media latents cached as the run says (in stages)."""
    torch.manual_seed(run.train.seed)  # random initialisations (LoRA, heads) follow the run seed
    check_quantize_base(run.quantize_base, lora=run.lora)
    full = () if run.lora else ("transformer",)
    model = load_training_model(
        run.model, run.train, full=full, quantize_base=run.quantize_base, drop_t5=run.drop_t5,
        staged=stages_placement(run),
    )  # fmt: skip
    select_train_expert(model, run.train_expert)
    method = FlowDPO(model, run.dpo, lora=run.lora)
    data = open_source(run.data, "pairs", keep_ties=run.keep_ties, buckets=run.buckets)
    data = cache_run_conditioning(run, method, data, data.prompts, "dpo", run.keep_ties, run.buckets)
    return method, data


def run_rwr(run: RWRRun, *, resume: bool = False, progress: bool = True) -> TrainResult:
    torch.manual_seed(run.train.seed)  # random initialisations (LoRA, heads) follow the run seed
    check_quantize_base(run.quantize_base, lora=run.lora)
    full = () if run.lora else ("transformer",)
    model = load_training_model(
        run.model, run.train, full=full, quantize_base=run.quantize_base, drop_t5=run.drop_t5,
        staged=stages_placement(run),
    )  # fmt: skip
    media, prompts, rewards = load_candidates(run.data, run.reward_key)
    conditions, images = load_candidate_conditions(run.data)
    data = WeightedSamples(media, prompts, rewards, run.rwr, conditions=conditions, images=images)
    select_train_expert(model, run.train_expert)
    method = FlowRWR(model, run.rwr, lora=run.lora)
    data = cache_run_conditioning(run, method, data, prompts, "rwr", run.reward_key, run.rwr)
    return train(method, data, run.train, resume=resume, progress=progress, run_config=run)


@dataclass(kw_only=True)
class LatentRewardRun:
    """``flowalign train latent-reward``: the noise-aware guide of Flow-NRG."""

    model: str
    """Hub id or folder of the flow model the guide is cut from (and later guides)."""
    data: str
    """A preference dataset with per-dimension labels (pairs.jsonl, VideoAlign csv, Pick-a-Pic
    parquet), or a candidates.jsonl from ``flowalign pairs`` (same-prompt samples are paired and
    labelled by their score differences: distillation of a clean reward into a noisy one)."""
    teacher: str | None = None
    """Reward spec (e.g. ``toy`` or ``clip:model=DIR``) that labels every batch on the fly instead of
    the dataset's labels."""
    max_pairs_per_prompt: int | None = None
    """candidates.jsonl: at most this many pairs per prompt (default: all same-prompt pairs)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    reward: LatentRewardTrainingConfig = field(default_factory=LatentRewardTrainingConfig)
    cache_prompts: bool = True
    """Encode each distinct prompt once before training and train with the text encoders off the
    device (see :attr:`DPORun.cache_prompts`)."""
    cache_latents: bool = False
    """Encode both members' media through the VAE once (see :attr:`DPORun.cache_latents`); the VAE
    leaves the device unless a ``teacher`` scores decoded latents."""
    latent_cache_dir: Path | None = None
    """Folder of the latent cache (null: ``<output_dir>/cache/latents``)."""


def _is_candidates_file(path: Path) -> bool:
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    with path.open() as f:
        first = next((line for line in f if line.strip()), "")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(row, dict) and "scores" in row and "file" in row


def latent_reward_dataset(run: LatentRewardRun) -> Dataset:
    """Training pairs of a latent reward run (see :attr:`LatentRewardRun.data`)."""
    from flowalign.data.preference import load_preference_dataset
    from flowalign.training.methods.latent_reward import (
        PreferenceItems,
        ScoredPairs,
        pairs_within_groups,
    )

    path = Path(run.data)
    if not _is_candidates_file(path):
        return PreferenceItems(load_preference_dataset(path))
    dims = run.reward.dimensions
    media, prompts, scores = _read_candidates(path, list(dims), finite=False)
    conditions, images = load_candidate_conditions(path)
    groups = prompts if conditions is None else list(zip(prompts, conditions, strict=True))
    pairs = pairs_within_groups(groups, max_pairs_per_group=run.max_pairs_per_prompt)
    if not pairs:
        raise DataError(path, "no two candidates share a prompt, so no pairs can be built")
    return _MediaPairs(
        ScoredPairs(
            torch.stack(media),
            prompts,
            {d: torch.tensor(v) for d, v in scores.items()},
            pairs,
            tie_margin=run.reward.tie_margin,
        ),
        conditions=conditions,
        images=images,
    )


class _MediaPairs(Dataset):
    """:class:`ScoredPairs` over pixels: items carry ``media_w``/``media_l`` (encoded by the method), and
    the pair's condition image (``condition``, shared: pairs are drawn within one prompt and image)."""

    def __init__(self, pairs: Dataset, *, conditions: list[str] | None = None, images: dict | None = None):
        self.pairs, self.conditions, self.images = pairs, conditions, images or {}

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        item = self.pairs[i]
        out = {
            "prompt": item["prompt"],
            "media_w": item.pop("latents_w"),
            "media_l": item.pop("latents_l"),
            "labels": item["labels"],
        }
        if self.conditions is not None:
            out["condition"] = self.images[self.conditions[self.pairs.pairs[i][0]]]
        return out

    def prompts(self) -> list[str]:
        return [self.pairs.prompts[i] for i, _ in self.pairs.pairs]


def run_latent_reward(run: LatentRewardRun, *, resume: bool = False, progress: bool = True) -> TrainResult:
    from flowalign.rewards.registry import load_reward, parse_reward_spec
    from flowalign.training.methods.latent_reward import LatentRewardTraining

    torch.manual_seed(run.train.seed)  # random initialisations (LoRA, heads) follow the run seed
    # the guide's trunk is cut from the transformer and may be trained in full: fp32 master weights
    model = load_training_model(run.model, run.train, full=("transformer",))
    teacher = None
    if run.teacher:
        name, options = parse_reward_spec(run.teacher)
        teacher = load_reward(name, device=model.device, **options)
    data = latent_reward_dataset(run)
    if teacher is not None:
        data = _WithoutLabels(data)
    method = LatentRewardTraining(model, run.reward, teacher=teacher)
    settings = ("latent-reward", run.max_pairs_per_prompt, run.reward.tie_margin, run.teacher is None)
    data = cache_run_conditioning(run, method, data, lambda: dataset_prompts(data), *settings)
    return train(method, data, run.train, resume=resume, progress=progress, run_config=run)


class _WithoutLabels(Dataset):
    """Drops dataset labels so that the teacher reward labels every batch."""

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {k: v for k, v in self.data[i].items() if k != "labels"}

    def prompts(self) -> list[str]:
        return dataset_prompts(self.data)
