"""``flowalign train dpo --online``: the run config of iterative Flow-DPO and the function that runs it.

Prompts and rewards are given as for ``flowalign train grpo`` (:mod:`flowalign.training.grpo_run`);
the pairs are sampled by the run itself, every ``online.regenerate_every`` steps, from the current
policy (:mod:`flowalign.workflows.online_dpo`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flowalign.config import LoraConfig, TrainConfig
from flowalign.training.loop import TrainResult, train
from flowalign.training.methods.dpo import DPOConfig
from flowalign.workflows.online_dpo import OnlineDPOConfig, OnlineFlowDPO, RoundSlots

__all__ = ["OnlineDPORun", "prepare_online_dpo", "run_online_dpo"]


@dataclass(kw_only=True)
class OnlineDPORun:
    """``flowalign train dpo --online``."""

    model: str
    """Hub id or folder of the base (reference) model, or toy:image / toy:video."""
    prompts: str = "toy:train"
    """toy:<split>[:video] (the toy world's prompts), or a .txt/.jsonl/.json/.csv/.tsv prompt file
    (``--data`` on the command line)."""
    rewards: list[str] = field(default_factory=lambda: ["toy"])
    """Reward specs of the registry that rank the candidates, e.g. [toy] or [pickscore, aesthetic]."""
    weights: str = ""
    """Per-dimension weights of the mix, ``"ta=1,vq=0.5"``; empty weights every scored dimension 1."""
    normalisation: str | None = None
    """A JSON file of per-dimension {"mean", "std"}; null uses the rewards' stored statistics."""
    train: TrainConfig = field(default_factory=TrainConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    online: OnlineDPOConfig = field(default_factory=OnlineDPOConfig)
    lora: LoraConfig | None = field(default_factory=LoraConfig)
    """LoRA on the transformer (fixed reference = adapters off); null for a full fine-tune."""


def prepare_online_dpo(run: OnlineDPORun) -> tuple[OnlineFlowDPO, RoundSlots]:
    """The method and the slot dataset of an online run, the model on this process's device.

    The text encoders stay on the device: every round samples new candidates through them."""
    from flowalign.training.grpo_run import build_reward_fn, load_run_prompts
    from flowalign.training.runs import load_training_model, training_device

    torch.manual_seed(run.train.seed)  # the LoRA initialisation follows the run seed
    full = () if run.lora else ("transformer",)
    model = load_training_model(run.model, run.train, full=full)
    prompts = load_run_prompts(run.prompts)
    score_fn = build_reward_fn(run.rewards, run.weights, run.normalisation, device=training_device(run.train))
    method = OnlineFlowDPO(
        model, score_fn, prompts, run.train.output_dir, run.dpo, run.online,
        seed=run.train.seed, lora=run.lora,
    )  # fmt: skip
    return method, method.slots()


def run_online_dpo(run: OnlineDPORun, *, resume: bool = False, progress: bool = True) -> TrainResult:
    method, data = prepare_online_dpo(run)
    return train(method, data, run.train, resume=resume, progress=progress, run_config=run)
