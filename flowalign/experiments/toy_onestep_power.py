"""Seed-level power study of the toy one-step claims: the f-divergence ordering and DI* vs its KL variant.

Every arm is trained with several training seeds at the same budget (:class:`OneStepToySettings`) and
scored on the same held-out prompts and sampling seeds. The unit of replication is the training seed:
each arm's mean ± standard error is over seeds, and each claim is tested on paired differences (arm A
minus arm B at the same training seed), with s.e. = std(differences) / sqrt(n).

Arms:

- f-distill with reverse KL ("rkl"), JS ("js") and forward KL ("kl") from the teacher;
- DI* ("distar-score", score-divergence regulariser) and the KL-regularised variant ("distar-kl"), both
  started from the same JS student (``PowerSettings.distar_init_seed``), as ``one_step_demo`` runs them. The KL row of a seed is its
  checkpoint whose classifier reward is closest to that seed's final DI* reward (matched reward).

Claims ("s.e." is the paired difference's; c is the one-sided 95% quantile of Student's t with n - 1
degrees of freedom, 2.92 for n = 3 seeds; n >= 3 is required):

- (a) JS / forward KL >= reverse KL on mode coverage: primary metric the TV distance of the attribute
  histogram to the teacher's (lower is better). Reproduced when the paired difference favours JS (or
  forward KL) by more than c s.e. and neither attribute entropy nor within-prompt jitter goes against it
  by more than c s.e.
- (b) DI* keeps more diversity than the KL-regularised variant at matched reward: primary metric the
  within-prompt jitter. Reproduced when the paired difference favours DI* by more than c s.e.

Results go to ``power.json`` (written after every cell, so a partial grid survives) and ``power.md``.
Run: ``python -m flowalign.experiments.toy_onestep_power OUT_DIR [--seeds 0 1 2] [--arms rkl js ...]``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from flowalign.experiments.toy_onestep import (
    OneStepToySettings,
    _checkpoint_rows,
    _teacher_dir,
    distill_toy,
    evaluate_one_step,
    teacher_baseline,
    weight_spread,
)
from flowalign.files import atomic_write_json, atomic_write_text, exclusive_lock
from flowalign.toy.metrics import one_step_report

__all__ = ["ARMS", "PowerSettings", "paired", "power_markdown", "run_power_grid", "summarise_power"]

FDISTILL_ARMS = ("rkl", "js", "kl")
DISTAR_ARMS = ("distar-score", "distar-kl")
ARMS = FDISTILL_ARMS + DISTAR_ARMS
METRICS = ("tv_joint", "entropy", "div_jitter", "div_pixel", "ta", "vq", "all_correct", "reward")
# (metric, +1 if higher is better for the claim's side, -1 if lower is)
COVERAGE = (("tv_joint", -1), ("entropy", +1), ("div_jitter", +1))
DIVERSITY = (("div_jitter", +1), ("div_pixel", +1))
T_95 = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812)
"""One-sided 95% quantiles of Student's t, 1 to 10 degrees of freedom (10 is used for more: conservative)."""
CLAIMS = {
    "a_js_vs_rkl": ("js", "rkl", COVERAGE),
    "a_fkl_vs_rkl": ("kl", "rkl", COVERAGE),
    "b_distar_vs_kl": ("distar-score", "distar-kl", DIVERSITY),
}


@dataclass
class PowerSettings:
    """The grid: training seeds, arms, and the DI* budget (``one_step_demo``'s)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = ARMS
    onestep: OneStepToySettings = field(default_factory=OneStepToySettings)
    distar_steps: int = 100
    distar_lr: float = 1e-4
    reward_scale: float = 100.0
    checkpoint_every: int = 20
    critic_warmup_steps: int = 10
    distar_init_seed: int | None = 0
    """DI* of every seed starts from the JS student of this training seed (the spread over seeds is then
    DI*'s own training noise at a fixed start); None: from the JS student of the same seed."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.arms) - set(ARMS))
        if unknown:
            raise ValueError(f"power: unknown arm(s) {unknown}; arms are {list(ARMS)}")
        if not self.seeds:
            raise ValueError("power: no training seeds")


def _cell_key(arm: str, seed: int) -> str:
    return f"{arm}/seed{seed}"


def _seeds(cells: dict[str, Any]) -> list[int]:
    """Every training seed with at least one cell (a grid run in chunks summarises all of them)."""
    return sorted({int(key.rsplit("/seed", 1)[1]) for key in cells})


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {"cells": {}}


def _teacher(out_dir: Path, teacher_dir: Path, s: OneStepToySettings):
    """The teacher's held-out evaluation, cached in ``out_dir`` (76 CPU-s to recompute)."""
    from safetensors.torch import load_file, save_file

    from flowalign.experiments.toy_base import ToyEvaluation, heldout_prompts

    cache = (
        out_dir / f"teacher-{s.eval_samples}-{s.eval_seed}-{s.teacher_steps}-{s.guidance_scale:g}.safetensors"
    )
    if cache.is_file():
        tensors = load_file(str(cache))
        media = tensors.pop("media")
        return ToyEvaluation(heldout_prompts("image", s.eval_samples), media, tensors)
    baseline = teacher_baseline(teacher_dir, s)
    save_file({"media": baseline.media.contiguous(), **baseline.scores}, str(cache))
    return baseline


def _fdistill_student(out_dir: Path, teacher_dir: Path, div: str, seed: int, s: OneStepToySettings):
    """(export folder, training seconds) of the f-distill run of ``div`` at ``seed``, trained once."""
    from flowalign.training.methods.fdistill import FDistillConfig

    run = out_dir / "runs" / f"fdistill-{div}-seed{seed}"
    done = run / "cell.json"
    if done.is_file():
        info = json.loads(done.read_text())
        return Path(info["model"]), info["seconds"]
    cfg = FDistillConfig(divergence=div, gan_weight=s.gan_weight)
    model_dir, seconds = distill_toy(teacher_dir, run, cfg, replace(s, seed=seed))
    atomic_write_json(done, {"model": str(model_dir), "seconds": seconds})
    return model_dir, seconds


def _distar_cells(out_dir: Path, teacher_dir: Path, seed: int, p: PowerSettings, baseline, reward):
    """DI* and its KL variant from the JS student of ``seed``: {arm: row} plus both trajectories."""
    from flowalign.training.methods.distar import DistarConfig

    init_seed = seed if p.distar_init_seed is None else p.distar_init_seed
    init_dir, _ = _fdistill_student(out_dir, teacher_dir, "js", init_seed, p.onestep)
    ds = replace(p.onestep, steps=p.distar_steps, generator_lr=p.distar_lr, regression_steps=0, seed=seed)
    trajectories = {}
    for regularizer in ("score", "kl"):
        cfg = DistarConfig(
            reward="toy_classifier",
            reward_scale=p.reward_scale,
            alpha=1.0,
            regularizer=regularizer,
            generator_init=Path(init_dir),
            critic_warmup_steps=p.critic_warmup_steps,
        )
        run = out_dir / "runs" / f"distar-{regularizer}-seed{seed}"
        _, seconds = distill_toy(
            teacher_dir, run, cfg, ds, reward=reward, checkpoint_every=p.checkpoint_every
        )
        rows = _checkpoint_rows(f"distar-{regularizer}", run, teacher_dir, ds, baseline.media, reward)
        trajectories[regularizer] = [{**r, "train_cpu_s": seconds} for r in rows]
    final = trajectories["score"][-1]
    matched = min(trajectories["kl"], key=lambda r: abs(r["reward"] - final["reward"]))
    return {"distar-score": final, "distar-kl": matched}, trajectories


def run_power_grid(
    out_dir: str | Path,
    settings: PowerSettings | None = None,
    *,
    teacher_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train and score every (arm, seed) cell not yet in ``out_dir/power.json``; rewrite it after each cell.

    Returns:
        {"settings", "teacher": the teacher's row, "cells": {"arm/seedN": row}, "trajectories": DI* runs,
        "summary": :func:`summarise_power`}.
    """
    from flowalign.rewards.toy_classifier import load_toy_classifier
    from flowalign.toy.metrics import sample_mean

    p = settings or PowerSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(p.onestep.threads)
    teacher_dir = _teacher_dir(teacher_dir)
    path = out_dir / "power.json"
    results = _load(path)
    results["settings"] = json.loads(json.dumps(asdict(p), default=str))
    baseline = _teacher(out_dir, teacher_dir, p.onestep)
    reward = load_toy_classifier()
    teacher_row = one_step_report("teacher", baseline, reference_media=baseline.media)
    teacher_row["reward"] = sample_mean(reward.score(baseline.media, baseline.prompts)["ta"])
    results["teacher"] = teacher_row

    def save() -> None:  # merged with what other processes of the same grid wrote meanwhile
        with exclusive_lock(out_dir / "power.lock"):
            disk = _load(path)
            results["cells"] = {**disk["cells"], **results["cells"]}
            results["trajectories"] = {**disk.get("trajectories", {}), **results.get("trajectories", {})}
            results["summary"] = summarise_power(results["cells"], _seeds(results["cells"]))
            atomic_write_json(path, results, indent=1)
            atomic_write_text(out_dir / "power.md", power_markdown(results))

    for seed in p.seeds:
        for div in (a for a in FDISTILL_ARMS if a in p.arms):
            key = _cell_key(div, seed)
            if key in results["cells"]:
                continue
            model_dir, seconds = _fdistill_student(out_dir, teacher_dir, div, seed, p.onestep)
            evaluation = evaluate_one_step(model_dir, p.onestep)
            row = one_step_report(key, evaluation, reference_media=baseline.media, seconds=seconds)
            row["reward"] = sample_mean(reward.score(evaluation.media, evaluation.prompts)["ta"])
            row.update(weight_spread(Path(model_dir).parent))
            results["cells"][key] = row
            save()
            log(f"{key}: tv {row['tv_joint']:.3f} vq {row['vq']:.3f} ta {row['ta']:.3f} ({seconds:.0f} s)")
        if any(a in p.arms for a in DISTAR_ARMS) and _cell_key("distar-score", seed) not in results["cells"]:
            rows, trajectories = _distar_cells(out_dir, teacher_dir, seed, p, baseline, reward)
            for arm, row in rows.items():
                results["cells"][_cell_key(arm, seed)] = {**row, "model": f"{row['model']} (seed {seed})"}
            results.setdefault("trajectories", {})[f"seed{seed}"] = trajectories
            save()
            log(
                f"distar seed {seed}: " + ", ".join(f"{a} div {r['div_jitter']:.3f}" for a, r in rows.items())
            )
    save()
    return results


def paired(values_a: Sequence[float], values_b: Sequence[float]) -> dict[str, float]:
    """Mean paired difference a - b over seeds, its standard error std(d) / sqrt(n), and t = mean / s.e."""
    if len(values_a) != len(values_b) or not values_a:
        raise ValueError(f"paired: need equal, non-empty lists, got {len(values_a)} and {len(values_b)}")
    d = [a - b for a, b in zip(values_a, values_b, strict=True)]
    return {"n": len(d), **_mean_se(d), "t": _t(d)}


def _mean_se(x: Sequence[float]) -> dict[str, float]:
    n = len(x)
    mean = sum(x) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1) / n) if n > 1 else float("nan")
    return {"mean": mean, "se": se}


def _t(d: Sequence[float]) -> float:
    ms = _mean_se(d)
    return ms["mean"] / ms["se"] if ms["se"] > 0 else float("nan")


def summarise_power(cells: dict[str, dict[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """Seed-level mean ± s.e. of every metric per arm, and each claim's paired differences and verdict."""
    arms = {}
    for arm in ARMS:
        rows = [cells[_cell_key(arm, s)] for s in seeds if _cell_key(arm, s) in cells]
        if rows:
            arms[arm] = {
                "seeds": len(rows),
                **{m: _mean_se([r[m] for r in rows]) for m in METRICS if m in rows[0]},
            }
    claims = {}
    for name, (a, b, metrics) in CLAIMS.items():
        both = [s for s in seeds if _cell_key(a, s) in cells and _cell_key(b, s) in cells]
        if len(both) < 2:
            continue
        diffs = {}
        for metric in (*(m for m, _ in metrics), "ta", "vq", "reward"):
            diffs[metric] = paired(
                [cells[_cell_key(a, s)][metric] for s in both], [cells[_cell_key(b, s)][metric] for s in both]
            )
        claims[name] = {"a": a, "b": b, "diffs": diffs, "verdict": _verdict(diffs, metrics)}
    return {"arms": arms, "claims": claims}


def _verdict(diffs: dict[str, dict[str, float]], metrics: Sequence[tuple[str, int]]) -> str:
    """The module docstring's rule: the primary metric favours the claim by > c s.e., no other against it."""

    def favour(metric: str, sign: int) -> float:  # paired difference in s.e. units, > 0 favours the claim
        d = diffs[metric]
        if d["se"] > 0:
            return sign * d["mean"] / d["se"]
        return math.copysign(math.inf, sign * d["mean"]) if d["mean"] else 0.0

    n = int(diffs[metrics[0][0]]["n"])
    if n < 3:
        return f"not tested ({n} seeds, 3 needed)"
    c = T_95[min(n - 1, len(T_95)) - 1]
    primary, *others = metrics
    score = favour(*primary)
    against = [m for m, sign in others if favour(m, sign) < -c]
    if score > c and not against:
        return "reproduced"
    if score < -c:
        return f"contradicted (primary metric against the claim by > {c} s.e.)"
    return "not reproduced at this power" + (
        f" ({', '.join(against)} against by > {c} s.e.)" if against else ""
    )


def _fmt(ms: dict[str, float]) -> str:
    return f"{ms['mean']:.3f} ± {ms['se']:.3f}" if not math.isnan(ms["se"]) else f"{ms['mean']:.3f}"


def power_markdown(results: dict[str, Any]) -> str:
    """The arm table (seed-level mean ± s.e.) and the claim table (paired differences) in markdown."""
    summary = results.get("summary") or summarise_power(results["cells"], _seeds(results["cells"]))
    cols = ("tv_joint", "entropy", "div_jitter", "div_pixel", "ta", "vq", "reward")
    head = "| arm | seeds | TV to teacher ↓ | attr. entropy | jitter div. | pixel div. | ta | vq | classifier reward |"
    lines = [head, "|---" * (len(cols) + 2) + "|"]
    t = results.get("teacher")
    if t:
        lines.append(
            "| teacher (20 steps, CFG 3) | — | " + " | ".join(f"{t.get(c, 0.0):.3f}" for c in cols) + " |"
        )
    for arm, row in summary["arms"].items():
        lines.append(
            f"| {arm} | {row['seeds']} | " + " | ".join(_fmt(row[c]) if c in row else "" for c in cols) + " |"
        )
    lines += ["", "| claim | A − B | paired differences (mean ± s.e., t) | verdict |", "|---|---|---|---|"]
    for name, claim in summary["claims"].items():
        parts = ", ".join(f"{m} {_fmt(d)} (t {d['t']:.1f})" for m, d in claim["diffs"].items())
        lines.append(f"| {name} | {claim['a']} − {claim['b']} | {parts} | {claim['verdict']} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    args = parser.parse_args(argv)
    run_power_grid(args.out_dir, PowerSettings(seeds=tuple(args.seeds), arms=tuple(args.arms)))
    print(power_markdown(_load(args.out_dir / "power.json")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
