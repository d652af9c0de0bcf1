"""Turn collected samples and their scores into the numbers of ``report.json`` (used by the runner).

Per prompt set and model: per-dimension means with cluster-bootstrap 95% intervals (prompts are
resampled), pairwise win rates with ties on paired samples, score histograms on shared bins,
diversity (pixel distance, LPIPS when configured, toy attribute entropy), FID (toy features against
toy renders; Inception against a reference folder when configured) and, against a base model, paired
reward changes, drift and reward-hacking flags. Reward calibration against labelled pairs is
computed once per reward.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowalign.evals import diversity, fid, metrics
from flowalign.evals.kid import kernel_distance
from flowalign.evals.prompt_sets import PromptSet, spread_indices
from flowalign.evals.types import EvalOptions, Sample, digest, relative_path
from flowalign.files import atomic_write_json

__all__ = ["REPORT_FORMAT", "calibrate_rewards", "summarise_eval"]

REPORT_FORMAT = "flowalign.eval/1"
OVERALL = "overall"
NUM_BINS = 20


def _load(files: Sequence[Path]) -> Tensor:
    from flowalign.data.media import load_media

    return torch.stack([load_media(f) for f in files])


def _chunks(seq: Sequence, size: int):
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def _dimensions(rewards_info: Sequence[Mapping[str, Any]]) -> list[str]:
    dims: list[str] = []
    for info in rewards_info:
        dims += [d for d in info.get("dimensions", []) if d not in dims]
    return dims


def _add_overall(
    scores: dict[str, dict[str, float]], dims: list[str], weights: Mapping[str, float] | None, failures: list
) -> bool:
    """Add ``overall`` = sum_d w_d * z_d (z_d = the ``<d>_norm`` column) to every fully scored sample."""
    if len(dims) < 2:
        return False
    weights = dict(weights) if weights is not None else dict.fromkeys(dims, 1.0)
    unknown = [d for d in weights if d not in dims]
    if unknown:
        failures.append(
            {
                "stage": "overall",
                "error": f"weights name dimension(s) {unknown} that no reward scored; scored: {dims}",
            }
        )
        return False
    for row in scores.values():
        if all(f"{d}_norm" in row for d in weights):
            row[OVERALL] = sum(w * row[f"{d}_norm"] for d, w in weights.items())
    return True


def _histograms(values: Mapping[str, Tensor]) -> dict[str, Any]:
    """Counts on NUM_BINS equal bins shared by all models (the range of all their values)."""
    every = torch.cat([v for v in values.values() if v.numel()])
    lo, hi = float(every.min()), float(every.max())
    if hi <= lo:  # all values equal: a unit-wide range centred on them
        lo, hi = lo - 0.5, hi + 0.5
    edges = torch.linspace(lo, hi, NUM_BINS + 1, dtype=torch.float64)
    counts = {}
    for model, v in values.items():
        idx = torch.clamp(torch.bucketize(v.double(), edges[1:-1], right=True), 0, NUM_BINS - 1)
        counts[model] = torch.bincount(idx, minlength=NUM_BINS).tolist()
    return {"edges": edges.tolist(), "counts": counts}


def _paired(a: Sequence[Sample], b: Sequence[Sample]) -> list[tuple[Sample, Sample]]:
    by_key = {s.key: s for s in b}
    return [(s, by_key[s.key]) for s in a if s.key in by_key]


def _toy_vocab(is_video: bool) -> dict[str, tuple[str, ...]]:
    from flowalign.toy.world import COLOURS, MOTIONS, POSITIONS, SHAPES, SIZES

    vocab = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS}
    return vocab | ({"motion": MOTIONS} if is_video else {})


class _Extras:
    """Optional networks (LPIPS, Inception or CLIP + reference features), loaded once per evaluation."""

    def __init__(self, options: EvalOptions, failures: list) -> None:
        self.options, self.failures = options, failures
        self._lpips: Any = None
        self._references: dict[str, tuple[Any, Tensor]] = {}
        self.extractor_info: dict[str, dict[str, Any]] = {}
        self._failed: set[str] = set()

    @property
    def lpips(self):
        wanted = self.options.lpips_weights or self.options.lpips_random_backbone
        if self._lpips is None and wanted and "lpips" not in self._failed:
            try:
                self._lpips = diversity.load_lpips(
                    backbone_weights=self.options.lpips_weights,
                    random_backbone=self.options.lpips_random_backbone,
                    device=self.options.device,
                )
            except (ValueError, OSError) as err:
                self.failures.append({"stage": "lpips", "error": f"{type(err).__name__}: {err}"})
                self._failed.add("lpips")
        return self._lpips

    def reference(self, kind: str) -> tuple[Any, Tensor] | None:
        """(extractor, reference features) for ``"inception"`` (FID/KID) or ``"clip"`` (CLIP-FD), if configured."""
        opts = self.options
        spec = (
            opts.fid_weights if kind == "inception" else (opts.clip_fd_model and f"clip:{opts.clip_fd_model}")
        )
        if not (spec and opts.fid_reference) or kind in self._failed:
            return None
        if kind not in self._references:
            try:
                from flowalign.rewards.scoring import resolve_media

                extractor, self.extractor_info[kind] = fid.load_fid_extractor(spec, device=opts.device)
                files = [i.file for i in resolve_media(opts.fid_reference)]
                self._references[kind] = (extractor, _features(files, extractor, opts))
            except (ValueError, OSError) as err:
                self.failures.append({"stage": f"fid-{kind}", "error": f"{type(err).__name__}: {err}"})
                self._failed.add(kind)
                return None
        return self._references[kind]


def _features(files: Sequence[Path], extractor, options: EvalOptions) -> Tensor:
    from flowalign.evals.fid import extract_features

    return extract_features(
        (_load(chunk) for chunk in _chunks(list(files), options.batch_size)), extractor, device=options.device
    )


def _toy_detections(samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """What the toy oracle sees in every sample (computed once, shared by entropy and toy FID)."""
    from flowalign.toy.oracles import detect_attributes

    detections: list[dict[str, Any]] = []
    for chunk in _chunks(list(samples), 256):
        detections += detect_attributes(_load([s.file for s in chunk]))
    return detections


def _diversity(
    samples: Sequence[Sample], pset: PromptSet, extras: _Extras, options: EvalOptions, detections: list | None
) -> dict:
    by_prompt: dict[int, list[Sample]] = {}
    for s in samples:
        by_prompt.setdefault(s.key[0], []).append(s)
    groups = [g for g in by_prompt.values() if len(g) > 1]
    out: dict[str, Any] = {}
    if groups:
        distances = {"pixel": diversity.pixel_distance}
        if extras.lpips is not None:
            distances["lpips"] = partial(diversity.lpips_distance, extras.lpips)
        loaded = (_load([s.file for s in g]) for g in groups)  # one prompt's samples in memory at a time
        out |= diversity.within_group_diversity(loaded, distances, num_resamples=options.num_resamples)
    if detections is not None:
        from flowalign.toy.world import parse_caption

        is_video = any(d.get("motion") is not None for d in detections) or pset.kind == "video"
        reference = [parse_caption(s.prompt).as_dict() for s in samples]
        out["attributes"] = diversity.attribute_entropy(detections, _toy_vocab(is_video), reference=reference)
    return out


def _fid(
    samples: Sequence[Sample], pset: PromptSet, extras: _Extras, options: EvalOptions, detections: list | None
) -> dict:
    out: dict[str, Any] = {}
    if len(samples) >= 2 and detections is not None:
        from flowalign.data.media import load_media
        from flowalign.evals.fid import toy_features, toy_features_from_detections, toy_reference_media

        first = load_media(samples[0].file)  # [3, H, W] or [T, 3, H, W]
        size, frames = first.shape[-1], (first.shape[0] if first.ndim == 4 else None)
        prompts = [s.prompt for s in samples]
        ref = toy_features(toy_reference_media(prompts, seed=0, size=size, num_frames=frames))
        ref2 = toy_features(toy_reference_media(prompts, seed=1, size=size, num_frames=frames))
        feats = toy_features_from_detections(detections, is_video=frames is not None)
        out["toy"] = {
            "fid": fid.fid_from_features(feats, ref),
            "floor": fid.fid_from_features(ref2, ref),
            "n": len(samples),
        }
    for kind in ("inception", "clip"):
        pair = extras.reference(kind)
        if pair is None or len(samples) < 2:
            continue
        extractor, reference = pair
        feats = _features([s.file for s in samples], extractor, options)
        entry = {
            "fid": fid.fid_from_features(feats, reference),
            "n": len(samples),
            "n_reference": int(reference.shape[0]),
        }
        if kind == "inception":
            kid = kernel_distance(
                feats, reference, subsets=options.kid_subsets, subset_size=options.kid_subset_size
            )
            entry |= {"kid": kid.kid, "kid_se": kid.se, "kid_subset_size": kid.subset_size}
        out[kind] = entry | extras.extractor_info[kind]
    return out


def _against_base(
    samples: Sequence[Sample],
    base: Sequence[Sample],
    scores: Mapping[str, Mapping[str, float]],
    dims: Sequence[str],
    extras: _Extras,
    options: EvalOptions,
) -> dict:
    pairs = _paired(samples, base)
    out: dict[str, Any] = {"n": len(pairs), "deltas": {}}
    for dim in dims:
        ok = [(a, b) for a, b in pairs if dim in scores[a.score_id] and dim in scores[b.score_id]]
        if len(ok) < 2:
            continue
        out["deltas"][dim] = metrics.paired_difference(
            torch.tensor([scores[a.score_id][dim] for a, _ in ok]),
            torch.tensor([scores[b.score_id][dim] for _, b in ok]),
            [a.key[0] for a, _ in ok],
            num_resamples=options.num_resamples,
        )
    if pairs:
        drift_pixel, drift_lpips, groups = [], [], []
        for chunk in _chunks(pairs, options.batch_size):
            a, b = _load([p.file for p, _ in chunk]), _load([q.file for _, q in chunk])
            if a.shape != b.shape:
                out["drift_note"] = (
                    f"sizes differ from the base ({tuple(a.shape[1:])} vs {tuple(b.shape[1:])})"
                )
                break
            drift_pixel.append(diversity.pixel_distance(a, b))
            if extras.lpips is not None:
                drift_lpips.append(diversity.lpips_distance(extras.lpips, a, b))
            groups += [p.key[0] for p, _ in chunk]
        if drift_pixel:
            out["drift_pixel"] = metrics.dimension_stats(
                torch.cat(drift_pixel), groups, num_resamples=options.num_resamples
            )
        if drift_lpips:
            out["drift_lpips"] = metrics.dimension_stats(
                torch.cat(drift_lpips), groups, num_resamples=options.num_resamples
            )
    trained = [d for d in (options.trained_rewards or []) if d in dims]
    heldout = (
        [d for d in dims if d not in trained and d != OVERALL] if options.trained_rewards is not None else []
    )
    out["trained"], out["heldout"] = trained, heldout
    out["flags"] = metrics.hacking_flags(out["deltas"], trained=trained, heldout=heldout)
    return out


def _by_group(
    pset: PromptSet,
    per_model: Mapping[str, list[Sample]],
    scores: Mapping[str, Mapping[str, float]],
    dims: list[str],
) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """Mean and count per prompt group (Parti category, GenEval tag, ...), model and dimension."""
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for group in dict.fromkeys(pset.groups):
        out[group] = {}
        for model, samples in per_model.items():
            mine = [s for s in samples if pset.groups[s.key[0]] == group]
            cells = {}
            for dim in dims:
                vals = [scores[s.score_id][dim] for s in mine if dim in scores[s.score_id]]
                if vals:
                    cells[dim] = {"mean": sum(vals) / len(vals), "n": len(vals)}
            out[group][model] = cells
    return out


def _tolerance(options: EvalOptions, dim: str) -> float:
    tol = options.tie_tolerance
    return float(tol.get(dim, 0.0)) if isinstance(tol, Mapping) else float(tol)


def _summarise_set(
    pset: PromptSet,
    per_model: Mapping[str, list[Sample]],
    scores: Mapping[str, Mapping[str, float]],
    dims: list[str],
    extras: _Extras,
    options: EvalOptions,
    out_dir: Path,
) -> dict[str, Any]:

    models = list(per_model)
    result: dict[str, Any] = {"models": models, "num_samples": {m: len(per_model[m]) for m in models}}
    stats: dict[str, dict] = {}
    diagnostics: dict[str, dict] = {}
    values_by_dim: dict[str, dict[str, Tensor]] = {d: {} for d in dims}
    for model in models:
        samples = per_model[model]
        stats[model], diagnostics[model] = {}, {}
        for dim in dims:
            have = [s for s in samples if dim in scores[s.score_id]]
            if not have:
                continue
            values = torch.tensor([scores[s.score_id][dim] for s in have], dtype=torch.float64)
            values_by_dim[dim][model] = values
            stats[model][dim] = metrics.dimension_stats(
                values, [s.key[0] for s in have], num_resamples=options.num_resamples
            )
        extra_cols = sorted({k for s in samples for k in scores[s.score_id]} - set(dims))
        for col in extra_cols:
            if col.endswith("_norm"):
                continue
            vals = [scores[s.score_id][col] for s in samples if col in scores[s.score_id]]
            diagnostics[model][col] = {"mean": sum(vals) / len(vals), "n": len(vals)}
    result["stats"], result["diagnostics"] = stats, diagnostics
    if pset.groups:
        result["by_group"] = _by_group(pset, per_model, scores, dims)
    result["histograms"] = {d: _histograms(v) for d, v in values_by_dim.items() if v}

    win_rates: dict[str, list[dict]] = {}
    for dim in dims:
        rows = []
        for a in models:
            for b in (m for m in models if m != a):
                pairs = [
                    (x, y) for x, y in _paired(per_model[a], per_model[b])
                    if dim in scores[x.score_id] and dim in scores[y.score_id]
                ]  # fmt: skip
                if not pairs:
                    continue
                wr = metrics.paired_win_rate(
                    torch.tensor([scores[x.score_id][dim] for x, _ in pairs]),
                    torch.tensor([scores[y.score_id][dim] for _, y in pairs]),
                    [x.key[0] for x, _ in pairs],
                    tie_tolerance=_tolerance(options, dim),
                    num_resamples=options.num_resamples,
                )
                rows.append({"a": a, "b": b, **wr})
        if rows:
            win_rates[dim] = rows
    result["win_rates"] = win_rates

    result["diversity"], result["fid"] = {}, {}
    for m in models:
        detections = _toy_detections(per_model[m]) if pset.is_toy else None
        result["diversity"][m] = _diversity(per_model[m], pset, extras, options, detections)
        result["fid"][m] = _fid(per_model[m], pset, extras, options, detections)
    if options.base is not None and options.base in per_model:
        result["against_base"] = {
            m: _against_base(per_model[m], per_model[options.base], scores, dims, extras, options)
            for m in models
            if m != options.base
        }

    shown = spread_indices(len(pset.prompts), min(options.max_grid_prompts, len(pset.prompts)))
    grid = []
    for j in shown:
        cells = {}
        for model in models:
            files = sorted((s for s in per_model[model] if s.key[0] == j), key=lambda s: s.key[1])
            cells[model] = [relative_path(s.file, out_dir) for s in files]
        if any(cells.values()):
            grid.append({"index": j, "prompt": pset.prompts[j], "samples": cells})
    result["grid"] = grid
    return result


def summarise_eval(
    *,
    sets: Sequence[PromptSet],
    collected: Mapping[str, Mapping[str, list[Sample]]],
    scores: dict[str, dict[str, float]],
    rewards_info: Sequence[Mapping[str, Any]],
    options: EvalOptions,
    out_dir: Path,
    failures: list[dict[str, Any]],
) -> dict[str, Any]:
    """All numbers of the report (without settings/environment, which the runner adds)."""
    dims = _dimensions(rewards_info)
    if _add_overall(scores, dims, options.weights, failures):
        dims = [*dims, OVERALL]
    extras = _Extras(options, failures)
    results = {}
    for pset in sets:
        if collected.get(pset.name):
            results[pset.name] = _summarise_set(
                pset, collected[pset.name], scores, dims, extras, options, out_dir
            )
    return {
        "format": REPORT_FORMAT,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "prompt_sets": [s.as_dict() for s in sets],
        "rewards": [dict(r) for r in rewards_info],
        "dimensions": dims,
        "results": results,
    }


def _label_dimension(dim: str, label_dims: Sequence[str]) -> str | None:
    for label in label_dims:
        if label.lower() == dim.lower():
            return label
    if "overall" in label_dims:
        return "overall"
    return label_dims[0] if len(label_dims) == 1 else None


def calibrate_rewards(
    reward_specs: Sequence[str], options: EvalOptions, out_dir: Path, failures: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """Accuracy and ECE of every reward dimension on ``options.calibration_pairs`` (cached per reward).

    Each reward dimension is matched to the label dimension of the same name (``vq`` <-> ``VQ``), else
    to ``overall``, else to the only label dimension.
    """
    from flowalign.data.preference import load_preference_dataset
    from flowalign.rewards.registry import load_reward, parse_reward_spec

    path = Path(options.calibration_pairs or "")
    try:
        dataset = load_preference_dataset(path)
        stat = path.stat()
    except (ValueError, OSError) as err:
        failures.append({"stage": "calibration", "pairs": str(path), "error": f"{type(err).__name__}: {err}"})
        return None
    cache_dir = out_dir / "calibration"
    cache_dir.mkdir(exist_ok=True)
    out: dict[str, Any] = {"pairs": str(path), "num_pairs": len(dataset), "dimensions": {}}
    for spec in reward_specs:
        try:
            name, reward_options = parse_reward_spec(spec)
            key = json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns, spec], sort_keys=True)

            cache = cache_dir / f"{digest(key, 16)}.json"
            if cache.is_file():
                raw = json.loads(cache.read_text())
            else:
                reward = load_reward(name, device=options.device, dtype=options.dtype, **reward_options)
                raw = {"a": {}, "b": {}, "labels": {d: [] for d in dataset.dimensions}, "dimensions": []}
                for i in range(len(dataset)):
                    pair = dataset[i]
                    prompts = [pair.prompt] if reward.needs_prompts else None
                    if pair.media_w.shape == pair.media_l.shape:  # both sides in one call
                        both = torch.stack([pair.media_w, pair.media_l]).to(options.device)
                        got = reward.score(both, prompts * 2 if prompts else None)
                        sides = {
                            "a": {d: v[0] for d, v in got.items()},
                            "b": {d: v[1] for d, v in got.items()},
                        }
                    else:
                        sides = {
                            side: {
                                d: v[0] for d, v in reward.score(m[None].to(options.device), prompts).items()
                            }
                            for side, m in (("a", pair.media_w), ("b", pair.media_l))
                        }
                    for side, got in sides.items():
                        for dim, value in got.items():
                            raw[side].setdefault(dim, []).append(float(value))
                    for d in dataset.dimensions:
                        raw["labels"][d].append(int(pair.labels[d]))
                raw["dimensions"] = [d for d in reward.dimensions if d in raw["a"]]
                atomic_write_json(cache, raw, indent=None)
            for dim in raw["dimensions"]:
                label_dim = _label_dimension(dim, list(raw["labels"]))
                if label_dim is None:
                    continue
                result = metrics.preference_calibration(
                    torch.tensor(raw["a"][dim]),
                    torch.tensor(raw["b"][dim]),
                    torch.tensor(raw["labels"][label_dim]),
                )
                out["dimensions"][dim] = {"reward": spec, "label": label_dim, **result}
        except Exception as err:  # noqa: BLE001 - one failing reward does not stop the report
            failures.append({"stage": "calibration", "reward": spec, "error": f"{type(err).__name__}: {err}"})
    return out
