"""``flowalign train grpo``: the run config of Flow-GRPO and the function that runs it.

Prompts come from the toy world (``toy:train``, ``toy:train:video``) or a prompt file that
:func:`flowalign.data.prompts.load_prompts` reads; rewards are registry specs mixed by
per-dimension weights (:class:`~flowalign.rewards.combine.RewardCombiner`: each dimension z-scored
with the reward's stored or the given statistics, then ``overall = sum_d w_d r~_d``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flowalign.config import LoraConfig, TrainConfig
from flowalign.training.loop import TrainResult, train
from flowalign.training.methods.grpo import FlowGRPO, GRPOConfig, PromptItems, RewardFn

__all__ = ["GRPORun", "build_reward_fn", "load_run_prompts", "prepare_grpo", "run_grpo"]


@dataclass(kw_only=True)
class GRPORun:
    """``flowalign train grpo``."""

    model: str
    """Hub id or folder of the base (reference) model, or toy:image / toy:video."""
    prompts: str = "toy:train"
    """toy:<split>[:video] (the toy world's prompts), or a .txt/.jsonl/.json/.csv/.tsv prompt file."""
    rewards: list[str] = field(default_factory=lambda: ["toy"])
    """Reward specs of the registry (``name`` or ``name:key=value,...``), e.g. [toy] or [pickscore, aesthetic]."""
    weights: str = ""
    """Per-dimension weights of the mix, ``"ta=1,vq=0.5"``; empty weights every scored dimension 1."""
    normalisation: str | None = None
    """A JSON file of per-dimension {"mean", "std"} (``flowalign`` calibration output); null uses the
    rewards' stored statistics, else (0, 1)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    lora: LoraConfig | None = field(default_factory=LoraConfig)
    """LoRA on the transformer (reference = adapters off); null for a full fine-tune with a frozen copy."""
    cache_prompts: bool = True
    """Encode each distinct prompt (and the empty one, for CFG) once; the text encoders leave the device."""


def load_run_prompts(spec: str) -> list[str]:
    """The prompts of ``GRPORun.prompts``.

    Raises:
        ValueError: an unknown toy split or kind (naming the spec); DataError: a bad prompt file.
    """
    if spec.startswith("toy:"):
        from flowalign.toy.world import toy_prompts

        parts = spec.split(":")[1:]
        split = parts[0] if parts else "train"
        kind = parts[1] if len(parts) > 1 else "image"
        if len(parts) > 2 or kind not in ("image", "video"):
            raise ValueError(f"prompts: {spec!r} is not toy:<split>[:image|:video]")
        return toy_prompts(split, kind)
    from flowalign.data.prompts import load_prompts

    return load_prompts(spec)


def build_reward_fn(
    specs: list[str], weights: str, normalisation: str | None, *, device: torch.device | str = "cpu"
) -> RewardFn:
    """A :data:`RewardFn` from registry specs, weights and optional statistics (loaded once)."""
    from flowalign.rewards.combine import RewardCombiner, load_normalisation, parse_weights
    from flowalign.rewards.registry import load_reward, parse_reward_spec

    if not specs:
        raise ValueError("rewards: give at least one reward spec, e.g. [toy]")
    models = []
    for spec in specs:
        name, options = parse_reward_spec(spec)
        models.append(load_reward(name, device=device, **options))
    stats = load_normalisation(normalisation) if normalisation else None
    combiner = RewardCombiner(models, parse_weights(weights) or None, stats)

    def reward_fn(media: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        return combiner.score(media, prompts)

    return reward_fn


def prepare_grpo(run: GRPORun) -> tuple[FlowGRPO, PromptItems]:
    """The method and the prompt dataset of a GRPO run, the model on this process's device."""
    from flowalign.training.placement import cache_run_prompts
    from flowalign.training.runs import load_training_model, training_device

    torch.manual_seed(run.train.seed)  # the LoRA initialisation follows the run seed
    full = () if run.lora else ("transformer",)
    model = load_training_model(run.model, run.train, full=full)
    prompts = load_run_prompts(run.prompts)
    reward_fn = build_reward_fn(
        run.rewards, run.weights, run.normalisation, device=training_device(run.train)
    )
    method = FlowGRPO(model, reward_fn, run.grpo, lora=run.lora)
    if run.cache_prompts:
        cache_run_prompts(method, prompts, run.train)
    return method, PromptItems(prompts)


def run_grpo(run: GRPORun, *, resume: bool = False, progress: bool = True) -> TrainResult:
    method, data = prepare_grpo(run)
    return train(method, data, run.train, resume=resume, progress=progress, run_config=run)
