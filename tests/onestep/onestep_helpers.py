"""Helpers of the one-step distillation tests: batches of toy prompts and a one-group step runner."""

from __future__ import annotations

import torch
from torch import Tensor

from flowalign.training.method import StepContext

SIZE = 24
PROMPTS = [
    "a small red circle in the center",
    "a large blue square in the top left",
    "a small green triangle in the bottom right",
    "a large yellow cross in the top right",
]


def make_batch(num: int = 4, *, pixels: bool = True) -> dict:
    """Prompts, indices and (optionally) real renders of those prompts at 24x24."""
    from flowalign.toy.render import render_prompts

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
