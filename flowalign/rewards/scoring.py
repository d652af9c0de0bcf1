"""Score media files with reward models into ``scores.jsonl`` (the library behind ``flowalign score``).

Inputs, one of:

- a ``manifest.jsonl`` (lines ``{"id", "prompt", "file", ...}``, ``file`` relative to the
  manifest's folder), or a folder holding one (what ``flowalign generate`` writes);
- a folder of media files (ids = file names, sorted) plus a prompt list;
- a list of files (ids = the paths as given) plus a prompt list.

Output: one JSON line per item, ``{"id", "file", "prompt", "rewards", <dim>..., <dim>_norm...,
"overall"}`` (``rewards`` = the reward names, checked when a run resumes),
written and flushed batch by batch. A re-run skips ids already in the file, so an interrupted run
continues where it stopped and nothing written is lost. With a ``.parquet`` ``out``, lines go to
``<out>.partial.jsonl`` first and the parquet file is written (atomically) at the end.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from flowalign.data.paths import resolve_data_path
from flowalign.files import exclusive_lock, first_difference
from flowalign.rewards.base import RewardInputError
from flowalign.rewards.batches import batches as _batches
from flowalign.rewards.batches import prefetch as _prefetch
from flowalign.rewards.combine import RewardCombiner
from flowalign.rewards.registry import available_rewards, load_reward
from flowalign.rewards.remote import RemoteRewardError
from flowalign.sharding import (
    OtherProcessFailed,
    Shard,
    current_shard,
    done_rows,
    finish,
    local_device,
    merge_parts,
    repair_tail,
    writing_part,
)
from flowalign.validation import short_repr

__all__ = ["MediaItem", "ScoreResult", "read_score_rows", "resolve_media", "score_files"]

MANIFEST_NAME = "manifest.jsonl"


@dataclass(frozen=True)
class MediaItem:
    """One thing to score: its id, file and prompt (None for prompt-free scoring)."""

    id: str
    file: Path
    prompt: str | None


@dataclass
class ScoreResult:
    """What :func:`score_files` did.

    Attributes:
        out: the scores file.
        rows: every row of the file for the requested items, in input order.
        num_scored: items scored by this call.
        num_skipped: items found already scored in ``out``.
        dimensions: raw score keys, in reward order.
    """

    out: Path
    rows: list[dict[str, Any]]
    num_scored: int
    num_skipped: int
    dimensions: tuple[str, ...] = field(default_factory=tuple)

    def means(self) -> dict[str, float]:
        """Mean of every numeric column over ``rows`` (raw, normalised and overall)."""
        keys = [k for k in self.rows[0] if isinstance(self.rows[0][k], int | float)] if self.rows else []
        return {k: sum(float(r[k]) for r in self.rows) / len(self.rows) for k in keys}


def _media_extensions() -> frozenset[str]:
    from flowalign.data.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

    return IMAGE_EXTENSIONS | VIDEO_EXTENSIONS


def _read_manifest(path: Path) -> list[MediaItem]:
    items: list[MediaItem] = []
    seen: set[str] = set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {number} is not valid JSON ({err})") from err
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {number} must be a JSON object, got {type(row).__name__}")
        missing = [k for k in ("id", "prompt", "file") if k not in row]
        if missing:
            raise ValueError(f"{path}: line {number} lacks key(s) {missing} (needs 'id', 'prompt', 'file')")
        item_id, prompt = str(row["id"]), row["prompt"]
        if not isinstance(prompt, str):
            raise ValueError(f"{path}: line {number}: 'prompt' must be a string, got {type(prompt).__name__}")
        if item_id in seen:
            raise ValueError(f"{path}: line {number}: id {item_id!r} appears twice")
        seen.add(item_id)
        # Confined like training data (flowalign.data.paths): no '..', nothing absolute outside the folder.
        file = resolve_data_path(path.parent, row["file"], source=path, where=f"line {number}", key="file")
        items.append(MediaItem(item_id, file, prompt))
    if not items:
        raise ValueError(f"{path}: the manifest has no rows")
    return items


def resolve_media(
    media: Sequence[str | os.PathLike[str]] | Sequence[MediaItem] | str | os.PathLike[str],
    prompts: Sequence[str] | None = None,
) -> list[MediaItem]:
    """Turn a manifest, a folder or a file list (plus prompts) into :class:`MediaItem` s.

    A manifest's ``file`` values are relative to its folder and confined to it (no ``..``, no absolute
    path outside it: :func:`flowalign.data.paths.resolve_data_path`, the rule of the training loaders).
    A list of :class:`MediaItem` (built by the caller, e.g. the eval runner) is taken as it is.

    Raises:
        ValueError: an empty input, a malformed manifest (naming file and line), prompts given
            together with a manifest, duplicate ids, or a prompt count different from the media
            count (both counts named).
    """
    if isinstance(media, str | os.PathLike):
        path = Path(media)
        manifest = path / MANIFEST_NAME if path.is_dir() and (path / MANIFEST_NAME).is_file() else path
        if manifest.suffix == ".jsonl":
            if not manifest.is_file():
                raise FileNotFoundError(f"manifest not found: {manifest}")
            if prompts is not None:
                raise ValueError(
                    f"{manifest}: prompts come from the manifest; do not also pass a prompt list"
                )
            return _read_manifest(manifest)
        if path.is_dir():
            exts = _media_extensions()
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in exts)
            if not files:
                raise ValueError(f"{path}: no media files (extensions {sorted(exts)}) in this folder")
            pairs = [(p.name, p) for p in files]
        else:
            pairs = [(str(path), path)]
    elif media and all(isinstance(m, MediaItem) for m in media):
        if prompts is not None:
            raise ValueError("media items carry their prompts; do not also pass a prompt list")
        ids = [m.id for m in media]
        if len(set(ids)) != len(ids):
            raise ValueError(
                f"media id {next(i for i in ids if ids.count(i) > 1)!r} appears twice in the input"
            )
        return list(media)
    else:
        pairs = [(str(p), Path(p)) for p in media]
        if not pairs:
            raise ValueError("no media given: the media list is empty")
    if prompts is not None:
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings, not a single string")
        if len(prompts) != len(pairs):
            raise ValueError(f"got {len(prompts)} prompts for {len(pairs)} media files; they must match")
    ids = [item_id for item_id, _ in pairs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"media id {dup!r} appears twice in the input")
    return [
        MediaItem(item_id, file, None if prompts is None else str(prompts[i]))
        for i, (item_id, file) in enumerate(pairs)
    ]


def read_score_rows(path: str | Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Rows of a ``scores.jsonl`` (missing file: ``[]``).

    A last line without its newline is what an interrupted write leaves; it is dropped (and, with
    ``repair=True``, cut from the file so appending continues cleanly).

    Raises:
        ValueError: a complete line that is not a JSON object with an ``id`` (naming file and line).
    """
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    if text and not text.endswith("\n"):
        keep = text[: text.rfind("\n") + 1]
        if repair:
            with path.open("r+") as handle:
                handle.truncate(len(keep.encode()))
        text = keep
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {number} is not valid JSON ({err})") from err
        if not isinstance(row, dict) or "id" not in row:
            raise ValueError(f"{path}: line {number} is not a score row with an 'id'")
        rows.append(row)
    return rows


def _read_parquet_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:  # pragma: no cover - pyarrow ships with the [data] extra
        raise ImportError("writing .parquet scores needs pyarrow: pip install 'flowalign[data]'") from err
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, path)


def score_files(
    reward_names: Sequence[str],
    media: Sequence[str | os.PathLike[str]] | Sequence[MediaItem] | str | os.PathLike[str],
    prompts: Sequence[str] | None = None,
    weights: Mapping[str, float] | None = None,
    out: str | os.PathLike[str] = "scores.jsonl",
    *,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    reward_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    normalisation: Mapping[str, Sequence[float]] | None = None,
    max_frames: int | None = None,
    progress: bool = True,
    shard: Shard | None = None,
) -> ScoreResult:
    """Score media files with one or more rewards and write one row per item.

    Args:
        reward_names: registry names (``available_rewards()``), e.g. ``["pickscore", "hpsv2.1"]``.
        media: a manifest path, a folder (with a manifest, or of media files), or a list of files.
        prompts: one prompt per file for folders and lists; must be None with a manifest.
        weights: ``{dimension: w}`` for ``overall`` (see :class:`RewardCombiner`).
        out: ``.jsonl`` (appended incrementally) or ``.parquet`` (written at the end).
        batch_size: items per reward call (consecutive items of one shape are batched).
        device, dtype: where and in what precision the rewards run; media are moved there.
        reward_kwargs: per-reward loader options, ``{"pickscore": {"model": "/ckpt/pickscore"}}``.
        normalisation: ``{dimension: (mean, std)}`` for the ``_norm`` columns and ``overall``.
        max_frames: read at most this many frames per video.
        progress: show a progress bar.
        shard: this process's share of a multi-process run (default: from the launcher's environment,
            :func:`flowalign.sharding.current_shard`). Each process scores its blocks of ``batch_size``
            items into ``<out stem>.rank<r>.jsonl``; the main process merges them in input order, so
            the file equals a one-process run's. Every process returns all rows.

    Returns:
        A :class:`ScoreResult` with all rows for the requested items.

    Raises:
        ValueError: unknown reward name (listing the known ones), prompt/media count mismatch,
            a weight for a dimension no reward provides, an existing ``out`` scored with other
            rewards, or unreadable media (``MediaError`` naming the file).
    """
    from flowalign.data.media import MediaError

    names = list(dict.fromkeys(reward_names))
    if not names:
        raise ValueError("no reward names given")
    unknown = [n for n in names if n not in available_rewards()]
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; available rewards: {', '.join(available_rewards())}")
    extra = set(reward_kwargs or {}) - set(names)
    if extra:
        raise ValueError(f"reward_kwargs given for reward(s) {sorted(extra)} that are not being loaded")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    items = resolve_media(media, prompts)
    missing = [item.file for item in items if not item.file.is_file()]
    if missing:
        raise MediaError(
            missing[0], f"file does not exist ({len(missing)} of {len(items)} media files are missing)"
        )

    shard = shard or current_shard()
    device = local_device(str(device))  # "cuda" -> this process's GPU under several processes
    progress = progress and shard.is_main
    rewards, error = [], None
    try:
        rewards = [
            load_reward(n, device=device, dtype=dtype, **dict((reward_kwargs or {}).get(n, {})))
            for n in names
        ]
    except Exception as err:  # noqa: BLE001 - under several processes, all stop here together
        error = err
    message = shard.first_error(error) if shard.sharded else None
    if error is not None:
        raise error
    if message is not None:
        raise OtherProcessFailed(message)
    if any(r.needs_prompts for r in rewards) and any(item.prompt is None for item in items):
        needy = [r.name for r in rewards if r.needs_prompts]
        raise ValueError(f"reward(s) {needy} need prompts; pass one prompt per media file or a manifest")
    combiner = RewardCombiner(rewards, weights, normalisation)
    columns = [*combiner.dimensions]

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    is_parquet = out.suffix == ".parquet"
    sink_path = out.with_name(out.name + ".partial.jsonl") if is_parquet else out
    settings = {
        "weights": dict(weights) if weights else None,
        "normalisation": {k: list(v) for k, v in normalisation.items()} if normalisation else None,
        "reward_options": {k: dict(v) for k, v in reward_kwargs.items()} if reward_kwargs else None,
        "max_frames": max_frames,
        "dtype": str(dtype).removeprefix("torch."),
    }
    settings = json.loads(json.dumps(settings, default=str))  # as the rows record it
    job = _Job(items, combiner, sink_path, names, settings, batch_size, device, max_frames, progress)
    lock = out.with_name(f".{out.name}.lock")
    if shard.sharded:
        num_scored, num_skipped = _score_sharded(job, shard, lock, out if is_parquet else None)
        merged = (_read_parquet_rows(out) if is_parquet else []) + read_score_rows(sink_path)
        all_rows = {str(r["id"]): r for r in merged}
    else:
        with exclusive_lock(lock):  # one writer of ``out`` at a time; a second waits, then resumes
            existing = _done(job, out if is_parquet else None)
            todo = [item for item in items if item.id not in {str(row["id"]) for row in existing}]
            new_rows = _score_todo(todo, job, sink_path)
            merge_parts(sink_path, job.order)  # parts left by a killed multi-process run: counted done above
            all_rows = {str(r["id"]): r for r in [*existing, *new_rows]}
            if is_parquet:
                _write_parquet(out, list(all_rows.values()))
                sink_path.unlink(missing_ok=True)
        num_scored, num_skipped = len(new_rows), len(items) - len(todo)
    rows = [all_rows[item.id] for item in items]
    return ScoreResult(out, rows, num_scored, num_skipped, tuple(columns))


@dataclass
class _Job:
    """What one :func:`score_files` call scores, and how."""

    items: list[MediaItem]
    combiner: RewardCombiner
    sink_path: Path
    names: list[str]
    settings: dict
    batch_size: int
    device: str | torch.device
    max_frames: int | None
    progress: bool

    def order(self, row: dict[str, Any]) -> tuple[int, str]:
        """Input order of a row's id (the order a one-process run writes), unknown ids last."""
        if not hasattr(self, "_position"):
            self._position = {item.id: i for i, item in enumerate(self.items)}
        return (self._position.get(str(row["id"]), len(self.items)), str(row["id"]))


def _done(job: _Job, parquet: Path | None) -> list[dict[str, Any]]:
    """Rows already scored (the parquet file, the jsonl and its parts), checked against this run's
    rewards and settings. Call it holding the output's lock."""
    repair_tail(job.sink_path)  # a row cut by a kill is dropped, a whole one completed
    existing = (_read_parquet_rows(parquet) if parquet else []) + done_rows(job.sink_path)
    _check_existing(parquet or job.sink_path, existing, job.names, job.settings, job.items)
    return existing


def _score_sharded(job: _Job, shard: Shard, lock: Path, parquet: Path | None) -> tuple[int, int]:
    """Score this process's share (block ``b`` of ``batch_size`` items goes to rank ``b mod N``) into its
    part; the main process merges the parts (and writes the parquet file). Returns (scored, skipped)
    summed over the processes."""
    error, counts = None, (0, 0)
    try:
        with writing_part(job.sink_path, shard) as part:
            with exclusive_lock(lock):
                done = {str(row["id"]) for row in _done(job, parquet)}
            mine = [item for i, item in enumerate(job.items) if shard.owns(i, job.batch_size)]
            todo = [item for item in mine if item.id not in done]
            counts = (len(_score_todo(todo, job, part, total=len(job.items))), len(mine) - len(todo))
    except Exception as err:  # noqa: BLE001 - shared with the other processes, then raised on all
        error = err

    def write_parquet() -> None:
        if parquet is not None and job.sink_path.exists():
            rows = {str(r["id"]): r for r in _read_parquet_rows(parquet) + read_score_rows(job.sink_path)}
            _write_parquet(parquet, list(rows.values()))
            job.sink_path.unlink()

    finish(job.sink_path, shard, lock, job.order, error=error, then=write_parquet)
    totals = shard.gather(counts)
    return sum(c[0] for c in totals), sum(c[1] for c in totals)


def _check_existing(
    out: Path, existing: list[dict[str, Any]], names: list[str], settings: dict, items: Sequence[MediaItem]
) -> None:
    """Raise ValueError unless every row already in ``out`` was scored as this run would score it: the
    same rewards and settings (weights, normalisation, reward options, frames, dtype), and, for the ids
    this run asks for, the same prompt. Rows written before settings were recorded are not checked."""
    prompts = {item.id: item.prompt for item in items}
    for row in existing:
        if row.get("rewards") != names:
            raise ValueError(
                f"{out}: row {row['id']!r} was scored with rewards {row.get('rewards')}, not {names}; "
                f"write to another file or delete it to rescore"
            )
        recorded = {"prompt": row.get("prompt"), "settings": row["settings"]} if "settings" in row else None
        if recorded is None:
            continue
        wanted = {"prompt": prompts.get(str(row["id"]), row.get("prompt")), "settings": settings}
        diff = first_difference(recorded, wanted)
        if diff is not None:
            key, old, new = diff
            raise ValueError(
                f"{out}: row {row['id']!r} was scored with {key}={short_repr(old)}, but this run has "
                f"{key}={short_repr(new)}; write to another file (or delete this one) to score with other settings"
            )


def _score_todo(
    todo: list[MediaItem], job: _Job, sink_path: Path, total: int | None = None
) -> list[dict[str, Any]]:
    """Score ``todo`` batch by batch, appending (and flushing) each batch's rows to ``sink_path``."""
    total = len(job.items) if total is None else total
    bar = tqdm(total=total, initial=total - len(todo), desc="scoring", unit="item", disable=not job.progress)
    new_rows: list[dict[str, Any]] = []
    with sink_path.open("a") as sink:
        for batch_items, batch in _batches(
            _prefetch(todo, max_frames=job.max_frames, depth=2 * job.batch_size), job.batch_size
        ):
            batch_prompts = None if batch_items[0].prompt is None else [i.prompt for i in batch_items]
            try:
                scores = job.combiner.score(batch.to(job.device), batch_prompts, batch_size=job.batch_size)
            except (RewardInputError, RemoteRewardError) as err:  # name the files of the batch
                files = ", ".join(str(i.file) for i in batch_items[:3])
                raise type(err)(f"{files}{' ...' if len(batch_items) > 3 else ''}: {err}") from err
            values = {k: v.detach().cpu().tolist() for k, v in scores.items()}
            for j, item in enumerate(batch_items):
                row = {"id": item.id, "file": str(item.file), "prompt": item.prompt, "rewards": job.names}
                row.update({k: float(v[j]) for k, v in values.items()})
                row["settings"] = job.settings
                sink.write(json.dumps(row) + "\n")
                new_rows.append(row)
            sink.flush()
            bar.update(len(batch_items))
    bar.close()
    return new_rows
