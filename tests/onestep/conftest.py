"""Fixtures for the one-step distillation tests: a tiny saved toy teacher, batches, a step runner."""

from __future__ import annotations

import os

import pytest
import torch
from torch import Tensor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from flowalign.models import load_flow_model  # noqa: E402
from flowalign.models.toy import save_toy_model  # noqa: E402
from flowalign.rewards.base import RewardModel  # noqa: E402
from flowalign.training.method import StepContext  # noqa: E402

SIZE = 24
PROMPTS = [
    "a small red circle in the center",
    "a large blue square in the top left",
    "a small green triangle in the bottom right",
    "a large yellow cross in the top right",
]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test in this folder runs on one thread (the shared ``one_thread`` fixture)."""


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A random-init tiny toy image model (24x24, width 32, 2 layers) saved in diffusers' layout."""
    return save_toy_model(
        tmp_path_factory.mktemp("toy-teacher"), "image", size=SIZE, width=32, num_layers=2, text_width=16
    )


@pytest.fixture
def teacher(teacher_dir):
    """A fresh copy of the tiny teacher (methods modify it: LoRA fake scores, frozen flags)."""
    return load_flow_model(teacher_dir)


def make_batch(num: int = 4, *, pixels: bool = True) -> dict:
    """Prompts, indices and (optionally) real renders of those prompts at 24x24."""
    from flowalign.toy.onestep import render_prompts

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(num)]
    batch = {"prompt": prompts, "index": torch.arange(num)}
    if pixels:
        batch["pixels"] = render_prompts(prompts, size=SIZE)
    return batch


def run_group(method, batch: dict, group: str, *, step: int = 0, seed: int = 0):
    """compute_loss + backward for one group, with the method's own (unwrapped) modules."""
    ctx = StepContext(step=step, seed=seed, group=group, modules=method.trainable_modules())
    loss, metrics = method.compute_loss(batch, ctx, group)
    loss.backward()
    return loss.detach(), metrics


def grads(module: torch.nn.Module) -> list[Tensor | None]:
    return [p.grad for p in module.parameters()]


def zero_grads(*modules: torch.nn.Module) -> None:
    for m in modules:
        for p in m.parameters():
            p.grad = None


class BrightnessReward(RewardModel):
    """Differentiable pixel reward: "vq" = mean brightness, "ta" = mean red minus mean blue."""

    name = "brightness"
    dimensions = ("vq", "ta")
    needs_prompts = False

    def _score_images(self, images: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        return {"vq": images.mean(dim=(1, 2, 3)), "ta": (images[:, 0] - images[:, 2]).mean(dim=(1, 2))}
