"""The stages of ``flowalign demo``; each evaluates its model on the base's held-out prompts and seeds.

- ``base``: the toy image base model (the package's trained copy of ``ToyBaseRecipe()``, or a cached or
  newly trained one for another step count);
- ``dpo``: Flow-DPO (LoRA) on best-vs-worst pairs of the base model's own samples ranked by the exact
  oracles (``flowalign.experiments.toy_alignment``);
- ``nrg``: Flow-NRG, the base sampled with the gradient of a noise-aware latent reward distilled from
  the oracles on the same base samples plus counterfactual renders (``flowalign.experiments.toy_nrg``);
- ``onestep``: a one-step student distilled from the base with f-distill (``toy_onestep``);
- ``grpo`` (not in the default set): Flow-GRPO, online RL with the oracles as the reward (``toy_grpo``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flowalign.experiments.demo_report import DemoReport, DemoRow
from flowalign.experiments.toy_base import ToyBaseRecipe, evaluate_toy, fetch_toy_base


@dataclass
class DemoContext:
    """What the stages share: the base model, its scored training-prompt samples, the report."""

    report: DemoReport
    out_dir: Path
    base_dir: Path | None = None
    pairs: object | None = None
    """The ``ToyPairs`` sampled from the base (built by the first stage that needs them)."""
    models: dict[str, Path] = field(default_factory=dict)


def _sampling(config, *, guidance: float | None = None, steps: int | None = None) -> str:
    steps = config.num_inference_steps if steps is None else steps
    guidance = config.guidance_scale if guidance is None else guidance
    return f"{steps} Euler steps, CFG {guidance:g}" if steps > 1 else "1 step, no CFG"


def evaluate(config, model, **kwargs):
    """Held-out evaluation with the demo's sample count and sampling settings (overridable)."""
    settings = dict(
        num_samples=config.num_samples,
        guidance_scale=config.guidance_scale,
        num_inference_steps=config.num_inference_steps,
        batch_size=config.eval_batch_size,
    )
    return evaluate_toy(model, **(settings | kwargs))


def stage_base(config, ctx: DemoContext) -> None:
    start = time.perf_counter()
    recipe = ToyBaseRecipe(kind="image", steps=config.base_steps)
    base_dir, source = fetch_toy_base("image", recipe=recipe, progress=False)
    fetched = time.perf_counter() - start
    ctx.base_dir = ctx.models["base"] = base_dir
    how = {
        "shipped": "shipped with the package, copied to the cache",
        "cached": "from the cache",
        "trained": f"trained now ({fetched:.0f} s)",
    }[source]
    ctx.report.add(
        DemoRow(
            "base",
            evaluate(config, base_dir),
            f"{source}: {config.base_steps}-step flow-matching SFT, {how}",
            _sampling(config),
            time.perf_counter() - start,
        )
    )
    ctx.report.notes.append(f"base model: {base_dir}")


def base_samples(config, ctx: DemoContext):
    """The base model's scored samples on training prompts (best vs worst of each prompt: DPO's pairs)."""
    from flowalign.experiments.toy_alignment import toy_pairs

    if ctx.pairs is None:
        ctx.pairs = toy_pairs(
            ctx.base_dir,
            ctx.out_dir / "base_samples",
            num_prompts=config.pair_prompts,
            num_candidates=config.pair_candidates,
            guidance_scale=config.guidance_scale,
            num_inference_steps=config.pair_inference_steps,
            progress=False,
        )
    return ctx.pairs


def stage_dpo(config, ctx: DemoContext) -> None:
    from flowalign.experiments.toy_alignment import AlignBudget, train_toy_dpo
    from flowalign.training.methods.dpo import DPOConfig

    start = time.perf_counter()
    pairs = base_samples(config, ctx)
    budget = AlignBudget(steps=config.dpo_steps, batch_size=config.dpo_batch_size, lr=config.dpo_lr)
    model_dir = train_toy_dpo(
        ctx.base_dir, pairs, ctx.out_dir / "dpo", budget, DPOConfig(beta=config.dpo_beta), progress=False
    )
    ctx.models["flow-dpo"] = model_dir
    ctx.report.add(
        DemoRow(
            "flow-dpo",
            evaluate(config, model_dir),
            f"trained now: Flow-DPO (LoRA r{budget.lora.rank}, constant β {config.dpo_beta:g}), "
            f"{config.dpo_steps} steps of {config.dpo_batch_size} pairs, lr {config.dpo_lr:g}, on "
            f"{len(pairs.chosen)} pairs (best vs worst of {config.pair_candidates} base samples by oracle "
            f"ta + vq, {config.pair_inference_steps} sampling steps)",
            _sampling(config),
            time.perf_counter() - start,
        )
    )


def train_latent_reward(config, ctx: DemoContext, model) -> Path:
    """A noise-aware latent reward (vq, ta) distilled from the oracles on the base samples' pairs
    (same prompt, ties skipped) and on counterfactual renders (true scene vs wrong shape or colour)."""
    from flowalign.config import OptimConfig, TrainConfig
    from flowalign.experiments.toy_nrg import TIE_MARGIN, counterfactual_renders
    from flowalign.toy.oracles import score_images
    from flowalign.training.loop import train
    from flowalign.training.methods.latent_reward import (
        LatentRewardTraining,
        LatentRewardTrainingConfig,
        ScoredPairs,
        pairs_within_groups,
    )

    cand = base_samples(config, ctx).candidates
    prompts, media = list(cand.prompts), cand.media
    scores = {d: cand.scores[d] for d in ("vq", "ta")}
    index_pairs = pairs_within_groups(prompts)
    if config.nrg_counterfactual_pairs:
        captions, true, wrong = counterfactual_renders(
            config.nrg_counterfactual_pairs, seed=0, size=media.shape[-1]
        )
        extra = score_images(torch.cat([true, wrong]), captions + captions)
        n, m = len(prompts), len(captions)
        index_pairs += [(n + k, n + m + k) for k in range(m)]
        prompts += captions + captions
        media = torch.cat([media, true, wrong])
        scores = {d: torch.cat([scores[d], extra[d]]) for d in scores}
    with torch.no_grad():
        latents = torch.cat([model.encode_media(media[i : i + 256]) for i in range(0, len(media), 256)])
    data = ScoredPairs(latents, prompts, scores, index_pairs, tie_margin=TIE_MARGIN)
    method = LatentRewardTraining(
        model, LatentRewardTrainingConfig(dimensions=["vq", "ta"], num_blocks=config.nrg_reward_blocks)
    )
    run = TrainConfig(
        output_dir=ctx.out_dir / "nrg" / "reward",
        max_steps=config.nrg_reward_steps,
        batch_size=config.nrg_reward_batch_size,
        trackers=[],
        cpu=model.device.type == "cpu",
        log_every=50,
        optim=OptimConfig(lr=3e-4, weight_decay=0.0, warmup_steps=min(20, config.nrg_reward_steps // 10)),
    )
    result = train(method, data, run, progress=False)
    if result.export_dir is None:
        raise RuntimeError(f"latent reward training in {run.output_dir} stopped at step {result.step}")
    return Path(result.export_dir)


def stage_nrg(config, ctx: DemoContext) -> None:
    from flowalign.models import load_flow_model
    from flowalign.rewards.latent import LatentRewardModel
    from flowalign.sampling.nrg import latent_reward_guidance

    start = time.perf_counter()
    model = load_flow_model(ctx.base_dir).eval()
    reward_dir = train_latent_reward(config, ctx, model)
    guide = LatentRewardModel.from_pretrained(reward_dir, model=model, device=model.device)
    weights = dict(config.nrg_weights)

    def transforms(prompts):
        return [latent_reward_guidance(model, guide, prompts, weights, strength=config.nrg_strength)]

    evaluation = evaluate(config, model, velocity_transforms_factory=transforms)
    ctx.report.add(
        DemoRow(
            "flow-nrg",
            evaluation,
            "base + guidance: Flow-NRG with a latent reward trained now ("
            f"{config.nrg_reward_steps} steps of {config.nrg_reward_batch_size} pairs from the base samples "
            f"and {config.nrg_counterfactual_pairs} counterfactual renders), weights "
            + ", ".join(f"{k} {v:g}" for k, v in weights.items())
            + f", strength {config.nrg_strength:g}",
            _sampling(config),
            time.perf_counter() - start,
        )
    )


def stage_onestep(config, ctx: DemoContext) -> None:
    from flowalign.experiments.toy_onestep import OneStepToySettings, distill_toy
    from flowalign.training.methods.fdistill import FDistillConfig

    start = time.perf_counter()
    settings = OneStepToySettings(
        steps=config.onestep_steps,
        batch_size=config.onestep_batch_size,
        guidance_scale=config.guidance_scale,
        threads=torch.get_num_threads(),
    )
    model_dir, _ = distill_toy(
        ctx.base_dir, ctx.out_dir / "onestep", FDistillConfig(divergence="js"), settings, progress=False
    )
    ctx.models["one-step"] = model_dir
    ctx.report.add(
        DemoRow(
            "one-step",
            evaluate(config, model_dir, one_step=True, guidance_scale=1.0),
            f"distilled now: f-distill (JS) from the base with CFG {config.guidance_scale:g}, "
            f"{config.onestep_steps} steps of {config.onestep_batch_size}",
            _sampling(config, steps=1),
            time.perf_counter() - start,
        )
    )


def stage_grpo(config, ctx: DemoContext) -> None:
    """Flow-GRPO (LoRA) on the training prompts with the oracles' mix, K fresh SDE samples per prompt a step."""
    from flowalign.experiments.toy_grpo import GRPOBudget, train_toy_grpo
    from flowalign.training.methods.grpo import GRPOConfig

    start = time.perf_counter()
    budget = GRPOBudget(
        steps=config.grpo_steps, prompts_per_step=config.grpo_prompts_per_step,
        num_samples=config.grpo_samples, num_inference_steps=config.grpo_inference_steps,
        guidance_scale=config.guidance_scale, lr=config.grpo_lr,
    )  # fmt: skip
    grpo = GRPOConfig(
        num_samples=config.grpo_samples, num_inference_steps=config.grpo_inference_steps,
        guidance_scale=config.guidance_scale, window="random", window_size=config.grpo_window,
    )  # fmt: skip
    model_dir = train_toy_grpo(
        ctx.base_dir, ctx.out_dir / "grpo", budget, grpo, weights=config.grpo_weights, progress=False
    )
    ctx.models["flow-grpo"] = model_dir
    mix = " + ".join(f"{w:g} {d}" for d, w in config.grpo_weights.items())
    ctx.report.add(
        DemoRow(
            "flow-grpo",
            evaluate(config, model_dir),
            f"trained now: Flow-GRPO (LoRA r{budget.lora.rank}, η {grpo.eta:g}, β_KL {grpo.kl_beta:g}), "
            f"{config.grpo_steps} steps of {config.grpo_prompts_per_step} prompts x K = {config.grpo_samples} "
            f"SDE samples ({config.grpo_inference_steps} steps, {config.grpo_window} trained), lr "
            f"{config.grpo_lr:g}, reward {mix} from the oracles",
            _sampling(config),
            time.perf_counter() - start,
        )
    )


def stage_report(config, ctx: DemoContext) -> Path:
    """The evaluation report (``report/report.html``) on every row's held-out samples, read from disk."""
    import json

    from flowalign.data.media import save_image
    from flowalign.evals.runner import run_eval
    from flowalign.evals.types import EvalOptions

    manifests = {}
    for name, row in ctx.report.rows.items():
        folder = ctx.out_dir / "samples" / name
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, (prompt, image) in enumerate(zip(row.evaluation.prompts, row.evaluation.media, strict=True)):
            save_image(image.clamp(0, 1), folder / f"{i:06d}.png")
            lines.append(
                json.dumps({"id": f"{i:06d}", "prompt": prompt, "seed": 1000 + i, "file": f"{i:06d}.png"})
            )
        (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
        manifests[name] = str(folder / "manifest.jsonl")
    result = run_eval(
        manifests,
        "toy-heldout",
        ["toy"],
        out_dir=ctx.out_dir / "report",
        options=EvalOptions(base="base"),
        progress=False,
    )
    failures = f" ({len(result.failures)} failures)" if result.failures else ""
    ctx.report.notes.append(f"evaluation report (every sample, per prompt): {result.html_path}{failures}")
    return Path(result.html_path)
