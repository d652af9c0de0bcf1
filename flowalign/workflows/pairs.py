"""Build preference data from a model: sample K candidates per prompt, score them, keep pairs.

This is how users without human labels get Flow-DPO data (the released Flow-DPO code and
VideoAlign build pairs the same way: best vs worst of a group ranked by a reward). The scored
candidates are kept too: they are Flow-RWR's training set.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flowalign.data.errors import DataError
from flowalign.data.media import atomic_write, save_media
from flowalign.models.base import FlowModel
from flowalign.pipelines.text_to_media import FlowPipeline
from flowalign.rewards.combine import NORM_SUFFIX

CANDIDATES = "candidates.jsonl"
PAIRS = "pairs.jsonl"
PAIRS_CONFIG = "pairs_config.json"
VIDEO_EXTS = (".mp4", ".npy")


@dataclass
class PairsConfig:
    """How candidates are sampled and pairs chosen."""

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

    def __post_init__(self) -> None:
        if self.num_candidates < 2:
            raise ValueError(f"num_candidates must be >= 2 to form pairs, got {self.num_candidates}")
        if self.mode not in ("best_worst", "all"):
            raise ValueError(f"mode must be 'best_worst' or 'all', got {self.mode!r}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        if self.video_ext not in VIDEO_EXTS:
            raise ValueError(f"video_ext must be one of {VIDEO_EXTS}, got {self.video_ext!r}")


@dataclass
class Candidates:
    """Scored samples: K per prompt, grouped consecutively."""

    prompts: list[str]
    seeds: list[int]
    media: Tensor
    scores: dict[str, Tensor]
    """Per dimension [N], including "overall" (the weighted total used for ranking)."""


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
    media = []
    for start in tqdm(range(0, len(jobs), config.batch_size), desc="candidates", disable=not progress):
        chunk = jobs[start : start + config.batch_size]
        out = pipe(
            [p for p, _ in chunk],
            generator=[torch.Generator().manual_seed(s) for _, s in chunk],
            guidance_scale=config.guidance_scale,
            num_inference_steps=config.num_inference_steps,
        )
        media.append(quantize_to_uint8_grid(out.media.float().cpu()))
    return Candidates(
        prompts=[p for p, _ in jobs], seeds=[s for _, s in jobs], media=torch.cat(media), scores={}
    )


def quantize_to_uint8_grid(media: Tensor) -> Tensor:
    """round(255 x) / 255: the values an 8-bit file holds (what ``save_media`` writes)."""
    return (media.clamp(0.0, 1.0) * 255.0).round() / 255.0


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
) -> tuple[Candidates, list[tuple[int, int]]]:
    """Sample, score (``score_fn(media, prompts) -> {dim: [N], "overall": [N]}``), pick pairs, write files.

    Writes ``out_dir/candidates/*.png|mp4|npy`` + ``candidates.jsonl`` (every candidate with its scores,
    Flow-RWR's data) and ``pairs.jsonl`` (a preference dataset ``load_preference_dataset`` reads)
    whose rows point at the candidate files. Returns the candidates and the chosen (winner, loser)
    indices.
    """
    out_dir = Path(out_dir)
    cand = sample_candidates(model, prompts, config, progress=progress)
    scores = score_fn(cand.media, cand.prompts)
    if "overall" not in scores:
        raise ValueError(f"score_fn must return an 'overall' score to rank by; got {sorted(scores)}")
    cand.scores = {k: v.detach().float().cpu() for k, v in scores.items()}
    chosen, ties = choose_pairs(
        cand.scores["overall"], config.num_candidates, mode=config.mode, margin=config.margin
    )
    if not chosen:
        raise ValueError(f"no pairs: all {ties} candidate groups were ties within margin {config.margin}")
    ext = config.video_ext if cand.media.ndim == 5 else ".png"
    files = [f"candidates/{i:06d}{ext}" for i in range(len(cand.prompts))]
    (out_dir / "candidates").mkdir(parents=True, exist_ok=True)
    with atomic_write(out_dir / CANDIDATES) as tmp, open(tmp, "w") as sink:
        for i, (prompt, seed, name) in enumerate(zip(cand.prompts, cand.seeds, files, strict=True)):
            save_media(cand.media[i], out_dir / name)
            row = {
                "id": i,
                "prompt": prompt,
                "seed": seed,
                "file": name,
                "scores": {k: float(v[i]) for k, v in cand.scores.items()},
            }
            sink.write(json.dumps(row) + "\n")
    write_pairs_jsonl(out_dir / PAIRS, cand.prompts, files, cand.scores["overall"], chosen)
    (out_dir / PAIRS_CONFIG).write_text(
        json.dumps({**asdict(config), "num_pairs": len(chosen), "ties_skipped": ties}, indent=2)
    )
    return cand, chosen


def write_pairs_jsonl(
    path: Path, prompts: list[str], files: list[str], overall: Tensor, chosen: list[tuple[int, int]]
) -> None:
    """A preference jsonl whose rows point at the candidates' own files (winner = A), written atomically."""
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as sink:
        for w, l_ in chosen:
            record = {
                "prompt": prompts[w],
                "path_A": files[w],
                "path_B": files[l_],
                "label": "A",
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
