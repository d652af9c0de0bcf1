"""From models to samples on disk: model specs, seeds, the samples folder layout, and drawing what is missing.

Used by :func:`flowalign.evals.runner.run_eval`; see its module docstring for the folder layout.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from flowalign.evals.prompt_sets import PromptSet
from flowalign.evals.types import EvalOptions, ModelSpec, Sample, digest, failure, relative_path, safe_name
from flowalign.files import atomic_write_json
from flowalign.pipelines.generate_files import MANIFEST, GenerationSettings, read_manifest
from flowalign.sharding import current_shard, local_device
from flowalign.validation import check_number

__all__ = [
    "SampleGenerator",
    "check_seeds",
    "effective_settings",
    "external_samples",
    "parse_model_spec",
    "sweep_guidance",
    "swept_model",
]

_SWEPT = re.compile(r"^(?P<model>.+)_cfg(?P<scale>\d+(?:\.\d+)?)$")


def parse_model_spec(spec: str) -> tuple[str, ModelSpec]:
    """``"name=path[:key=value,...]"`` (or just ``"path"``, named after its last component) -> (name, spec).

    Option values are read as JSON when they parse: ``"fast=ckpt/gen:one_step=true,num_inference_steps=1"``.

    Raises:
        ValueError: an empty name or path, or an option that is not ``key=value``.
    """
    name, eq, rest = spec.partition("=")
    if not eq or "/" in name or os.sep in name:
        name, rest = "", spec
    path, colon, opts = rest.partition(":")
    if not path.strip():
        raise ValueError(f"model spec {spec!r}: empty path")
    name = name.strip() or Path(path.rstrip("/")).name
    if not name:
        raise ValueError(f"model spec {spec!r}: empty model name")
    settings: dict[str, Any] = {}
    for token in filter(None, (t.strip() for t in opts.split(","))) if colon else ():
        key, sep, value = token.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"model spec {spec!r}: option {token!r} is not of the form key=value")
        try:
            settings[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            settings[key.strip()] = value.strip()
    return name, ModelSpec(path.strip(), settings)


def sweep_guidance(specs: dict[str, ModelSpec], scales: Sequence[float]) -> dict[str, ModelSpec]:
    """Each model once per classifier-free guidance scale, named ``{name}_cfg{scale}`` (``base_cfg1.5``).

    More guidance buys text alignment at a cost in quality, so a tuned model's gain is only real where it
    beats the base's whole guidance curve; a sweep puts that curve in one report.

    Raises:
        ValueError: no scales, a scale below 1, a repeated scale, or a model whose spec already sets
            ``guidance_scale`` or names existing samples (which cannot be drawn again at another scale).
    """
    if not scales:
        raise ValueError("guidance sweep: give at least one guidance scale")
    try:
        for g in scales:  # NaN passes a plain "g < 1" test
            check_number(g, "scale", lo=1.0)
        if len(set(scales)) != len(scales):
            raise ValueError("repeated scale")
    except ValueError:
        raise ValueError(
            f"guidance sweep: scales must be distinct and >= 1 (finite), got {list(scales)}"
        ) from None
    swept = {}
    for name, spec in specs.items():
        if "guidance_scale" in spec.settings:
            raise ValueError(
                f"guidance sweep: model {name!r} already sets guidance_scale; drop one of the two"
            )
        if spec.is_samples:
            raise ValueError(
                f"guidance sweep: model {name!r} names existing samples ({spec.path}), not a model"
            )
        for g in scales:
            swept[f"{name}_cfg{g:g}"] = replace(spec, settings={**spec.settings, "guidance_scale": float(g)})
    return swept


def swept_model(name: str) -> str | None:
    """The model a :func:`sweep_guidance` name was made from (``"base_cfg1.5"`` -> ``"base"``), else None."""
    match = _SWEPT.match(name)
    return match["model"] if match else None


def _settings_for(base: GenerationSettings, spec: ModelSpec, name: str) -> GenerationSettings:
    """Shared settings, then a one-step checkpoint's recorded sampling, then the model's own overrides.

    A one-step generator (``one_step.json`` in its folder) samples in one call with the guidance it
    records (None: no CFG, the teacher's guidance is distilled in); shared multi-step settings would
    sample it wrongly, so they are replaced unless the model's own settings say otherwise.
    """
    known = {f for f in asdict(base)}
    unknown = sorted(set(spec.settings) - known)
    if unknown:
        raise ValueError(f"model {name!r}: unknown generation setting(s) {unknown}; known: {sorted(known)}")
    overrides: dict[str, Any] = {}
    if not spec.is_samples and Path(spec.path).is_dir():
        from flowalign.pipelines.one_step import read_one_step_metadata

        meta = read_one_step_metadata(spec.path)  # ValueError naming the file if malformed
        if meta is not None:
            overrides = {
                "one_step": True,
                "num_inference_steps": 1,
                "guidance_scale": meta.get("guidance_scale") or 1.0,
            }
    return replace(base, **(overrides | spec.settings))


def effective_settings(base: GenerationSettings, spec: ModelSpec, name: str) -> dict[str, Any] | None:
    """What a model samples with (None for existing samples or an unreadable one-step file)."""
    if spec.is_samples:
        return None
    try:
        settings = asdict(_settings_for(base, spec, name))
    except ValueError:
        return None
    return {k: v for k, v in settings.items() if k not in ("seed", "samples_per_prompt", "extra")}


def check_seeds(seeds: Sequence[int], sets: list[PromptSet], k: int) -> None:
    ordered = sorted(seeds)
    if len(set(ordered)) != len(ordered):
        raise ValueError(f"seeds must be distinct, got {list(seeds)}")
    n = max((len(s.prompts) for s in sets), default=0) * k
    for lo, hi in zip(ordered, ordered[1:], strict=False):
        if hi < lo + n:
            raise ValueError(
                f"seeds {lo} and {hi} overlap: a repetition uses seeds s .. s + {n - 1} "
                f"({n} samples = prompts x samples_per_prompt); space the seeds at least {n} apart"
            )


def _row_file(folder: Path, row: dict) -> Path:
    """The file a sample manifest row names, confined to its folder like training data."""
    from flowalign.data.paths import resolve_data_path

    where = f"id {str(row.get('id'))[:40]!r}"
    return resolve_data_path(folder, row.get("file"), source=folder / MANIFEST, where=where, key="file")


def _num_done(folder: Path, expected: int) -> int:
    """How many of the sample ids 0..expected-1 a folder's manifest holds with their file on disk."""
    rows = read_manifest(folder / MANIFEST)
    ids = {r["id"] for r in rows if _row_file(folder, r).is_file()}
    return sum(f"{i:06d}" in ids for i in range(expected))


class SampleGenerator:
    """Loads each model at most once, and only when it has samples left to draw."""

    def __init__(self, options: EvalOptions, failures: list[dict], progress: bool) -> None:
        self.options, self.failures, self.progress = options, failures, progress
        self.shard = current_shard()  # under several processes each draws its share of every job
        self.loaded: dict[str, Any] = {}
        self.broken: set[str] = set()

    def model(self, name: str, spec: ModelSpec):
        if name not in self.loaded:
            from flowalign.models import load_flow_model

            self.loaded.clear()  # one model in memory at a time
            device = local_device(str(self.options.device))
            self.loaded[name] = load_flow_model(spec.path, torch_dtype=self.options.dtype, device=device)
        return self.loaded[name]

    def _draw(self, name: str, spec: ModelSpec, run: Callable[[Any], None], *, where: dict[str, Any]) -> None:
        """Load the model (once; a load failure marks it broken) and run one generation job on it."""
        if name in self.broken:
            return
        model, error = None, None
        try:
            model = self.model(name, spec)
        except Exception as err:  # noqa: BLE001 - any load error is reported, the rest goes on
            error = err
        message = self.shard.first_error(error)  # a failure on one process stops all (no one waits)
        if message is not None:
            self.broken.add(name)
            self.failures.append(failure("load", error or message, model=name, path=spec.path))
            return
        try:
            run(model)
        except Exception as err:  # noqa: BLE001 - what was written stays; the failure is reported
            self.failures.append(failure("generate", err, model=name, **where))

    def samples(
        self, name: str, spec: ModelSpec, pset: PromptSet, seeds: Sequence[int], k: int, out_dir: Path
    ) -> list[Sample]:
        """Draw what is missing of K samples per prompt and seed repetition; return every sample on disk.

        Unguided models draw a whole repetition with one ``generate_files`` call (``seed-<s>/``).
        A guided model (``spec.guidance_key``) draws prompt by prompt (``seed-<s>/p<j>/``), so its velocity
        transforms are built for exactly the prompts of each pipeline call; seeds are the same either way.
        """
        from flowalign.pipelines.generate_files import generate_files

        settings = _settings_for(self.options.settings, spec, name)
        ident = {
            "model": spec.path,
            "settings": asdict(replace(settings, seed=0)),
            "samples_per_prompt": k,
            "prompts": digest(list(pset.prompts), 64),
            "guidance": spec.guidance_key or None,
        }
        folder = out_dir / "samples" / safe_name(pset.name) / safe_name(name) / digest(ident)
        folder.mkdir(parents=True, exist_ok=True)
        if self.shard.is_main:
            atomic_write_json(folder / "generation.json", ident, default=str)
        samples: list[Sample] = []
        for rep, seed in enumerate(seeds):
            run_dir = folder / f"seed-{seed}"
            # (folder, first prompt index j0, prompts, seed of its first sample)
            jobs = (
                [(run_dir, 0, list(pset.prompts), seed)]
                if not spec.guidance_key
                else [(run_dir / f"p{j:06d}", j, [p], seed + j * k) for j, p in enumerate(pset.prompts)]
            )
            for job_dir, j0, prompts, first_seed in jobs:
                expected = len(prompts) * k
                missing = max(self.shard.gather(expected - _num_done(job_dir, expected)))  # one decision
                if missing:
                    job = replace(settings, seed=first_seed, samples_per_prompt=k)

                    images = list(pset.images[j0 : j0 + len(prompts)]) if pset.images else None

                    def run(model, job_dir=job_dir, prompts=prompts, job=job, missing=missing, images=images):
                        transforms, batch = None, self.options.batch_size
                        if spec.guidance_key and spec.guidance is None:
                            raise ValueError(
                                f"{missing} guided sample(s) missing in {job_dir} and no guidance function "
                                f"was given to draw them (guidance {spec.guidance_key!r})"
                            )
                        if spec.guidance is not None:  # one pipeline call on this prompt's missing samples
                            transforms, batch = spec.guidance(model, prompts * missing), max(batch, missing)
                        generate_files(model, prompts, job_dir, job, velocity_transforms=transforms,
                                       batch_size=batch, model_name=name, progress=self.progress,
                                       images=images)  # fmt: skip

                    self._draw(name, spec, run, where={"prompt_set": pset.name, "seed": seed})
                for row in read_manifest(job_dir / MANIFEST):
                    i = int(row["id"])
                    file = _row_file(job_dir, row)
                    if i >= expected or not file.is_file():
                        continue
                    j, r = divmod(i, k)
                    samples.append(
                        Sample(
                            (j0 + j, rep * k + r),
                            row["prompt"],
                            row.get("seed"),
                            file,
                            relative_path(file, out_dir),
                        )
                    )
        return samples

    def release(self) -> None:
        self.loaded.clear()


def external_samples(spec: ModelSpec, pset: PromptSet, out_dir: Path) -> tuple[list[Sample], list[Path]]:
    """Rows of an existing manifest whose prompt is in the set, paired by (prompt, occurrence); and the
    files its rows name that do not exist."""
    from flowalign.rewards.scoring import resolve_media

    manifest = Path(spec.path)
    manifest = manifest / MANIFEST if manifest.is_dir() else manifest
    items = resolve_media(manifest)  # validates rows, naming file and line
    rows = {str(r["id"]): r for r in read_manifest(manifest)}
    index = {}
    for j, prompt in enumerate(pset.prompts):
        index.setdefault(prompt, j)
    seen: dict[int, int] = {}
    samples, missing = [], []
    for item in items:
        j = index.get(item.prompt)
        if j is None:
            continue
        if not item.file.is_file():
            missing.append(item.file)
            continue
        rep = seen.get(j, 0)
        seen[j] = rep + 1
        samples.append(
            Sample(
                (j, rep), item.prompt, rows[item.id].get("seed"), item.file, relative_path(item.file, out_dir)
            )
        )
    return samples, missing
