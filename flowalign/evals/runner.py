"""``flowalign eval``: generate (or read) samples for several models, score them, write report.json + report.html.

    result = run_eval({"base": "ckpt/base", "dpo": "ckpt/dpo"}, "toy-heldout@32", ["toy"],
                      samples_per_prompt=4, seeds=[0], out_dir="eval/run1")

Everything is incremental and lives under ``out_dir``:

    prompts/<set>.jsonl                       the prompts actually used (for re-runs elsewhere)
    samples/<set>/<model>/<key>/generation.json   model path + settings + prompts digest of the samples
    samples/<set>/<model>/<key>/seed-<s>/     manifest.jsonl + media (pipelines.generate_files)
    scores/manifest.jsonl                     every sample to score (ids are stable sample paths)
    scores/<reward>.jsonl                     one file per reward spec (rewards.scoring.score_files)
    report.json, report.html

A re-run reuses every sample already in a manifest and every score already in a scores file; a model is
only loaded when it has samples left to draw and a reward only when it has samples left to score. The
``<key>`` folder is a hash of (model path, settings, samples per prompt, prompts), so changing any of
them draws new samples next to the old ones instead of mixing them. Repetition ``s`` of ``seeds``
gives sample k of prompt j the seed ``s + j * K + k`` (K = samples per prompt): the same seed for every
model, so models are compared on paired samples.

A model that fails to load or generate, a prompt set that cannot be read, or a reward that fails is
recorded in ``failures``; the rest is still scored and reported, and nothing written is lost.

A model path may also name existing samples: a ``manifest.jsonl`` or a folder holding one (what
``flowalign generate`` writes). Its rows are matched to each prompt set by prompt text.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from flowalign.evals.prompt_sets import PromptSet, load_prompt_set, write_prompt_set
from flowalign.evals.samples import (
    SampleGenerator,
    check_seeds,
    effective_settings,
    external_samples,
)
from flowalign.evals.types import (
    EvalOptions,
    ModelSpec,
    Sample,
    digest,
    failure,
    relative_path,
    safe_name,
)
from flowalign.pipelines.generate_files import GenerationSettings
from flowalign.sharding import current_shard

__all__ = [
    "EvalResult",
    "rerun_eval",
    "run_eval",
]


@dataclass
class EvalResult:
    """What :func:`run_eval` wrote: the report's data, its two files and the failures."""

    report: dict[str, Any]
    json_path: Path
    html_path: Path | None
    failures: list[dict[str, Any]]


def _reward_tag(name: str, options: Mapping[str, Any]) -> str:
    return safe_name(name) + (f"-{digest(options, 8)}" if options else "")


def _score_all(
    samples: list[Sample],
    reward_specs: Sequence[str],
    out_dir: Path,
    options: EvalOptions,
    failures: list[dict],
    progress: bool,
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Score every sample with every reward (incrementally); returns {score_id: {column: value}} and reward info."""
    from flowalign.rewards.registry import parse_reward_spec
    from flowalign.rewards.scoring import MediaItem, read_score_rows, score_files

    scores_dir = out_dir / "scores"
    scores_dir.mkdir(parents=True, exist_ok=True)
    unique: dict[str, Sample] = {}
    for s in samples:
        unique.setdefault(s.score_id, s)
    manifest = scores_dir / "manifest.jsonl"
    lines = [
        json.dumps({"id": sid, "prompt": s.prompt, "file": str(s.file.resolve())})
        for sid, s in unique.items()
    ]
    shard = current_shard()
    if shard.is_main:
        tmp = manifest.with_name(f".manifest.jsonl.{os.getpid()}.tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        os.replace(tmp, manifest)  # the record of what was scored; the items themselves are passed directly
    items = [MediaItem(sid, s.file, s.prompt) for sid, s in unique.items()]

    merged: dict[str, dict[str, float]] = {sid: {} for sid in unique}
    rewards_info = []
    taken: set[str] = set()  # score columns of the rewards before this one
    for spec in dict.fromkeys(reward_specs):
        try:
            name, reward_options = parse_reward_spec(spec)
        except ValueError as err:
            failures.append(failure("score", err, reward=spec))
            continue
        out = scores_dir / f"{_reward_tag(name, reward_options)}.jsonl"
        info: dict[str, Any] = {
            "spec": spec,
            "name": name,
            "options": reward_options,
            "file": relative_path(out, out_dir),
        }
        try:
            existing = {str(r["id"]): r for r in read_score_rows(out) if r.get("rewards") == [name]}
            todo = [sid for sid in unique if sid not in existing]
            info["num_reused"] = len(unique) - len(todo)
            info["num_scored"] = 0
            if any(shard.gather(bool(todo and unique))):  # every process takes the same branch
                result = score_files(
                    [name], items, weights=None, out=out, batch_size=options.batch_size,
                    device=options.device, dtype=options.dtype,
                    reward_kwargs={name: reward_options} if reward_options else None, progress=progress,
                )  # fmt: skip
                info["num_scored"] = result.num_scored
                existing = {str(r["id"]): r for r in result.rows}
        except Exception as err:  # noqa: BLE001 - a failing reward is reported; the others go on
            failures.append(failure("score", err, reward=spec))
            existing = {str(r["id"]): r for r in read_score_rows(out) if r.get("rewards") == [name]}
        columns = {k for row in existing.values() for k, v in row.items() if isinstance(v, int | float)}
        columns.discard("overall")
        # Two rewards naming a dimension alike (toy "ta" and toy_classifier "ta"): the later one's
        # columns all get its name as a prefix, "toy_classifier.ta", so neither overwrites the other.
        prefix = ""
        if columns & taken:
            prefix = f"{name}." if not {f"{name}.{c}" for c in columns} & taken else f"{out.stem}."
            info["prefix"] = prefix
        taken |= {prefix + c for c in columns}
        for sid, row in existing.items():
            if sid in merged:
                merged[sid].update({prefix + k: float(row[k]) for k in columns if k in row})
        info["dimensions"] = [prefix + d for d in _dimensions_of(existing.values())]
        rewards_info.append(info)
    return merged, rewards_info


def _dimensions_of(rows) -> list[str]:
    """A reward's dimensions as scored: every ``<d>_norm`` column (a video-only ``mq`` is absent for images)."""
    dims: list[str] = []
    for row in rows:
        dims += [
            k.removesuffix("_norm")
            for k in row
            if k.endswith("_norm") and k.removesuffix("_norm") not in dims
        ]
    return dims


def _environment() -> dict[str, Any]:
    import platform
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("flowalign", "torch", "diffusers", "transformers", "open_clip_torch", "lpips", "safetensors"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    repo = Path(__file__).resolve().parents[2]
    commit, dirty = None, None
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
        dirty = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "git_commit": commit,
        "git_dirty": dirty,
    }


def _fingerprint(path: str) -> str | None:
    """Hash of a model folder's config files and weight-file sizes (None for hub ids and samples)."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    parts = []
    for file in sorted(folder.rglob("*")):
        if not file.is_file():
            continue
        rel = file.relative_to(folder).as_posix()
        parts.append([rel, file.read_text() if file.suffix == ".json" else file.stat().st_size])
    return digest(parts, 16)


def run_eval(
    models: Mapping[str, str | os.PathLike[str] | ModelSpec],
    prompts: str | os.PathLike[str] | PromptSet | Sequence[str | os.PathLike[str] | PromptSet],
    rewards: Sequence[str],
    *,
    out_dir: str | os.PathLike[str],
    samples_per_prompt: int = 1,
    seeds: Sequence[int] = (0,),
    options: EvalOptions | None = None,
    render: bool = True,
    progress: bool = True,
) -> EvalResult:
    """Compare models on prompt sets with rewards; write ``report.json`` and ``report.html`` in ``out_dir``.

    Args:
        models: ``{name: model folder, hub id, existing samples, or ModelSpec}``, in report order.
        prompts: one prompt-set spec (see :mod:`flowalign.evals.prompt_sets`) or several.
        rewards: reward specs, ``"name"`` or ``"name:key=value,..."`` (``flowalign.rewards``).
        out_dir: the evaluation folder (created; re-runs reuse what it holds).
        samples_per_prompt: K samples per prompt and seed repetition.
        seeds: base seeds of independent repetitions (see module docstring); K x len(seeds) samples
            per prompt in all.
        options: everything else (:class:`EvalOptions`).
        render: also write ``report.html``.
        progress: show progress bars.

    Returns:
        An :class:`EvalResult`; failures are in it and in the report, not raised.

    Raises:
        ValueError: no models, no rewards, samples_per_prompt < 1, overlapping or repeated seeds, an
            unknown generation setting, a base model not among the models, or two names that map to
            the same folder name.
    """
    from flowalign.evals.summary import summarise_eval

    options = options or EvalOptions()
    out_dir = Path(out_dir)
    if not models:
        raise ValueError("run_eval: no models given")
    if not rewards:
        raise ValueError("run_eval: no rewards given")
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    if not seeds:
        raise ValueError("run_eval: seeds is empty; give at least one base seed")
    specs = {n: m if isinstance(m, ModelSpec) else ModelSpec(os.fspath(m)) for n, m in models.items()}
    folders = [safe_name(n) for n in specs]
    if len(set(folders)) != len(folders):
        raise ValueError(f"model names {list(specs)} collide as folder names {folders}; rename them")
    if options.base is not None and options.base not in specs:
        raise ValueError(f"base model {options.base!r} is not one of the models {list(specs)}")
    for name, spec in specs.items():
        unknown = sorted(set(spec.settings) - set(asdict(options.settings)))
        if unknown:
            raise ValueError(
                f"model {name!r}: unknown generation setting(s) {unknown}; known: {sorted(asdict(options.settings))}"
            )

    failures: list[dict[str, Any]] = []
    prompt_specs = [prompts] if isinstance(prompts, str | os.PathLike | PromptSet) else list(prompts)
    sets: list[PromptSet] = []
    for spec in prompt_specs:
        try:
            pset = load_prompt_set(spec)
        except (ValueError, OSError) as err:
            failures.append(failure("prompts", err, prompt_set=str(spec)))
            continue
        taken = {s.name for s in sets}
        if pset.name in taken:
            pset = replace(pset, name=f"{pset.name}-{len(sets)}")
        sets.append(pset)
    check_seeds(seeds, sets, samples_per_prompt)
    out_dir.mkdir(parents=True, exist_ok=True)
    shard = current_shard()  # several processes: each draws and scores its share, the main one reports
    for pset in sets:
        (out_dir / "prompts").mkdir(exist_ok=True)
        if shard.is_main:
            write_prompt_set(pset, out_dir / "prompts" / f"{safe_name(pset.name)}.jsonl")

    clock = {"start": time.perf_counter()}
    generator = SampleGenerator(options, failures, progress)
    collected: dict[str, dict[str, list[Sample]]] = {s.name: {} for s in sets}
    for name, spec in specs.items():
        for pset in sets:
            try:
                if spec.is_samples:
                    found, missing = external_samples(spec, pset, out_dir)
                    if missing:
                        failures.append(
                            failure("samples", f"{len(missing)} file(s) named in {spec.path} do not exist, "
                                     f"e.g. {missing[0]}", model=name, prompt_set=pset.name)
                        )  # fmt: skip
                    if not found and not missing:
                        failures.append(
                            failure("samples", f"no sample in {spec.path} has a prompt of set {pset.name!r}",
                                     model=name, prompt_set=pset.name)
                        )  # fmt: skip
                else:
                    found = generator.samples(name, spec, pset, seeds, samples_per_prompt, out_dir)
            except Exception as err:  # noqa: BLE001 - reported, the other models go on
                failures.append(failure("samples", err, model=name, prompt_set=pset.name))
                found = []
            if found:
                collected[pset.name][name] = found
    generator.release()
    clock["generated"] = time.perf_counter()

    all_samples = [s for per_model in collected.values() for group in per_model.values() for s in group]
    scores, rewards_info = _score_all(all_samples, rewards, out_dir, options, failures, progress)
    clock["scored"] = time.perf_counter()
    calibration = None
    if options.calibration_pairs:
        from flowalign.evals.summary import calibrate_rewards

        calibration = calibrate_rewards(rewards, options, out_dir, failures)

    report = summarise_eval(
        sets=sets,
        collected=collected,
        scores=scores,
        rewards_info=rewards_info,
        options=options,
        out_dir=out_dir,
        failures=failures,
    )
    report["calibration"] = calibration
    report["settings"] = {
        "generation": asdict(options.settings) | {"seed": None, "samples_per_prompt": samples_per_prompt},
        "samples_per_prompt": samples_per_prompt,
        "seeds": list(seeds),
        "rewards": list(rewards),
        "weights": options.weights,
        "base": options.base,
        "trained_rewards": options.trained_rewards,
        "tie_tolerance": options.tie_tolerance,
        "num_resamples": options.num_resamples,
        "confidence_level": 0.95,
        "device": str(options.device),
        "dtype": str(options.dtype),
        "lpips": "weights"
        if options.lpips_weights
        else ("random backbone" if options.lpips_random_backbone else None),
        "fid_reference": options.fid_reference,
        "calibration_pairs": options.calibration_pairs,
        "options": _options_record(options),
    }
    for entry in report["prompt_sets"]:
        entry["file"] = f"prompts/{safe_name(entry['name'])}.jsonl"
    report["models"] = [
        {
            "name": name,
            "path": spec.path,
            "source": "samples" if spec.is_samples else "model",
            "settings": spec.settings,
            "generation": effective_settings(options.settings, spec, name),
            "guidance_key": spec.guidance_key or None,
            "fingerprint": None if spec.is_samples else _fingerprint(spec.path),
            "status": "failed" if any(f.get("model") == name for f in failures) else "ok",
        }
        for name, spec in specs.items()
    ]
    report["environment"] = _environment()
    clock["summarised"] = time.perf_counter()
    # Wall-clock seconds of this run's stages (samples and scores reused from earlier runs cost ~0).
    report["timings"] = {
        "generate_s": clock["generated"] - clock["start"],
        "score_s": clock["scored"] - clock["generated"],
        "metrics_s": clock["summarised"] - clock["scored"],
        "num_samples": len(all_samples),
    }
    report["failures"] = failures

    from flowalign.evals.report import render_report, write_report_json

    json_path, html_path = out_dir / "report.json", (out_dir / "report.html" if render else None)
    if shard.is_main:
        json_path = write_report_json(report, out_dir)
        html_path = render_report(out_dir) if render else None
    shard.barrier()
    return EvalResult(report=report, json_path=json_path, html_path=html_path, failures=failures)


def _options_record(options: EvalOptions) -> dict[str, Any]:
    """Every :class:`EvalOptions` field as JSON (dtype as its name), enough for :func:`rerun_eval`."""
    record = {f.name: getattr(options, f.name) for f in fields(options) if f.name != "settings"}
    record["dtype"] = str(options.dtype).removeprefix("torch.")
    record["settings"] = asdict(options.settings)
    return record


def rerun_eval(
    out_dir: str | os.PathLike[str],
    *,
    guidance: Mapping[str, Callable[[Any, list[str]], list[Any]]] | None = None,
    render: bool = True,
    progress: bool = True,
) -> EvalResult:
    """Run an evaluation again from its ``report.json``: same models, prompts, rewards, seeds and options.

    Every sample and score on disk is reused, so the numbers come back the same (only ``created``,
    ``timings`` and ``environment`` change) and anything missing is drawn or scored now. Guided models
    reuse their samples; pass ``guidance={name: factory}`` to let them draw missing ones.

    Raises:
        FileNotFoundError: no report.json in ``out_dir``.
        ValueError: the report lacks what a re-run needs (written by an older version).
    """
    from flowalign.evals.report import load_report

    out_dir = Path(out_dir)
    report = load_report(out_dir)
    settings = report.get("settings") or {}
    if "options" not in settings:
        raise ValueError(f"{out_dir / 'report.json'}: no 'settings.options'; it cannot be re-run")
    record = dict(settings["options"])
    record["settings"] = GenerationSettings(**record["settings"])
    record["dtype"] = getattr(torch, record["dtype"])
    options = EvalOptions(**record)
    guidance = guidance or {}
    models = {
        m["name"]: ModelSpec(
            m["path"], dict(m.get("settings") or {}), guidance.get(m["name"]), m.get("guidance_key") or ""
        )
        for m in report["models"]
    }
    sets = []
    for entry in report["prompt_sets"]:
        rows = [
            json.loads(line) for line in (out_dir / entry["file"]).read_text().splitlines() if line.strip()
        ]
        sets.append(
            PromptSet(
                name=entry["name"],
                prompts=tuple(r["prompt"] for r in rows),
                source=entry["source"],
                kind=entry.get("kind"),
                groups=tuple(r["group"] for r in rows) if rows and "group" in rows[0] else (),
                is_toy=bool(entry.get("is_toy")),
            )
        )
    failed_sets = [f["prompt_set"] for f in report.get("failures", []) if f.get("stage") == "prompts"]
    return run_eval(
        models, [*sets, *failed_sets], settings["rewards"], out_dir=out_dir,
        samples_per_prompt=settings["samples_per_prompt"], seeds=settings["seeds"], options=options,
        render=render, progress=progress,
    )  # fmt: skip


def format_failure(failure: Mapping[str, Any]) -> str:
    """One line for a failure record: ``load (model=dpo): OSError: ...``."""
    where = ", ".join(f"{k}={v}" for k, v in failure.items() if k not in ("stage", "error"))
    return f"{failure['stage']} ({where}): {failure['error']}"
