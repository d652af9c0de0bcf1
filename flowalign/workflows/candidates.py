"""Candidates of ``flowalign pairs``: K samples per prompt, sampled, scored and written as they are made.

Candidate ``i`` (prompt ``i // K``, prompt-major) uses seed ``seed + i`` with its own generator. Each
finished batch's files are written (atomically) and then its rows appended to ``candidates.jsonl``,
one line each, flushed: a kill loses at most the batch in flight. A re-run reads the rows already there
and samples only the rest -- if the folder was made with the same settings (``pairs_config.json``:
K, seed, guidance, steps, file type, fps, model and rewards; each row's prompt and seed), else a
ValueError names the first differing field. Under several processes each samples its own batches into
``candidates.rank<r>.jsonl`` and the main process merges them (:mod:`flowalign.sharding`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flowalign.data.media import atomic_write, save_media
from flowalign.files import exclusive_lock, first_difference
from flowalign.models.base import FlowModel
from flowalign.pipelines.text_to_media import FlowPipeline
from flowalign.sharding import Shard, done_rows, finish, merge_parts, read_rows, repair_tail, writing_part
from flowalign.validation import check_number, short_repr

CANDIDATES = "candidates.jsonl"
PAIRS_CONFIG = "pairs_config.json"
LOCK = ".candidates.lock"
VIDEO_EXTS = (".mp4", ".npy")
# PairsConfig fields that do not change the candidates (how pairs are chosen from them, batching).
_NOT_KEYED = ("mode", "margin", "batch_size")


@dataclass
class PairsConfig:
    """How candidates are sampled and pairs chosen (every field is checked on construction)."""

    num_candidates: int = 4
    """Samples per prompt (K)."""
    mode: str = "best_worst"
    """"best_worst": one pair per prompt (argmax vs argmin reward); "all": every pair over the margin."""
    margin: float = 0.0
    """Minimum reward difference for a pair; groups/pairs at or below it are ties and skipped."""
    seed: int = 0
    """Candidate j of prompt i uses seed ``seed + i * num_candidates + j``."""
    guidance_scale: float | None = None
    num_inference_steps: int | None = None
    batch_size: int = 64
    video_ext: str = ".mp4"
    """File type of video candidates and pairs: ".mp4" (H.264, lossy, what players show) or ".npy"
    (the exact uint8 frames). Use ".npy" for clips so small that codec artefacts change what the
    reward measured (the toy world's 32x32 clips lose 40 % of their pairs' visual-quality margin in
    an MP4); images are always lossless PNG."""
    fps: float = 8
    """Frames per second of MP4 candidates."""
    height: int | None = None
    """Sample height in pixels (None: the family's default)."""
    width: int | None = None
    """Sample width in pixels (None: the family's default)."""
    num_frames: int | None = None
    """Frames per clip for video families (None: the family's default)."""

    def __post_init__(self) -> None:
        check_number(self.num_candidates, "num_candidates (K, to form pairs)", lo=2, integer=True)
        if self.mode not in ("best_worst", "all"):
            raise ValueError(f"mode must be 'best_worst' or 'all', got {short_repr(self.mode)}")
        check_number(self.margin, "margin", lo=0)
        check_number(self.seed, "seed", lo=0, integer=True)
        if self.guidance_scale is not None:
            check_number(self.guidance_scale, "guidance_scale", lo=0)
        if self.num_inference_steps is not None:
            check_number(self.num_inference_steps, "num_inference_steps", lo=1, integer=True)
        check_number(self.batch_size, "batch_size", lo=1, integer=True)
        check_number(self.fps, "fps", lo=0, lo_open=True)
        for name in ("height", "width", "num_frames"):
            if getattr(self, name) is not None:
                check_number(getattr(self, name), name, lo=1, integer=True)
        if self.video_ext not in VIDEO_EXTS:
            raise ValueError(f"video_ext must be one of {VIDEO_EXTS}, got {short_repr(self.video_ext)}")


class Candidates:
    """Scored samples: K per prompt, grouped consecutively.

    ``media`` is read from the candidate files when first asked for (lossless PNG and ``.npy`` give
    back the scored pixels exactly), so building pairs never holds every candidate in memory.
    """

    def __init__(
        self,
        prompts: list[str],
        seeds: list[int],
        media: Tensor | None = None,
        scores: dict[str, Tensor] | None = None,
        *,
        files: list[Path] | None = None,
    ) -> None:
        self.prompts, self.seeds, self.files = prompts, seeds, files or []
        self.scores: dict[str, Tensor] = scores or {}
        """Per dimension [N], including "overall" (the weighted total used for ranking)."""
        self._media = media

    @property
    def media(self) -> Tensor:
        if self._media is None:
            from flowalign.data.media import load_media

            self._media = torch.stack([load_media(f) for f in self.files])
        return self._media

    @media.setter
    def media(self, value: Tensor) -> None:
        self._media = value

    @classmethod
    def from_rows(cls, rows: list[dict], folder: Path) -> Candidates:
        """The candidates of ``candidates.jsonl`` rows (scores as float32, as they were computed)."""
        keys = list(rows[0]["scores"]) if rows else []
        scores = {k: torch.tensor([r["scores"][k] for r in rows], dtype=torch.float32) for k in keys}
        files = [folder / r["file"] for r in rows]
        return cls([r["prompt"] for r in rows], [r["seed"] for r in rows], None, scores, files=files)


def quantize_to_uint8_grid(media: Tensor) -> Tensor:
    """round(255 x) / 255: the values an 8-bit file holds (what ``save_media`` writes)."""
    return (media.clamp(0.0, 1.0) * 255.0).round() / 255.0


def sample_batch(
    pipe: FlowPipeline, chunk: list[tuple[str, int]], config: PairsConfig, images: list | None = None
) -> Tensor:
    """One pipeline call on ``(prompt, seed)`` jobs, each with its own seeded generator, on the 8-bit grid
    (so scores computed on it are the scores of the lossless files); ``images``: each job's condition."""
    out = pipe(
        [p for p, _ in chunk],
        image=images,
        generator=[torch.Generator().manual_seed(s) for _, s in chunk],
        guidance_scale=config.guidance_scale,
        num_inference_steps=config.num_inference_steps,
        **{k: v for k in ("height", "width", "num_frames") if (v := getattr(config, k)) is not None},
    )
    return quantize_to_uint8_grid(out.media.float().cpu())


def candidate_settings(model: FlowModel, score_fn: Callable, config: PairsConfig, num_prompts: int) -> dict:
    """What determines the candidates: the config (less mode, margin, batch size), the model and the
    rewards (names, weights and normalisation of a ``RewardCombiner.score``; else the function's name)."""
    combiner = getattr(score_fn, "__self__", None)
    if combiner is not None and hasattr(combiner, "rewards") and hasattr(combiner, "weights"):
        rewards = {
            "names": [r.name for r in combiner.rewards],
            "weights": combiner.weights,
            "normalisation": {k: list(v) for k, v in combiner.normalisation.items()},
        }
    else:
        rewards = {"function": getattr(score_fn, "__qualname__", type(score_fn).__name__)}
    keyed = {k: v for k, v in asdict(config).items() if k not in _NOT_KEYED}
    model_id = getattr(model.pipe, "name_or_path", None) or model.family
    record = {**keyed, "num_prompts": num_prompts, "model": str(model_id), "rewards": rewards}
    return json.loads(json.dumps(record, default=str))


def _record_settings(out_dir: Path, settings: dict) -> None:
    """Write ``pairs_config.json`` for a new folder; for an existing one, refuse other settings."""
    path = out_dir / PAIRS_CONFIG
    if not path.exists():
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps({**settings, "num_pairs": None, "ties_skipped": None}, indent=2))
        return
    try:
        recorded = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); delete it or use a new output folder") from None
    diff = first_difference(recorded if isinstance(recorded, dict) else {}, settings)
    if diff is not None:
        key, old, new = diff
        raise ValueError(
            f"{path}: the candidates in this folder were made with {key}={short_repr(old)}, but this run has "
            f"{key}={short_repr(new)}; use a new output folder (or delete this one) to sample with other settings"
        )


def _todo(
    path: Path, jobs: list[tuple[int, str, int]], shard: Shard, block: int
) -> list[tuple[int, str, int]]:
    """This process's candidates not yet written, after checking the written ones' prompts and seeds."""
    wanted = {i: (prompt, seed) for i, prompt, seed in jobs}
    done = set()
    for row in done_rows(path):
        if row["id"] not in wanted:
            raise ValueError(f"{path}: candidate id {short_repr(row['id'])} is not one of this run's")
        prompt, seed = wanted[row["id"]]
        diff = first_difference(row, {"prompt": prompt, "seed": seed})
        if diff is not None:
            raise ValueError(
                f"{path}: candidate {row['id']} was made with {diff[0]}={short_repr(diff[1])}, but this run "
                f"has {diff[0]}={short_repr(diff[2])}; use a new output folder for other prompts or seeds"
            )
        done.add(row["id"])
    return [job for job in jobs if shard.owns(job[0], block) and job[0] not in done]


def _sample_todo(
    model: FlowModel,
    todo: list,
    score_fn: Callable,
    out_dir: Path,
    sink_path: Path,
    config: PairsConfig,
    progress: bool,
    conditions: list[str] | None = None,
) -> int:
    """Sample, score and write ``todo`` batch by batch: files first, then one flushed row per candidate.

    ``conditions``: per prompt, its condition image's file inside ``out_dir`` (recorded in each row)."""
    pipe = FlowPipeline(model)
    k = config.num_candidates
    bar = tqdm(total=len(todo), desc="candidates", unit="sample", disable=not progress)
    with sink_path.open("a") as sink:
        for start in range(0, len(todo), config.batch_size):
            chunk = todo[start : start + config.batch_size]
            names = None if conditions is None else [conditions[i // k] for i, _, _ in chunk]
            images = None if names is None else [_open_rgb(out_dir / name) for name in names]
            media = sample_batch(pipe, [(p, s) for _, p, s in chunk], config, images)
            scores = score_fn(media, [p for _, p, _ in chunk])
            if "overall" not in scores:
                raise ValueError(f"score_fn must return an 'overall' score to rank by; got {sorted(scores)}")
            values = {k: v.detach().float().cpu().tolist() for k, v in scores.items()}
            ext = config.video_ext if media.ndim == 5 else ".png"
            for j, (i, prompt, seed) in enumerate(chunk):
                name = f"candidates/{i:06d}{ext}"
                save_media(media[j], out_dir / name, fps=config.fps)
                row = {"id": i, "prompt": prompt, "seed": seed, "file": name}
                if names is not None:
                    row["image"] = names[j]
                sink.write(json.dumps(row | {"scores": {k: v[j] for k, v in values.items()}}) + "\n")
                sink.flush()
            bar.update(len(chunk))
    bar.close()
    return len(todo)


def sample_and_score(
    model: FlowModel,
    prompts: list[str],
    score_fn: Callable,
    out_dir: Path,
    config: PairsConfig,
    shard: Shard,
    *,
    progress: bool = True,
    images: list | None = None,
) -> list[dict]:
    """Write every candidate of ``prompts`` not yet in ``out_dir`` (see the module docstring); return
    all rows of ``candidates.jsonl``, in id order, on every process. ``images`` (one file per prompt)
    are condition images, copied as PNG into ``out_dir/conditions`` so the dataset holds them."""
    k = config.num_candidates
    jobs = [(i * k + j, p, config.seed + i * k + j) for i, p in enumerate(prompts) for j in range(k)]
    settings = candidate_settings(model, score_fn, config, len(prompts))
    path, lock = out_dir / CANDIDATES, out_dir / LOCK
    (out_dir / "candidates").mkdir(parents=True, exist_ok=True)
    progress = progress and shard.is_main
    conditions = None if images is None else copy_conditions(images, out_dir, len(prompts), shard)
    options = dict(progress=progress, conditions=conditions)
    if not shard.sharded:
        with exclusive_lock(lock):  # held for the whole run: a second writer waits, then resumes
            _record_settings(out_dir, settings)
            repair_tail(path)
            todo = _todo(path, jobs, shard, config.batch_size)
            _sample_todo(model, todo, score_fn, out_dir, path, config, **options)
            merge_parts(path, _by_id)  # parts left by a killed multi-process run: counted done above
        return read_rows(path)
    error = None
    try:
        with writing_part(path, shard) as part:
            with exclusive_lock(lock):  # only while reading
                _record_settings(out_dir, settings)
                repair_tail(path)
                todo = _todo(path, jobs, shard, config.batch_size)
            _sample_todo(model, todo, score_fn, out_dir, part, config, **options)
    except Exception as err:  # noqa: BLE001 - shared with the other processes, then raised on all
        error = err
    finish(path, shard, lock, _by_id, error=error)
    return read_rows(path)


def _by_id(row: dict) -> int:
    return int(row["id"])


def _open_rgb(path: Path):
    import PIL.Image

    with PIL.Image.open(path) as image:
        return image.convert("RGB")


def copy_conditions(images: list, out_dir: Path, num_prompts: int, shard: Shard) -> list[str]:
    """Each prompt's condition image written as ``conditions/<prompt index>.png`` (RGB, lossless) by the
    main process; returns the names relative to ``out_dir``."""
    if len(images) != num_prompts:
        raise ValueError(f"got {len(images)} condition images for {num_prompts} prompts")
    names = [f"conditions/{i:06d}.png" for i in range(num_prompts)]
    if shard.is_main:
        (out_dir / "conditions").mkdir(parents=True, exist_ok=True)
        for image, name in zip(images, names, strict=True):
            try:
                rgb = _open_rgb(Path(image))
            except OSError as err:
                raise ValueError(f"cannot read condition image {image}: {err}") from None
            with atomic_write(out_dir / name) as tmp:
                rgb.save(tmp, format="PNG")
    shard.barrier()
    return names
