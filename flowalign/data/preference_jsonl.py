"""Write preference pairs as media files plus a pairs.jsonl that
:func:`flowalign.data.preference.load_preference_dataset` reads, and stack pairs into a batch."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowalign.data.errors import DataError
from flowalign.data.media import MediaError, atomic_write, save_media
from flowalign.data.preference_labels import LABEL_L_BETTER, LABEL_MISSING, LABEL_TIE, LABEL_W_BETTER, OVERALL
from flowalign.data.preference_pair import PreferencePair

__all__ = ["collate_preference", "write_preference_jsonl"]


def collate_preference(pairs: Sequence[PreferencePair]) -> dict[str, Any]:
    """Stack pairs into a batch (use as a DataLoader ``collate_fn``).

    Args:
        pairs: B pairs with the same label dimensions and media of one shape.

    Returns:
        ``{"prompt": list[str], "media_w": [B, ...], "media_l": [B, ...],
        "labels": {dim: long [B] in {1 w better, 0 tie, -1 l better, -2 missing}},
        "source": list[str]}``, plus ``"condition"``: a list of [3, H, W] condition images when the
        pairs have them.

    Raises:
        ValueError: no pairs, different label dimensions, or media of different shapes
            (pass ``transform=`` to the dataset to resize), naming the offending rows.
    """
    if not pairs:
        raise ValueError("collate_preference got no pairs")
    dims = list(pairs[0].labels)
    shape = pairs[0].media_w.shape
    for p in pairs:
        if list(p.labels) != dims:
            raise ValueError(
                f"{p.source}: label dimensions {list(p.labels)} differ from {dims} ({pairs[0].source})"
            )
        for name, m in (("media_w", p.media_w), ("media_l", p.media_l)):
            if m.shape != shape:
                raise ValueError(
                    f"{p.source}: {name} has shape {tuple(m.shape)} but {pairs[0].source} media_w has "
                    f"{tuple(shape)}; resize with the dataset's transform="
                )
    batch = {
        "prompt": [p.prompt for p in pairs],
        "media_w": torch.stack([p.media_w for p in pairs]),  # [B, 3, H, W] or [B, T, 3, H, W]
        "media_l": torch.stack([p.media_l for p in pairs]),
        "labels": {d: torch.tensor([p.labels[d] for p in pairs], dtype=torch.long) for d in dims},
        "source": [p.source for p in pairs],
    }
    if any(p.condition is not None for p in pairs):  # image-conditioned data: one image per pair
        missing = next((p for p in pairs if p.condition is None), None)
        if missing is not None:
            raise ValueError(f"{missing.source}: no condition image, but other pairs of the batch have one")
        batch["condition"] = [p.condition for p in pairs]
    return batch


_LABEL_TEXT = {LABEL_W_BETTER: "A", LABEL_TIE: "tie", LABEL_L_BETTER: "B", LABEL_MISSING: None}


def write_preference_jsonl(
    out_dir: str | os.PathLike[str],
    rows: Iterable[PreferencePair | Mapping[str, Any]],
    *,
    filename: str = "pairs.jsonl",
    image_ext: str = ".png",
    video_ext: str = ".mp4",
    fps: float = 8,
    overwrite: bool = False,
) -> Path:
    """Write pairs as media files plus a jsonl that :func:`load_preference_dataset` reads.

    Each row becomes ``media/{i:06d}_A{ext}`` (= media_w), ``media/{i:06d}_B{ext}`` (= media_l)
    and a line ``{"prompt", "path_A", "path_B", "label"[, "meta"]}``; ``label`` is ``"A"``,
    ``"B"`` or ``"tie"`` for the single dimension ``"overall"``, else an object per dimension
    (missing = null). Media files are written atomically; the jsonl is written to a temporary
    name and renamed at the end, so it only appears once every row is written.

    Args:
        out_dir: output folder (created).
        rows: :class:`PreferencePair` objects or mappings with ``prompt``, ``media_w``,
            ``media_l`` and optionally ``labels`` (default ``{"overall": 1}``) and ``meta``
            (JSON-serialisable, e.g. rewards and seeds).
        filename: name of the jsonl inside ``out_dir``.
        image_ext: extension for [3, H, W] media (``.png`` is lossless).
        video_ext: extension for [T, 3, H, W] media (``.mp4`` lossy, ``.gif``, ``.npy`` exact).
        fps: frames per second for videos.
        overwrite: replace an existing jsonl (otherwise refuse).

    Returns:
        The path of the jsonl.

    Raises:
        FileExistsError: the jsonl exists and ``overwrite`` is False.
        DataError: a row with an empty prompt, bad labels, or media that cannot be saved;
            or no rows at all.
    """
    out_dir = Path(out_dir)
    jsonl = out_dir / filename
    if jsonl.exists() and not overwrite:
        raise FileExistsError(f"{jsonl} exists; pass overwrite=True to replace it")
    (out_dir / "media").mkdir(parents=True, exist_ok=True)
    count = 0
    with atomic_write(jsonl) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for i, row in enumerate(rows):
            where = f"row {i}"
            if isinstance(row, PreferencePair):
                prompt, media_w, media_l, labels, meta = (
                    row.prompt,
                    row.media_w,
                    row.media_l,
                    row.labels,
                    row.meta,
                )
            else:
                prompt, media_w, media_l = row.get("prompt"), row.get("media_w"), row.get("media_l")
                labels, meta = row.get("labels", {OVERALL: LABEL_W_BETTER}), row.get("meta", {})
            if not isinstance(prompt, str) or not prompt.strip():
                raise DataError(jsonl, f"prompt must be a non-empty string, got {prompt!r}", where=where)
            if not isinstance(media_w, Tensor) or not isinstance(media_l, Tensor):
                raise DataError(jsonl, "media_w and media_l must be tensors", where=where)
            bad = {k: v for k, v in labels.items() if v not in _LABEL_TEXT}
            if not labels or bad:
                raise DataError(
                    jsonl, f"labels must map dimensions to 1, 0, -1 or -2, got {dict(labels)}", where=where
                )
            record: dict[str, Any] = {"prompt": prompt.strip()}
            for key, media in (("path_A", media_w), ("path_B", media_l)):
                rel = f"media/{i:06d}_{key[-1]}{image_ext if media.ndim == 3 else video_ext}"
                try:
                    save_media(media, out_dir / rel, fps=fps)
                except MediaError as exc:
                    raise DataError(jsonl, f"{key}: {exc}", where=where) from exc
                record[key] = rel
            text = {k: _LABEL_TEXT[v] for k, v in labels.items()}
            record["label"] = text[OVERALL] if list(text) == [OVERALL] else text
            if meta:
                record["meta"] = dict(meta)
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
        fh.flush()
        if count == 0:
            raise DataError(jsonl, "no rows to write")
    return jsonl
