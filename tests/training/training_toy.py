"""A tiny flow-matching Method and dataset for the training-loop tests (CPU, milliseconds per step)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from flowalign import flow
from flowalign.config import TrainConfig
from flowalign.training.method import Method, StepContext

DIM = 6


class VectorDataset(Dataset):
    """n fixed random vectors x0 [DIM]; items carry no "index" (the loop adds the position)."""

    def __init__(self, n: int = 12, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x0 = torch.randn(n, DIM, generator=g)

    def __len__(self) -> int:
        return len(self.x0)

    def __getitem__(self, i: int) -> dict:
        return {"x0": self.x0[i]}


def make_net(seed: int = 0, hidden: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM + 1, hidden), nn.SiLU(), nn.Linear(hidden, DIM))


class ToyFlowMatching(Method):
    """Velocity regression v(x_t, t) ~ noise - x0 with noise and t from the step context.

    Test hooks: ``nan_steps`` (loss is NaN at those steps), ``inf_grad_steps`` (finite loss, NaN
    gradient), ``sigterm_at`` (send SIGTERM to this process during that step), ``snapshots``
    (parameters seen at the start of each step, micro-step 0).
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        nan_steps: set[int] | frozenset[int] = frozenset(),
        inf_grad_steps: set[int] | frozenset[int] = frozenset(),
        sigterm_at: int | None = None,
        record: bool = False,
    ) -> None:
        self.net = make_net(seed)
        self.nan_steps = set(nan_steps)
        self.inf_grad_steps = set(inf_grad_steps)
        self.sigterm_at = sigterm_at
        self.record = record
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self.seen_ids: dict[tuple[int, int], list[int]] = {}

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def compute_loss(self, batch: dict, ctx: StepContext, group: str):
        if self.record and ctx.micro_step == 0:
            self.snapshots[ctx.step] = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        self.seen_ids[(ctx.step, ctx.micro_step)] = batch["index"].tolist()
        if self.sigterm_at == ctx.step and ctx.micro_step == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        x0, ids = batch["x0"], batch["index"]  # [B, DIM], [B]
        noise = ctx.randn_like(x0, ids, key="noise")
        t = ctx.rand((), ids, key="t")  # [B]
        x_t = flow.interpolate(x0, noise, t)
        v = ctx.module("net")(torch.cat([x_t, t[:, None]], dim=1))
        loss = (v.float() - flow.velocity_target(x0, noise)).pow(2).mean()
        if ctx.step in self.nan_steps:
            loss = loss * float("nan")
        if ctx.step in self.inf_grad_steps:
            first = next(self.net.parameters())
            loss = loss + (first.sum() * 0.0).abs().sqrt()  # value +0, gradient 0 * inf = NaN
        return loss, {"t_mean": t.mean()}


class TwoNetMethod(Method):
    """Two networks in two optimizer groups updated on alternate steps (like a generator and critic)."""

    def __init__(self, seed: int = 0) -> None:
        self.gen = make_net(seed)
        self.critic = make_net(seed + 1)
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"gen": self.gen, "critic": self.critic}

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"gen": list(self.gen.parameters()), "critic": list(self.critic.parameters())}

    def groups_to_update(self, step: int) -> list[str]:
        return ["gen"] if step % 2 == 0 else ["critic"]

    def compute_loss(self, batch: dict, ctx: StepContext, group: str):
        if ctx.micro_step == 0:
            self.snapshots[ctx.step] = {
                f"{n}.{k}": v.detach().clone()
                for n, m in self.trainable_modules().items()
                for k, v in m.state_dict().items()
            }
        x0, ids = batch["x0"], batch["index"]
        noise = ctx.randn_like(x0, ids, key="noise")
        t = ctx.rand((), ids, key="t")
        inp = torch.cat([flow.interpolate(x0, noise, t), t[:, None]], dim=1)
        out = ctx.module(group)(inp)
        return (out - flow.velocity_target(x0, noise)).pow(2).mean(), {}


def toy_config(output_dir: str | Path, **overrides) -> TrainConfig:
    """Small, fast defaults; keyword overrides replace top-level fields."""
    cfg = TrainConfig(
        output_dir=Path(output_dir),
        seed=3,
        max_steps=6,
        batch_size=2,
        grad_accum_steps=1,
        log_every=1,
        trackers=[],
        cpu=True,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg
