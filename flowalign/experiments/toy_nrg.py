"""The toy-world Flow-NRG experiment: does noise-aware latent guidance move the oracle scores?

:func:`run_toy_nrg_experiment` trains a noise-aware and a clean-input latent reward
(:mod:`flowalign.training.methods.latent_reward`) on the toy image model's own samples labelled by the
exact oracles, then samples held-out captions unguided and guided from the same noise and reports the
paired oracle gains.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from flowalign import flow
from flowalign.config import OptimConfig, TrainConfig
from flowalign.evals.stats import mean_and_se
from flowalign.models import load_flow_model
from flowalign.objectives.bt_ties import labels_from_scores, pairwise_accuracy
from flowalign.rewards.latent import LatentRewardModel
from flowalign.sampling.nrg import latent_reward_guidance
from flowalign.toy.oracles import score_images
from flowalign.toy.world import toy_prompts
from flowalign.training.loop import train
from flowalign.training.methods.latent_reward import (
    LatentRewardTraining,
    LatentRewardTrainingConfig,
    ScoredPairs,
    pairs_within_groups,
)


def _sample_and_score(model, prompts, noise, *, steps, cfg_scale, batch_size, transforms_for=None):
    """Generate from fixed ``noise`` in batches, score with the toy oracles; returns (latents, scores)."""
    from flowalign.pipelines import FlowPipeline
    from flowalign.toy.oracles import score_images

    pipe, latents, scores = FlowPipeline(model), [], {}
    size = noise.shape[-1]
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo : lo + batch_size]
        out = pipe(
            chunk,
            latents=noise[lo : lo + batch_size],
            num_inference_steps=steps,
            guidance_scale=cfg_scale,
            height=size,
            width=size,
            velocity_transforms=None if transforms_for is None else transforms_for(chunk),
        )
        latents.append(out.latents)
        for key, value in score_images(out.media, chunk).items():
            scores.setdefault(key, []).append(value)
    return torch.cat(latents), {k: torch.cat(v) for k, v in scores.items()}


def _pair_accuracy(
    guide, model, latents, prompts, scores, *, t: float, seed: int
) -> dict[str, tuple[float, float]]:
    """Accuracy +- binomial standard error of the guide on same-caption non-tie pairs noised to time t."""
    nan = (float("nan"), float("nan"))
    pairs = pairs_within_groups(prompts)
    if not pairs:
        return dict.fromkeys(guide.dimensions, nan)
    i, j = (torch.tensor(c) for c in zip(*pairs, strict=True))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    x_t = flow.interpolate(latents, noise, t)
    with torch.no_grad():
        cond, _ = model.encode_prompt(prompts)
        r = guide(x_t.to(guide.device), torch.full((len(prompts),), t, device=guide.device), cond)
    out = {}
    for d in guide.dimensions:
        labels = labels_from_scores(scores[d][i], scores[d][j], tie_margin=TIE_MARGIN[d])
        n = int((labels.abs() == 1).sum())
        acc = float(pairwise_accuracy(r[d][i].cpu(), r[d][j].cpu(), labels))
        out[d] = (acc, math.sqrt(acc * (1 - acc) / n)) if n else nan
    return out


TIE_MARGIN = {"vq": 0.05, "ta": 0.1}  # ta is a multiple of 0.25: equal ta is a tie


def counterfactual_renders(num: int, *, seed: int, size: int) -> tuple[list[str], Tensor, Tensor]:
    """``num`` (caption, true render, render with a wrong shape or colour) triples from the train split.

    The two renders share every pixel of geometry but the changed attribute, so they contrast exactly
    what text alignment measures; 70% change the shape (the base model's weakest attribute), 30% the
    colour.
    """
    import dataclasses

    import numpy as np

    from flowalign.toy.render import render_images
    from flowalign.toy.world import COLOURS, SHAPES, sample_scene

    rng = np.random.default_rng([seed, 7])
    true, wrong = [], []
    for k in range(num):
        scene = sample_scene(k, seed=seed + 1, split="train")
        attrs = scene.attributes
        field_name, vocab = ("shape", SHAPES) if rng.random() < 0.7 else ("colour", COLOURS)
        others = [v for v in vocab if v != getattr(attrs, field_name)]
        changed = dataclasses.replace(attrs, **{field_name: others[int(rng.integers(len(others)))]})
        true.append(scene)
        wrong.append(dataclasses.replace(scene, attributes=changed))
    return [s.caption for s in true], render_images(true, size=size), render_images(wrong, size=size)


def run_toy_nrg_experiment(
    base_model_dir: str | Path,
    out_dir: str | Path,
    *,
    num_train_prompts: int = 64,
    samples_per_prompt: int = 8,
    num_eval: int = 256,
    num_inference_steps: int = 20,
    guidance_scale: float = 3.0,
    train_steps: int = 300,
    batch_size: int = 32,
    lr: float = 3e-4,
    num_blocks: int = 2,
    strength: float = 1.0,
    settings: Mapping[str, Mapping[str, float]] | None = None,
    size: int | None = None,
    clean_weights: Mapping[str, float] | None = None,
    share_noise: bool = False,
    counterfactual_pairs: int = 1024,
    seed: int = 0,
) -> dict[str, dict[str, tuple[float, float]]]:
    """Train latent rewards on the toy image model's own samples (oracle-labelled) and compare guidance.

    1. Samples ``samples_per_prompt`` images for ``num_train_prompts`` training captions, scores them
       with the toy oracles and pairs samples of the same caption (ties within 0.05 vq / 0.1 ta).
    2. Trains two latent reward models (dimensions vq, ta) on those pairs: noise-aware (t ~ U[0, 0.98])
       and the clean-input ablation (t = 0), ``train_steps`` steps each, exported under ``out_dir``.
    3. Samples ``num_eval`` held-out-caption images from the same noise for every setting: unguided,
       guided by the noisy reward with each weight set in ``settings`` (default ta, vq and an even
       mix), and guided by the clean-input reward with ``clean_weights`` (default {vq: 1}); scores them
       with the oracles.

    Args:
        base_model_dir: a trained toy image model folder (diffusers layout).
        out_dir: where the reward-model runs, ``results.json`` and ``summary.md`` go.
        num_train_prompts, samples_per_prompt: size of the distillation set.
        num_eval: held-out samples per setting (>= 256 for the reported numbers).
        num_inference_steps, guidance_scale: sampling settings (Euler, CFG).
        train_steps, batch_size, lr, num_blocks: latent reward training.
        strength: guidance strength w.
        settings: {name: weights} guided by the noisy reward.
        size: image side (default: the model's default height).
        clean_weights: weights of the clean-input-reward setting ("clean_rm:<dims>").
        share_noise: noise the two members of a training pair with one draw (see the config).
        counterfactual_pairs: add this many rendered pairs (true render vs the same scene with a wrong
            shape or colour, labelled by the oracles) to the sampled pairs.
        seed: seeds prompts, noise and training.

    Returns:
        {setting: {metric: (mean, standard error)}}: oracle vq, ta, all_correct over the eval samples
        per setting, for guided settings also ``{metric}_gain`` = mean of guided - unguided on the
        same noise and caption (paired standard error); and for "rm_accuracy:noisy" / "rm_accuracy:clean", the pairwise accuracy of each
        reward (with binomial standard error) on same-caption non-tie pairs of the unguided eval
        samples noised to t = 0, 0.5, 0.8 ("{dim}_accuracy@t={t}").
    """
    wall, cpu = time.perf_counter(), time.process_time()
    out_dir = Path(out_dir)
    model = load_flow_model(base_model_dir).eval()
    if model.is_video:
        raise ValueError(
            f"{base_model_dir}: run_toy_nrg_experiment needs an image model (the toy image oracles)"
        )
    size = size or model.default_height
    settings = dict(settings or {"ta": {"ta": 1.0}, "vq": {"vq": 1.0}, "vq+ta": {"vq": 0.5, "ta": 0.5}})
    prompts, noise = _training_prompts(num_train_prompts, samples_per_prompt, size=size, seed=seed)
    sample = dict(steps=num_inference_steps, cfg_scale=guidance_scale, batch_size=64)
    pairs = _distillation_pairs(model, prompts, noise, sample, counterfactual_pairs, seed=seed, size=size)
    training = dict(num_blocks=num_blocks, share_noise=share_noise, steps=train_steps, batch_size=batch_size)
    guides = _train_guides(model, pairs, out_dir, lr=lr, seed=seed, **training)

    runs = {"unguided": (None, {})} | {f"noisy_rm:{n}": ("noisy", w) for n, w in settings.items()}
    clean_weights = dict(clean_weights or {"vq": 1.0})
    runs["clean_rm:" + "+".join(clean_weights)] = ("clean", clean_weights)
    results = _evaluate(
        model, guides, runs, sample, num_eval=num_eval, size=size, strength=strength, seed=seed
    )
    _write_results(
        out_dir, results, f"wall {time.perf_counter() - wall:.0f} s, CPU {time.process_time() - cpu:.0f} s"
    )
    return results


def _training_prompts(num_prompts: int, per_prompt: int, *, size: int, seed: int) -> tuple[list[str], Tensor]:
    """``num_prompts`` random train-split captions, each ``per_prompt`` times, and one noise draw each."""
    g = torch.Generator().manual_seed(seed)
    train_captions = toy_prompts("train", "image")
    picks = torch.randperm(len(train_captions), generator=g)[:num_prompts].tolist()
    prompts = [train_captions[k] for k in picks for _ in range(per_prompt)]
    return prompts, torch.randn(len(prompts), 3, size, size, generator=g)


def _evaluate(model, guides, runs, sample, *, num_eval: int, size: int, strength: float, seed: int):
    """Oracle scores of every setting in ``runs`` ({name: (guide kind or None, weights)}) on the same
    held-out captions and noise, paired gains against the unguided samples, and each guide's pair accuracy."""
    heldout = toy_prompts("heldout", "image")
    eval_prompts = [heldout[k % len(heldout)] for k in range(num_eval)]
    eval_noise = torch.randn(num_eval, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    results: dict[str, dict[str, tuple[float, float]]] = {}
    unguided = None
    for name, (kind, weights) in runs.items():
        transforms = None
        if kind is not None:

            def transforms(chunk, guide=guides[kind], weights=weights):
                return [latent_reward_guidance(model, guide, chunk, weights, strength=strength)]

        lat, sc = _sample_and_score(model, eval_prompts, eval_noise, transforms_for=transforms, **sample)
        unguided = (lat, sc) if kind is None else unguided
        results[name] = {m: mean_and_se(sc[m]) for m in ("vq", "ta", "all_correct")}
        if kind is not None:  # paired: same noise and caption as the unguided sample
            results[name] |= {
                f"{m}_gain": mean_and_se(sc[m] - unguided[1][m]) for m in ("vq", "ta", "all_correct")
            }
    for kind, guide in guides.items():
        row = {}
        for t in (0.0, 0.5, 0.8):
            acc = _pair_accuracy(guide, model, unguided[0], eval_prompts, unguided[1], t=t, seed=seed + 2)
            row.update({f"{d}_accuracy@t={t}": v for d, v in acc.items()})
        results[f"rm_accuracy:{kind}"] = row
    return results


def _distillation_pairs(model, prompts, noise, sample, counterfactual_pairs: int, *, seed: int, size: int):
    """The model's own samples of ``prompts`` scored by the oracles and paired within each caption, plus
    ``counterfactual_pairs`` rendered (true, wrong shape or colour) pairs."""
    latents, scores = _sample_and_score(model, prompts, noise, **sample)
    index_pairs = pairs_within_groups(prompts)
    if counterfactual_pairs:
        captions, true, wrong = counterfactual_renders(counterfactual_pairs, seed=seed, size=size)
        n, m = len(prompts), len(captions)
        media = torch.cat([true, wrong])
        extra = score_images(media, captions + captions)
        with torch.no_grad():
            latents = torch.cat([latents, model.encode_media(media.to(model.device)).cpu()])
        scores = {d: torch.cat([scores[d], extra[d]]) for d in ("vq", "ta")}
        prompts = prompts + captions + captions
        index_pairs += [(n + k, n + m + k) for k in range(m)]
    return ScoredPairs(
        latents,
        prompts,
        {d: scores[d] for d in ("vq", "ta")},
        index_pairs,
        tie_margin=TIE_MARGIN,
    )


def _train_guides(
    model, pairs, out_dir: Path, *, num_blocks, share_noise, steps, batch_size, lr, seed
) -> dict[str, LatentRewardModel]:
    """The noise-aware ("noisy") and clean-input ("clean") latent rewards trained on ``pairs``."""
    guides = {}
    for kind in ("noisy", "clean"):
        cfg = LatentRewardTrainingConfig(
            dimensions=["vq", "ta"],
            num_blocks=num_blocks,
            trunk_training="lora",
            clean_inputs=kind == "clean",
            share_noise=share_noise,
        )
        method = LatentRewardTraining(model, cfg)
        run = TrainConfig(
            output_dir=out_dir / f"rm_{kind}",
            max_steps=steps,
            batch_size=batch_size,
            seed=seed,
            trackers=[],
            cpu=model.device.type == "cpu",
            log_every=50,
            optim=OptimConfig(lr=lr, weight_decay=0.0, warmup_steps=min(20, steps // 10)),
        )
        result = train(method, pairs, run, progress=False, resume=True)  # a rerun reuses finished runs
        guides[kind] = LatentRewardModel.from_pretrained(result.export_dir, model=model, device=model.device)
    return guides


def _write_results(out_dir: Path, results: dict[str, dict[str, tuple[float, float]]], footer: str) -> None:
    """``results.json`` and ``summary.md`` (one table per run of settings with the same metrics)."""
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines, header = [], None
    for name, row in results.items():
        if list(row) != header:
            header = list(row)
            lines += ["", "| setting | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
        lines.append(f"| {name} | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in row.values()) + " |")
    lines.append(f"\n{footer}")
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
