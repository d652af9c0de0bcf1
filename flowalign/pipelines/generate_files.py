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
from flowalign.sharding import Shard, current_shard, done_rows, finish, merge_parts, repair_tail, writing_part
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


def generate_files(
    model: FlowModel,
    prompts: list[str],
    out_dir: str | Path,
    settings: GenerationSettings,
    *,
    batch_size: int = 4,
    model_name: str = "",
    velocity_transforms: list[VelocityTransform] | None = None,
    transforms_factory: Callable[..., list[VelocityTransform]] | None = None,
    progress: bool = True,
    shard: Shard | None = None,
    images: list[str | Path] | None = None,
) -> list[dict]:
    """Generate ``samples_per_prompt`` samples per prompt into ``out_dir`` and append to its manifest.

    Sample ``i`` (in prompt order) uses seed ``settings.seed + i`` with its own generator, so a
    sample does not depend on the batch size. Samples already in the manifest are skipped, so an
    interrupted run continues where it stopped -- but only if they were made as this run would make
    them (same prompt, seed, model and settings); otherwise a ValueError names the first differing
    field. Several processes may write one folder: each holds ``.manifest.lock`` while it works, so the
    second waits and then finds the first's samples (never a duplicate row).

    Under several processes (``accelerate launch``; ``shard`` defaults to :func:`~flowalign.sharding.current_shard`)
    each process samples its own batches (batch ``b`` of the one-process run goes to rank ``b mod N``),
    appends them to ``manifest.rank<r>.jsonl`` and, after a barrier, the main process merges the parts
    into the manifest: the files and manifest equal a one-process run's. A part left by a killed process
    counts as done and is merged by the next run. Images are written as PNG,
    videos as MP4 and GIF. ``transforms_factory(prompts)`` builds velocity transforms for each batch's
    prompts (reward guidance conditions on them); ``velocity_transforms`` apply to every batch as they are.
    ``images`` (one file per prompt) are the condition images of image-conditioned families, recorded
    in each row's ``"image"``.

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
    conditions = _conditions(jobs, prompts, images, settings.samples_per_prompt)
    record = {k: v for k, v in asdict(settings).items() if k not in ("seed", "extra")} | settings.extra
    shard = shard or current_shard()
    run = dict(model_name=model_name, family=model.family, record=record)
    options = dict(
        batch_size=batch_size, model_name=model_name, velocity_transforms=velocity_transforms,
        transforms_factory=transforms_factory, progress=progress and shard.is_main, conditions=conditions,
    )  # fmt: skip
    if not shard.sharded:
        with exclusive_lock(out_dir / LOCK):  # held for the whole run: a second writer waits, then resumes
            repair_tail(manifest)  # else the first new row would be glued to a line cut by a kill
            todo = _todo(manifest, jobs, shard, batch_size, run)
            written = _run_jobs(model, todo, out_dir, manifest, settings, record, **options)
            merge_parts(manifest, _by_id)  # parts left by a killed multi-process run: counted done above
        return written
    error, written = None, []
    try:
        with writing_part(manifest, shard) as part:
            with exclusive_lock(out_dir / LOCK):  # only while reading: a merge cannot move rows meanwhile
                repair_tail(manifest)
                todo = _todo(manifest, jobs, shard, batch_size, run)
            written = _run_jobs(model, todo, out_dir, part, settings, record, **options)
    except Exception as err:  # noqa: BLE001 - shared with the other processes, then raised on all
        error = err
    finish(manifest, shard, out_dir / LOCK, _by_id, error=error)
    return sorted((row for rows in shard.gather(written) for row in rows), key=_by_id)


def _conditions(
    jobs: list, prompts: list[str], images: list | None, per_prompt: int
) -> dict[str, str] | None:
    """Sample id -> its prompt's condition image file (None without images)."""
    if images is None:
        return None
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} condition images for {len(prompts)} prompts")
    per_sample = [str(image) for image in images for _ in range(per_prompt)]
    return {job[0]: image for job, image in zip(jobs, per_sample, strict=True)}


def _by_id(row: dict) -> str:
    return str(row["id"])


def _todo(
    manifest: Path, jobs: list[tuple[str, str, int]], shard: Shard, batch_size: int, run: dict
) -> list[tuple[str, str, int]]:
    """This process's jobs not yet in the manifest or a part (after checking those were made alike)."""
    rows = done_rows(manifest)
    _check_resume(manifest, rows, jobs, **run)
    done = {row["id"] for row in rows}
    return [job for i, job in enumerate(jobs) if shard.owns(i, batch_size) and job[0] not in done]


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
    sink_path: Path,
    settings: GenerationSettings,
    record: dict,
    *,
    batch_size: int,
    model_name: str,
    velocity_transforms: list[VelocityTransform] | None,
    transforms_factory: Callable[[list[str]], list[VelocityTransform]] | None,
    progress: bool,
    conditions: dict[str, str] | None = None,
) -> list[dict]:
    """Sample the jobs in batches, saving each file and appending its row to ``sink_path`` (the manifest or
    this process's part) as soon as the file exists."""
    pipeline = FlowPipeline(model)
    written: list[dict] = []
    bar = tqdm(total=len(todo), desc="generating", unit="sample", disable=not progress)
    with sink_path.open("a") as sink:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            generators = [torch.Generator(model.device).manual_seed(seed) for _, _, seed in chunk]
            image = None if conditions is None else [_open_image(conditions[i]) for i, _, _ in chunk]
            out = pipeline(
                [p for _, p, _ in chunk],
                image=image,
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
                + (_batch_transforms(transforms_factory, [p for _, p, _ in chunk], image)),
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
                if conditions is not None:
                    row["image"] = conditions[sample_id]
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


def _open_image(path: str):
    """A condition image file as an RGB PIL image (errors name the file)."""
    import PIL.Image

    try:
        with PIL.Image.open(path) as image:
            return image.convert("RGB")
    except OSError as err:
        raise ValueError(f"cannot read condition image {path}: {err}") from None


def _batch_transforms(factory, prompts: list[str], images: list | None) -> list[VelocityTransform]:
    """``factory(prompts)``, or ``factory(prompts, images)`` for a batch with condition images."""
    if factory is None:
        return []
    return factory(prompts) if images is None else factory(prompts, images)
