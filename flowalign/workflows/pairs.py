"""Build preference data from a model: sample K candidates per prompt, score them, keep pairs.

This is how users without human labels get Flow-DPO data (the released Flow-DPO code and
VideoAlign build pairs the same way: best vs worst of a group ranked by a reward). The scored
candidates are kept too: they are Flow-RWR's training set.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flowalign.data.errors import DataError
from flowalign.data.media import atomic_write
from flowalign.models.base import FlowModel
from flowalign.pipelines.text_to_media import FlowPipeline
from flowalign.rewards.combine import NORM_SUFFIX
from flowalign.sharding import Shard, current_shard
from flowalign.workflows.candidates import (
    CANDIDATES,
    PAIRS_CONFIG,
    VIDEO_EXTS,
    Candidates,
    PairsConfig,
    candidate_settings,
    quantize_to_uint8_grid,
    sample_and_score,
    sample_batch,
)

__all__ = [
    "CANDIDATES",
    "PAIRS",
    "PAIRS_CONFIG",
    "VIDEO_EXTS",
    "Candidates",
    "PairsConfig",
    "build_pairs",
    "choose_pairs",
    "quantize_to_uint8_grid",
    "read_candidate_scores",
    "rechoose_pairs",
    "sample_candidates",
    "write_pairs_jsonl",
]

PAIRS = "pairs.jsonl"


@torch.no_grad()
def sample_candidates(
    model: FlowModel, prompts: list[str], config: PairsConfig, *, progress: bool = True
) -> Candidates:
    """K samples per prompt (prompt-major order), each with its own seeded generator.

    The media are rounded to the 8-bit grid the files store, so scores computed on them are the
    scores of the lossless files (PNG, ``.npy``) and a dataset read back trains on the same pixels.
    """
    if not prompts:
        raise ValueError("no prompts to build pairs from")
    k = config.num_candidates
    jobs = [(p, config.seed + i * k + j) for i, p in enumerate(prompts) for j in range(k)]
    pipe = FlowPipeline(model)
    media = [
        sample_batch(pipe, jobs[start : start + config.batch_size], config)
        for start in tqdm(range(0, len(jobs), config.batch_size), desc="candidates", disable=not progress)
    ]
    return Candidates(
        prompts=[p for p, _ in jobs], seeds=[s for _, s in jobs], media=torch.cat(media), scores={}
    )


def choose_pairs(overall: Tensor, num_candidates: int, *, mode: str = "best_worst", margin: float = 0.0):
    """Indices (winner, loser) into prompt-major candidates, and the number of skipped ties."""
    pairs, ties = [], 0
    for g in range(len(overall) // num_candidates):
        idx = list(range(g * num_candidates, (g + 1) * num_candidates))
        r = overall[idx]
        if mode == "best_worst":
            w, l_ = idx[int(r.argmax())], idx[int(r.argmin())]
            if float(overall[w] - overall[l_]) > margin:
                pairs.append((w, l_))
            else:
                ties += 1
            continue
        for a, b in itertools.combinations(idx, 2):
            diff = float(overall[a] - overall[b])
            if abs(diff) > margin:
                pairs.append((a, b) if diff > 0 else (b, a))
            else:
                ties += 1
    return pairs, ties


def build_pairs(
    model: FlowModel,
    prompts: list[str],
    score_fn,
    out_dir: str | Path,
    config: PairsConfig,
    *,
    progress: bool = True,
    shard: Shard | None = None,
    images: list | None = None,
) -> tuple[Candidates, list[tuple[int, int]]]:
    """Sample, score (``score_fn(media, prompts) -> {dim: [N], "overall": [N]}``), pick pairs, write files.

    Writes ``out_dir/candidates/*.png|mp4|npy`` + ``candidates.jsonl`` (every candidate with its scores,
    Flow-RWR's data) as they are made, then ``pairs.jsonl`` (a preference dataset
    ``load_preference_dataset`` reads) whose rows point at the candidate files, and ``pairs_config.json``.
    An interrupted run resumes from the candidates on disk; a folder made with other settings is refused
    (:mod:`flowalign.workflows.candidates`). Under several processes (``accelerate launch``) each samples
    its own batches and every process returns the same result. ``images`` (one file per prompt): the
    condition images of an image-conditioned family; each pair's row names its prompt's (``"image"``).

    Returns:
        The candidates (media read from their files when asked for) and the chosen (winner, loser) indices.

    Raises:
        ValueError: no prompts, a candidate folder made with other settings, or no pair over the margin
            (the candidates stay on disk: the message names their file, ``rechoose_pairs`` reads them).
    """
    if not prompts:
        raise ValueError("no prompts to build pairs from")
    out_dir = Path(out_dir)
    shard = shard or current_shard()
    rows = sample_and_score(
        model, list(prompts), score_fn, out_dir, config, shard, progress=progress, images=images
    )
    expected = len(prompts) * config.num_candidates
    if len(rows) != expected or [r["id"] for r in rows] != list(range(expected)):
        raise DataError(out_dir / CANDIDATES, f"{len(rows)} candidates on disk, expected ids 0..{expected - 1}; "
                        "another process may still be writing this folder: run again when it is done")  # fmt: skip
    cand = Candidates.from_rows(rows, out_dir)
    chosen, ties = choose_pairs(
        cand.scores["overall"], config.num_candidates, mode=config.mode, margin=config.margin
    )
    settings = candidate_settings(model, score_fn, config, len(prompts))
    if shard.is_main:
        files = [r["file"] for r in rows]
        if chosen:
            conditions = [r.get("image") for r in rows] if images is not None else None
            write_pairs_jsonl(
                out_dir / PAIRS, cand.prompts, files, cand.scores["overall"], chosen, conditions=conditions
            )
        else:
            (out_dir / PAIRS).unlink(missing_ok=True)  # an older run's pairs would not match this record
        record = {**settings, **asdict(config), "num_pairs": len(chosen), "ties_skipped": ties}
        with atomic_write(out_dir / PAIRS_CONFIG) as tmp:
            tmp.write_text(json.dumps(record, indent=2))
    shard.barrier()
    if not chosen:
        raise DataError(
            out_dir / CANDIDATES,
            f"no pairs: all {ties} candidate groups were ties within margin {config.margin}; the "
            f"{len(rows)} scored candidates are kept here (choose again with 'flowalign rechoose' or re-run "
            "with a smaller margin: nothing is sampled again)",
        )
    return cand, chosen


def write_pairs_jsonl(
    path: Path,
    prompts: list[str],
    files: list[str],
    overall: Tensor,
    chosen: list[tuple[int, int]],
    *,
    conditions: list[str | None] | None = None,
) -> None:
    """A preference jsonl whose rows point at the candidates' own files (winner = A), written atomically;
    with ``conditions`` (per candidate) each row names the pair's shared condition image."""
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as sink:
        for w, l_ in chosen:
            record = {
                "prompt": prompts[w],
                "path_A": files[w],
                "path_B": files[l_],
                "label": "A",
                **({} if conditions is None else {"image": conditions[w]}),
                "meta": {
                    "candidate_w": w,
                    "candidate_l": l_,
                    "reward_w": float(overall[w]),
                    "reward_l": float(overall[l_]),
                },
            }
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_candidate_scores(folder: str | Path) -> tuple[list[dict], int]:
    """The rows of ``folder/candidates.jsonl`` and K, as :func:`build_pairs` wrote them.

    Raises:
        DataError: a missing file, a line that is not JSON or lacks ``prompt``/``file``/``scores``,
            rows out of order, or a row count that is not a multiple of K (naming file and line).
    """
    folder = Path(folder)
    config_path, jsonl = folder / PAIRS_CONFIG, folder / CANDIDATES
    for path in (config_path, jsonl):
        if not path.is_file():
            raise DataError(path, "not found: give a folder written by 'flowalign pairs'")
    try:
        k = int(json.loads(config_path.read_text())["num_candidates"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(config_path, f"cannot read num_candidates ({exc})") from None
    rows = []
    for number, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(jsonl, f"not JSON ({exc.msg})", where=where) from None
        missing = [key for key in ("prompt", "file", "scores") if key not in row]
        if missing:
            raise DataError(jsonl, f"missing {missing}", where=where)
        if row.get("id", len(rows)) != len(rows):
            raise DataError(jsonl, f"id {row.get('id')} out of order (expected {len(rows)})", where=where)
        rows.append(row)
    if not rows or len(rows) % k:
        raise DataError(jsonl, f"{len(rows)} candidates is not a positive multiple of K = {k}")
    return rows, k


def rechoose_pairs(
    folder: str | Path,
    weights: dict[str, float],
    *,
    filename: str,
    mode: str = "best_worst",
    margin: float = 0.0,
    overwrite: bool = False,
) -> tuple[Path, list[tuple[int, int]]]:
    """Choose pairs again from candidates :func:`build_pairs` sampled and scored, with new weights.

    Sampling is the expensive part of building pairs; ranking is not. The stored per-dimension
    scores are mixed again,

        overall_i = sum_d w_d * s_{i,d}    (s_{i,d}: the normalised "d_norm" when stored, else "d"),

    pairs are chosen as :func:`choose_pairs` does, and ``folder/filename`` is written: a preference
    jsonl (:func:`~flowalign.data.preference.load_preference_dataset` reads it) whose rows point at
    the candidates' own files, so nothing is copied or re-encoded. The choice is recorded in
    ``folder/<stem>_choice.json``.

    Args:
        folder: a folder written by :func:`build_pairs` (``candidates.jsonl``, ``pairs_config.json``).
        weights: ``{dimension: weight}``, e.g. ``{"ta": 1.0}`` to rank by text alignment alone.
        filename: the new jsonl's name inside ``folder``.
        mode: ``"best_worst"`` or ``"all"`` (every pair over the margin).
        margin: minimum gap in ``overall`` for a pair.
        overwrite: replace an existing ``filename`` (otherwise refuse).

    Returns:
        The jsonl's path and the (winner, loser) candidate indices.

    Raises:
        FileExistsError: ``filename`` exists and ``overwrite`` is False.
        DataError: as :func:`read_candidate_scores`, a dimension no candidate row has (naming the line
            and the dimensions it has), or no pair over the margin.
    """
    folder = Path(folder)
    target = folder / filename
    if target.suffix != ".jsonl" or target.parent != folder or target.name == CANDIDATES:
        raise ValueError(
            f"filename must be a plain name ending in .jsonl (not {CANDIDATES}), got {filename!r}"
        )
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    if not weights:
        raise ValueError("give at least one dimension weight, e.g. {'ta': 1.0}")
    PairsConfig(num_candidates=2, mode=mode, margin=margin)  # validates mode and margin
    rows, k = read_candidate_scores(folder)
    overall = torch.zeros(len(rows), dtype=torch.float64)
    for i, row in enumerate(rows):
        for dim, weight in weights.items():
            value = row["scores"].get(dim + NORM_SUFFIX, row["scores"].get(dim))
            if value is None:
                raise DataError(
                    folder / CANDIDATES,
                    f"no score {dim!r}; the candidates have {sorted(row['scores'])}",
                    where=f"line {i + 1}",
                )
            overall[i] += weight * float(value)
    chosen, ties = choose_pairs(overall, k, mode=mode, margin=margin)
    if not chosen:
        raise DataError(
            folder / CANDIDATES, f"no pairs: all {ties} candidate pairs were ties within {margin}"
        )
    write_pairs_jsonl(target, [r["prompt"] for r in rows], [r["file"] for r in rows], overall, chosen)
    choice = {
        "weights": weights,
        "mode": mode,
        "margin": margin,
        "num_pairs": len(chosen),
        "ties_skipped": ties,
    }
    (folder / f"{target.stem}_choice.json").write_text(json.dumps(choice, indent=2))
    return target, chosen
