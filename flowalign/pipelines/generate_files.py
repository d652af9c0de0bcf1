"""Generate media files and a manifest from prompts (the library side of ``flowalign generate``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flowalign.data.media import save_image, save_video
from flowalign.files import exclusive_lock, first_difference
from flowalign.models.base import FlowModel
from flowalign.pipelines.text_to_media import FlowPipeline
from flowalign.sampling.guidance import VelocityTransform
from flowalign.validation import check_number, short_repr

MANIFEST = "manifest.jsonl"
LOCK = ".manifest.lock"  # held by the process writing the folder (see generate_files)


@dataclass
class GenerationSettings:
    """Settings recorded with every sample in the manifest."""

    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float = 1.0
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    negative_prompt: str | None = None
    sampler: str = "euler"
    one_step: bool = False
    seed: int = 0
    samples_per_prompt: int = 1
    fps: int = 8
    extra: dict = field(default_factory=dict)


def resolve_defaults(settings: GenerationSettings, model: FlowModel) -> GenerationSettings:
    """Fill unset settings with the family's defaults, so the manifest records what was used."""
    return replace(
        settings,
        num_inference_steps=1
        if settings.one_step
        else settings.num_inference_steps or model.default_num_inference_steps,
        guidance_scale=model.default_guidance_scale
        if settings.guidance_scale is None
        else settings.guidance_scale,
        height=settings.height or model.default_height,
        width=settings.width or model.default_width,
        num_frames=settings.num_frames or model.default_num_frames,
    )


def read_manifest(path: str | Path) -> list[dict]:
    """Lines of a manifest.jsonl (a missing file reads as empty); a bad line raises naming its number."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            # A line cut by an interrupted run is the only one that can be partial: the last.
            if number == len(path.read_text().splitlines()):
                break
            raise ValueError(f"{path}: line {number} is not valid JSON: {err}") from err
    return rows


def _repair_tail(manifest: Path) -> None:
    """Make appending safe after an interrupted write: a last line without its newline is completed when
    it is a whole JSON row, else (a row cut short, which :func:`read_manifest` skips) removed."""
    if not manifest.exists():
        return
    data = manifest.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    start = data.rfind(b"\n") + 1
    try:
        json.loads(data[start:])
    except ValueError:
        with manifest.open("r+b") as fh:
            fh.truncate(start)
    else:
        with manifest.open("ab") as fh:
            fh.write(b"\n")


def generate_files(
    model: FlowModel,
    prompts: list[str],
    out_dir: str | Path,
    settings: GenerationSettings,
    *,
    batch_size: int = 4,
    model_name: str = "",
    velocity_transforms: list[VelocityTransform] | None = None,
    transforms_factory: Callable[[list[str]], list[VelocityTransform]] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Generate ``samples_per_prompt`` samples per prompt into ``out_dir`` and append to its manifest.

    Sample ``i`` (in prompt order) uses seed ``settings.seed + i`` with its own generator, so a
    sample does not depend on the batch size. Samples already in the manifest are skipped, so an
    interrupted run continues where it stopped -- but only if they were made as this run would make
    them (same prompt, seed, model and settings); otherwise a ValueError names the first differing
    field. Several processes may write one folder: each holds ``.manifest.lock`` while it works, so the
    second waits and then finds the first's samples (never a duplicate row). Images are written as PNG,
    videos as MP4 and GIF. ``transforms_factory(prompts)`` builds velocity transforms for each batch's
    prompts (reward guidance conditions on them); ``velocity_transforms`` apply to every batch as they are.

    Returns:
        The manifest rows of this call's new samples.

    Raises:
        ValueError: no prompts, a bad batch size, or samples in the folder made with other settings.
    """
    if not prompts:
        raise ValueError("no prompts given: the prompt list is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_numbers(settings)  # what was asked (0 steps is not "the default")
    settings = resolve_defaults(settings, model)
    _check_numbers(settings)  # and what the family's defaults filled in
    model.check_size(settings.height, settings.width, settings.num_frames)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / MANIFEST
    jobs = [
        (f"{i:06d}", prompt, settings.seed + i)
        for i, prompt in enumerate(p for p in prompts for _ in range(settings.samples_per_prompt))
    ]
    record = {k: v for k, v in asdict(settings).items() if k not in ("seed", "extra")} | settings.extra
    with exclusive_lock(out_dir / LOCK):
        _repair_tail(manifest)  # else the first new row would be glued to a line cut by an interrupted run
        rows = read_manifest(manifest)
        _check_resume(manifest, rows, jobs, model_name=model_name, family=model.family, record=record)
        done = {row["id"] for row in rows}
        todo = [job for job in jobs if job[0] not in done]
        return _run_jobs(
            model, todo, out_dir, settings, record, batch_size=batch_size, model_name=model_name,
            velocity_transforms=velocity_transforms, transforms_factory=transforms_factory, progress=progress,
        )  # fmt: skip


def _check_numbers(settings: GenerationSettings) -> None:
    """Refuse NaN, infinite and out-of-range settings before anything is sampled (naming the setting)."""
    for name, lo, integer in (
        ("num_inference_steps", 1, True),
        ("guidance_scale", 0, False),
        ("true_cfg_scale", 0, False),
        ("samples_per_prompt", 1, True),
        ("seed", 0, True),
        ("fps", 0, False),
    ):
        value = getattr(settings, name)
        if value is not None:  # None: the family has no such setting
            check_number(value, f"generation setting {name}", lo=lo, lo_open=name == "fps", integer=integer)


def _check_resume(
    manifest: Path,
    rows: list[dict],
    jobs: list[tuple[str, str, int]],
    *,
    model_name: str,
    family: str,
    record: dict,
) -> None:
    """Raise ValueError if a sample this run would reuse was made with another prompt, seed, model or
    settings, naming the first differing field (a folder holds one configuration's samples)."""
    wanted = {sample_id: (prompt, seed) for sample_id, prompt, seed in jobs}
    for row in rows:
        if row.get("id") not in wanted:
            continue
        prompt, seed = wanted[row["id"]]
        now = {"prompt": prompt, "seed": seed, "model": model_name, "family": family, "settings": record}
        diff = first_difference(row, now)
        if diff is not None:
            key, old, new = diff
            raise ValueError(
                f"{manifest}: sample {row['id']} was made with {key}={short_repr(old)}, but this run has "
                f"{key}={short_repr(new)}; write to a new output folder (or delete this one) to sample with "
                "other settings"
            )


def _run_jobs(
    model: FlowModel,
    todo: list[tuple[str, str, int]],
    out_dir: Path,
    settings: GenerationSettings,
    record: dict,
    *,
    batch_size: int,
    model_name: str,
    velocity_transforms: list[VelocityTransform] | None,
    transforms_factory: Callable[[list[str]], list[VelocityTransform]] | None,
    progress: bool,
) -> list[dict]:
    """Sample the jobs in batches, saving each file and appending its manifest row as soon as it exists."""
    manifest = out_dir / MANIFEST
    pipeline = FlowPipeline(model)
    written: list[dict] = []
    bar = tqdm(total=len(todo), desc="generating", unit="sample", disable=not progress)
    with manifest.open("a") as sink:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            generators = [torch.Generator(model.device).manual_seed(seed) for _, _, seed in chunk]
            out = pipeline(
                [p for _, p, _ in chunk],
                negative_prompt=settings.negative_prompt,
                num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale,
                true_cfg_scale=settings.true_cfg_scale,
                height=settings.height,
                width=settings.width,
                num_frames=settings.num_frames,
                generator=generators,
                sampler=settings.sampler,
                one_step=settings.one_step,
                velocity_transforms=(velocity_transforms or [])
                + (transforms_factory([p for _, p, _ in chunk]) if transforms_factory else []),
                progress=progress and len(todo) <= batch_size,
            )
            for (sample_id, prompt, seed), media in zip(chunk, out.media.float().cpu(), strict=True):
                files = _save(media, out_dir, sample_id, is_video=model.is_video, fps=settings.fps)
                row = {
                    "id": sample_id,
                    "prompt": prompt,
                    "seed": seed,
                    "file": files[0],
                    "files": files,
                    "model": model_name,
                    "family": model.family,
                    "settings": record,
                }
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                written.append(row)
            bar.update(len(chunk))
    bar.close()
    return written


def _save(media: torch.Tensor, out_dir: Path, sample_id: str, *, is_video: bool, fps: int) -> list[str]:
    if not is_video:
        save_image(media, out_dir / f"{sample_id}.png")
        return [f"{sample_id}.png"]
    save_video(media, out_dir / f"{sample_id}.mp4", fps=fps)
    save_video(media, out_dir / f"{sample_id}.gif", fps=fps)
    return [f"{sample_id}.mp4", f"{sample_id}.gif"]
