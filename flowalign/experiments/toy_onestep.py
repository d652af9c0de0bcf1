"""Toy-world experiments for the one-step methods: f-distill and Diff-Instruct* on the toy image teacher.

Pieces the demo calls (the differentiable reward DI* optimises is
:class:`flowalign.rewards.toy_classifier.ToyAttributeClassifier`; the sample-set metrics are in
:mod:`flowalign.toy.metrics`, with the table rows of :func:`flowalign.toy.metrics.one_step_report`):

- experiments: :func:`fdistill_experiment` (one-step vs teacher), :func:`divergence_comparison`
  (reverse-KL vs JS vs forward-KL at the same budget), :func:`distar_experiment` (DI* vs teacher and vs the
  KL-regularised variant at matched reward). Each returns rows the demo prints as a table.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowalign.rewards.base import RewardModel
from flowalign.rewards.toy_classifier import load_toy_classifier
from flowalign.toy.metrics import format_table, one_step_report, sample_mean
from flowalign.toy.render import render_prompts

__all__ = [
    "OneStepToySettings",
    "distar_experiment",
    "distill_toy",
    "divergence_comparison",
    "fdistill_experiment",
    "one_step_demo",
]


@dataclass
class OneStepToySettings:
    """Budget and hyper-parameters of the toy one-step experiments (2 CPU cores, minutes per run)."""

    steps: int = 200
    """Optimizer steps per distillation run (generator + critic steps together)."""
    batch_size: int = 32
    generator_every: int = 2
    """K: generator step every K-th step (a small K suits the short toy budget)."""
    guidance_scale: float = 3.0
    """Teacher CFG (the toy teacher's best scale, docs/toy-world.md)."""
    generator_lr: float = 3e-4
    critic_lr: float = 1e-3
    generator_beta1: float = 0.9
    """Adam beta1 of the generator (DMD2 uses 0; momentum averages the noisy per-sample DMD gradients)."""
    ema_decay: float = 0.95
    """EMA of the generator weights (0: off); the EMA weights are then the exported model."""
    generator_schedule: str = "constant"
    """Generator LR schedule: constant, linear or cosine (decay to 0 at the last step)."""
    t_power: float = 10.0
    """Time sampling t = t_min + (t_max - t_min) u^p of both groups (see OneStepConfig.t_power). The
    factor that mattered most for the one-step student's quality (docs/results.md, one-step section):
    p = 1 / 3 / 6 / 10 / 20 give vq 0.368 / 0.480 / 0.507 / 0.539 / 0.506 at 200 steps."""
    num_items: int = 4096
    """Real renders (train split) the discriminator sees."""
    gan_weight: float = 1e-3
    """f-distill's lambda_GAN."""
    eval_samples: int = 256
    eval_seed: int = 1000
    teacher_steps: int = 20
    """Euler steps of the teacher baseline."""
    regression_steps: int = 0
    """Generator-only regression steps on teacher ODE outputs before distillation (added to ``steps``)."""
    regression_teacher_steps: int = 8
    """Euler steps of the teacher ODE giving the regression targets."""
    generator_widen: int = 1
    """Generator width as a multiple of the teacher's (``OneStepConfig.generator_widen``)."""
    seed: int = 0
    threads: int = 1


def _teacher_dir(teacher_dir: str | Path | None) -> Path:
    if teacher_dir is not None:
        return Path(teacher_dir)
    from flowalign.experiments.toy_base import toy_base_model

    return toy_base_model("image")


def _train_config(out_dir: Path, s: OneStepToySettings, *, checkpoint_every: int = 0):
    from flowalign.config import CheckpointConfig, EMAConfig, OptimConfig, TrainConfig

    return TrainConfig(
        output_dir=out_dir,
        seed=s.seed,
        max_steps=s.steps + s.regression_steps,
        batch_size=s.batch_size,
        grad_clip=1.0,
        log_every=1,
        trackers=[],
        cpu=not torch.cuda.is_available(),
        optim=OptimConfig(lr=s.generator_lr, betas=(s.generator_beta1, 0.999), weight_decay=0.0),
        ema=EMAConfig(use=s.ema_decay > 0, decay=s.ema_decay if s.ema_decay > 0 else 0.9999),
        checkpoint=CheckpointConfig(every=checkpoint_every, keep_last=None),
    )


def distill_toy(
    teacher_dir: str | Path | None,
    out_dir: str | Path,
    method_config,
    settings: OneStepToySettings | None = None,
    *,
    reward: RewardModel | None = None,
    checkpoint_every: int = 0,
    progress: bool = False,
) -> tuple[Path, float]:
    """Run f-distill (an ``FDistillConfig``) or DI* (a ``DistarConfig``) on the toy teacher.

    Returns:
        (the exported one-step model folder, training CPU time of this process in seconds).
    """
    from flowalign.config import OptimConfig
    from flowalign.models import load_flow_model
    from flowalign.toy.data import PrerenderedToy, ToyDataset
    from flowalign.training.loop import train
    from flowalign.training.methods.distar import DiffInstructStar, DistarConfig
    from flowalign.training.methods.fdistill import FDistill
    from flowalign.training.methods.onestep_data import PromptDataset

    s = settings or OneStepToySettings()
    torch.set_num_threads(s.threads)
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    teacher = load_flow_model(_teacher_dir(teacher_dir))
    cfg = replace(
        method_config,
        guidance_scale=s.guidance_scale,
        generator_every=s.generator_every,
        generator_optim=OptimConfig(
            lr=s.generator_lr,
            betas=(s.generator_beta1, 0.999),
            weight_decay=0.0,
            schedule=s.generator_schedule,
        ),
        t_power=s.t_power,
        regression_steps=s.regression_steps,
        regression_teacher_steps=s.regression_teacher_steps,
        generator_widen=s.generator_widen,
        critic_optim=OptimConfig(lr=s.critic_lr, betas=(0.0, 0.999), weight_decay=0.0),
    )
    if isinstance(cfg, DistarConfig):
        method = DiffInstructStar(teacher, cfg, reward=reward)
        from flowalign.toy.world import toy_prompts

        data = PromptDataset([p for _ in range(4) for p in toy_prompts("train", "image")])
    else:
        method = FDistill(teacher, cfg)
        data = PrerenderedToy(ToyDataset("train", num=s.num_items, seed=s.seed))
    start = time.perf_counter()
    result = train(
        method, data, _train_config(out_dir, s, checkpoint_every=checkpoint_every), progress=progress
    )
    seconds = time.perf_counter() - start
    assert result.export_dir is not None
    final = Path(str(result.export_dir) + "-ema") if s.ema_decay > 0 else result.export_dir
    return final, seconds


def weight_spread(run_dir: str | Path, *, last: int = 20) -> dict[str, float]:
    """Mean over the last ``last`` generator steps of the f-distill weights' max and min (h~ = 1: no effect).

    Read from the run's metrics.jsonl; tells whether the discriminator moved the weights away from 1
    (if it did not, every divergence reduces to reverse-KL / DMD).
    """
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("generator/weight_max") is not None][-last:]
    if not rows:
        return {"w_max": 1.0, "w_min": 1.0}
    return {
        "w_max": sum(r["generator/weight_max"] for r in rows) / len(rows),
        "w_min": sum(r["generator/weight_min"] for r in rows) / len(rows),
    }


def evaluate_one_step(model, settings: OneStepToySettings | None = None):
    """Held-out one-step samples of a distilled generator (no CFG: the teacher's is distilled in)."""
    from flowalign.experiments.toy_base import evaluate_toy

    s = settings or OneStepToySettings()
    return evaluate_toy(
        model, num_samples=s.eval_samples, seed=s.eval_seed, one_step=True, guidance_scale=1.0
    )


def teacher_baseline(teacher_dir: str | Path | None = None, settings: OneStepToySettings | None = None):
    """The teacher's multi-step samples (Euler, CFG) on the same held-out prompts and seeds."""
    from flowalign.experiments.toy_base import evaluate_toy

    s = settings or OneStepToySettings()
    torch.set_num_threads(s.threads)
    return evaluate_toy(
        _teacher_dir(teacher_dir),
        num_samples=s.eval_samples,
        seed=s.eval_seed,
        guidance_scale=s.guidance_scale,
        num_inference_steps=s.teacher_steps,
    )


def _baseline_rows(teacher_dir: Path, s: OneStepToySettings, baseline) -> tuple[list[dict[str, Any]], Tensor]:
    from flowalign.experiments.toy_base import ToyEvaluation, evaluate_toy
    from flowalign.toy.oracles import score_images

    ref = baseline.media
    data_media = render_prompts(baseline.prompts, seed=s.eval_seed)
    data = ToyEvaluation(baseline.prompts, data_media, score_images(data_media, baseline.prompts))
    undistilled = evaluate_toy(
        teacher_dir,
        num_samples=s.eval_samples,
        seed=s.eval_seed,
        one_step=True,
        guidance_scale=s.guidance_scale,
    )
    rows = [
        one_step_report("data (renders)", data, reference_media=ref, steps=0),
        one_step_report(
            f"teacher {s.teacher_steps}-step CFG {s.guidance_scale:g}",
            baseline,
            reference_media=ref,
            steps=s.teacher_steps,
        ),
        one_step_report("teacher 1-step (no distillation)", undistilled, reference_media=ref, steps=1),
    ]
    return rows, ref


def fdistill_experiment(
    out_dir: str | Path,
    *,
    teacher_dir: str | Path | None = None,
    settings: OneStepToySettings | None = None,
    divergence: str = "js",
    baseline=None,
) -> dict[str, Any]:
    """f-distill one-step generator vs the toy teacher's multi-step samples (issue 7's toy result).

    Returns:
        {"rows": table rows (data, teacher N-step, teacher 1-step, f-distill 1-step), "model": export folder,
        "verdict": the acceptance checks with their margins}.
    """
    from flowalign.training.methods.fdistill import FDistillConfig

    s = settings or OneStepToySettings()
    teacher_dir = _teacher_dir(teacher_dir)
    baseline = baseline or teacher_baseline(teacher_dir, s)
    rows, ref = _baseline_rows(teacher_dir, s, baseline)
    model_dir, seconds = distill_toy(
        teacher_dir,
        Path(out_dir) / f"fdistill-{divergence}",
        FDistillConfig(divergence=divergence, gan_weight=s.gan_weight),
        s,
    )
    student = one_step_report(
        f"f-distill {divergence} 1-step",
        evaluate_one_step(model_dir, s),
        reference_media=ref,
        seconds=seconds,
        steps=1,
    )
    student.update(weight_spread(Path(model_dir).parent))
    rows.append(student)
    teacher_row = rows[1]
    verdict = {
        "ta_gap": teacher_row["ta"] - student["ta"],
        "vq_gap": teacher_row["vq"] - student["vq"],
        "tv_to_teacher": student["tv_joint"],
        "diversity_ratio": student["div_jitter"] / max(teacher_row["div_jitter"], 1e-9),
    }
    return {"rows": rows, "model": model_dir, "seconds": seconds, "verdict": verdict}


def divergence_comparison(
    out_dir: str | Path,
    *,
    teacher_dir: str | Path | None = None,
    settings: OneStepToySettings | None = None,
    divergences: Sequence[str] = ("rkl", "js", "kl"),
    baseline=None,
    trained: dict[str, tuple[Path, float]] | None = None,
) -> dict[str, Any]:
    """Reverse-KL vs JS vs forward-KL f-distill at the same budget (same seeds, steps, batch, networks).

    ``trained`` maps a divergence to an existing (model folder, CPU seconds) run with the same settings
    (e.g. the JS run of :func:`fdistill_experiment`), which is evaluated instead of trained again.
    The paper finds JS / forward-KL better than reverse-KL (less mode seeking): compare ``tv_joint``
    (distance to the teacher's samples) and the diversity columns.
    """
    from flowalign.training.methods.fdistill import FDistillConfig

    s = settings or OneStepToySettings()
    teacher_dir = _teacher_dir(teacher_dir)
    baseline = baseline or teacher_baseline(teacher_dir, s)
    ref = baseline.media
    rows = [
        one_step_report(
            f"teacher {s.teacher_steps}-step", baseline, reference_media=ref, steps=s.teacher_steps
        )
    ]
    models = {}
    for div in divergences:
        if trained and div in trained:
            model_dir, seconds = trained[div]
        else:
            model_dir, seconds = distill_toy(
                teacher_dir,
                Path(out_dir) / f"fdistill-{div}",
                FDistillConfig(divergence=div, gan_weight=s.gan_weight),
                s,
            )
        models[div] = model_dir
        row = one_step_report(
            f"f-distill {div}", evaluate_one_step(model_dir, s), reference_media=ref, seconds=seconds, steps=1
        )
        row.update(weight_spread(Path(model_dir).parent))
        rows.append(row)
    return {"rows": rows, "models": models}


def _checkpoint_rows(
    label: str, run_dir: Path, teacher_dir: Path, s: OneStepToySettings, ref: Tensor, reward: RewardModel
) -> list[dict[str, Any]]:
    """Evaluate the generator of every checkpoint of a run (one-step, held-out): the run's trajectory."""
    from safetensors.torch import load_file

    from flowalign.models import load_flow_model
    from flowalign.training.checkpoint import list_checkpoints, load_trainable_state_dict

    model = load_flow_model(teacher_dir)
    rows = []
    for ckpt in list_checkpoints(run_dir):
        # the EMA shadow when the run keeps one (the exported model is the EMA too), else the raw weights
        ema = ckpt / "ema.safetensors"
        if ema.is_file():
            prefix = "generator."
            state = {k[len(prefix) :]: v for k, v in load_file(str(ema)).items() if k.startswith(prefix)}
            source = str(ema)
        else:
            source = str(ckpt / "model-generator.safetensors")
            state = load_file(source)
        load_trainable_state_dict(model.transformer, state, source=source)
        evaluation = evaluate_one_step(model, s)
        row = one_step_report(
            f"{label} @ {int(ckpt.name.split('-')[-1])}", evaluation, reference_media=ref, steps=1
        )
        row["reward"] = sample_mean(reward.score(evaluation.media, evaluation.prompts)["ta"])
        rows.append(row)
    return rows


def distar_experiment(
    out_dir: str | Path,
    *,
    init_dir: str | Path,
    teacher_dir: str | Path | None = None,
    settings: OneStepToySettings | None = None,
    reward_scale: float = 100.0,
    alpha: float = 1.0,
    checkpoint_every: int = 20,
    critic_warmup_steps: int = 10,
    baseline=None,
) -> dict[str, Any]:
    """DI* on the toy world vs the teacher and vs the KL-regularised variant at matched reward (issue 8).

    Both runs start from the same distilled one-step generator ``init_dir`` (DI* starts from a DMD2
    generator in the paper), optimise the differentiable ``toy_classifier`` text-alignment reward with the
    same reward scale, budget and seeds, and differ only in the regulariser (score divergence with the
    pseudo-Huber distance vs integral KL). Every checkpoint is evaluated with the exact oracles; the KL
    row reported is the checkpoint whose classifier reward is closest to DI*'s final one (matched reward).

    Returns:
        {"rows": teacher, initial generator, DI* final, KL at matched reward; "trajectories": every
        checkpoint of both runs; "verdict": TA gain over the teacher and diversity ratios}.
    """
    from flowalign.training.methods.distar import DistarConfig

    s = settings or OneStepToySettings()
    torch.set_num_threads(s.threads)
    teacher_dir = _teacher_dir(teacher_dir)
    baseline = baseline or teacher_baseline(teacher_dir, s)
    ref = baseline.media
    reward = load_toy_classifier()
    start_eval = evaluate_one_step(init_dir, s)
    init_row = one_step_report("initial 1-step generator", start_eval, reference_media=ref, steps=1)
    init_row["reward"] = sample_mean(reward.score(start_eval.media, start_eval.prompts)["ta"])
    teacher_row = one_step_report(
        f"teacher {s.teacher_steps}-step", baseline, reference_media=ref, steps=s.teacher_steps
    )
    teacher_row["reward"] = sample_mean(reward.score(baseline.media, baseline.prompts)["ta"])
    trajectories = {}
    seconds = {}
    for regularizer in ("score", "kl"):
        cfg = DistarConfig(
            reward="toy_classifier",
            reward_scale=reward_scale,
            alpha=alpha,
            regularizer=regularizer,
            generator_init=Path(init_dir),
            critic_warmup_steps=critic_warmup_steps,
        )
        run_dir = Path(out_dir) / f"distar-{regularizer}"
        _, seconds[regularizer] = distill_toy(
            teacher_dir, run_dir, cfg, s, reward=reward, checkpoint_every=checkpoint_every
        )
        label = "DI* (score div.)" if regularizer == "score" else "KL-regularised"
        trajectories[regularizer] = _checkpoint_rows(label, run_dir, teacher_dir, s, ref, reward)
    di_final = trajectories["score"][-1]
    di_final["train_cpu_s"] = seconds["score"]
    kl_matched = min(trajectories["kl"], key=lambda r: abs(r["reward"] - di_final["reward"]))
    kl_matched = {
        **kl_matched,
        "model": kl_matched["model"] + " (matched reward)",
        "train_cpu_s": seconds["kl"],
    }
    verdict = {
        "ta_gain_over_teacher": di_final["ta"] - teacher_row["ta"],
        "ta_gain_se": math.hypot(di_final["ta_se"], teacher_row["ta_se"]),
        "diversity_ratio_to_teacher": di_final["div_jitter"] / max(teacher_row["div_jitter"], 1e-9),
        "pixel_diversity_ratio_to_teacher": di_final["div_pixel"] / max(teacher_row["div_pixel"], 1e-9),
        "matched_reward_gap": kl_matched["reward"] - di_final["reward"],
        "diversity_di_minus_kl": di_final["div_jitter"] - kl_matched["div_jitter"],
        "vq_di_minus_kl": di_final["vq"] - kl_matched["vq"],
    }
    return {
        "rows": [teacher_row, init_row, di_final, kl_matched],
        "trajectories": trajectories,
        "verdict": verdict,
    }


def one_step_demo(
    out_dir: str | Path,
    *,
    teacher_dir: str | Path | None = None,
    settings: OneStepToySettings | None = None,
    distar_settings: OneStepToySettings | None = None,
    reward_scale: float = 100.0,
) -> dict[str, Any]:
    """The demo's one-step stage: f-distill (JS) vs teacher, rKL vs JS vs fKL, DI* vs teacher and vs KL.

    Four distillation runs (JS, reverse-KL, forward-KL, then DI* and its KL variant starting from the JS
    generator) and one teacher evaluation shared by all tables.

    Returns:
        {"fdistill", "divergences", "distar": each experiment's result, "text": the three tables}.
    """
    s = settings or OneStepToySettings()
    ds = distar_settings or replace(s, steps=100, generator_lr=1e-4, regression_steps=0)
    out_dir = Path(out_dir)
    teacher_dir = _teacher_dir(teacher_dir)
    baseline = teacher_baseline(teacher_dir, s)
    fd = fdistill_experiment(out_dir, teacher_dir=teacher_dir, settings=s, baseline=baseline)
    divs = divergence_comparison(
        out_dir,
        teacher_dir=teacher_dir,
        settings=s,
        baseline=baseline,
        trained={"js": (fd["model"], fd["seconds"])},
    )
    di = distar_experiment(
        out_dir,
        init_dir=fd["model"],
        teacher_dir=teacher_dir,
        settings=ds,
        baseline=baseline,
        reward_scale=reward_scale,
    )
    text = "\n\n".join(
        [
            "f-distill one-step vs the teacher (256 held-out prompts, exact oracles)\n"
            + format_table(fd["rows"]),
            "divergences at the same budget\n" + format_table(divs["rows"]),
            "Diff-Instruct* vs the teacher and the KL-regularised variant at matched reward\n"
            + format_table(di["rows"]),
        ]
    )
    return {"fdistill": fd, "divergences": divs, "distar": di, "text": text}
