"""Exact resume for every method: N steps straight == N/2 + resume + N/2, bit for bit on CPU.

The first half is a run of N steps stopped by SIGTERM during step N/2 (the loop finishes that step,
writes a checkpoint and returns), so both runs share one config and LR schedule. Compared at step N: every trainable tensor, the EMA shadow, each optimizer's and LR scheduler's
state, the RNG states, the method's own state (f-distill's per-bin ratio means, the latent reward's
score normaliser), the loop state (step, data cursor, NaN counters) and the whole metrics.jsonl.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import rel_summary
import torch
from rel_methods import METHOD_SPECS, loop_config

from flowalign.training.checkpoint import load_checkpoint
from flowalign.training.loop import METRICS_FILE, train

STEPS = 4


class StopAt:
    """Delegates every Method hook to ``method``; sends this process SIGTERM during step ``step``."""

    def __init__(self, method: Any, step: int) -> None:
        self._method, self._step = method, step

    def __getattr__(self, name: str) -> Any:
        return getattr(self._method, name)

    def compute_loss(self, batch: dict, ctx: Any, group: str):
        if ctx.step == self._step and ctx.micro_step == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return self._method.compute_loss(batch, ctx, group)


def _run(name: str, out: Path, *, stop_at: int | None = None, resume: bool = False):
    case = METHOD_SPECS[name]()
    cfg = loop_config(out, steps=STEPS, **case.train_overrides)
    method = case.method if stop_at is None else StopAt(case.method, stop_at)
    result = train(method, case.dataset, cfg, resume=resume, progress=False)
    done = STEPS if stop_at is None else stop_at + 1
    assert result.step == done and result.interrupted == (stop_at is not None) and result.nan_skipped == 0
    assert result.checkpoint is not None and result.checkpoint.name == f"checkpoint-{done:08d}"
    return case.method


def assert_same(a: Any, b: Any, where: str) -> None:
    """Recursive bit-exact equality of checkpoint contents (tensors with torch.equal, incl. dtype)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        )
        assert torch.equal(a, b), (
            f"{where}: values differ (max |diff| {(a.double() - b.double()).abs().max()})"
        )
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("name", list(METHOD_SPECS))
def test_straight_run_equals_half_plus_resume_plus_half(name, tmp_path):
    straight = _run(name, tmp_path / "straight")
    _run(name, tmp_path / "resumed", stop_at=STEPS // 2 - 1)  # SIGTERM in step N/2: checkpoint, return
    resumed = _run(name, tmp_path / "resumed", resume=True)

    a = load_checkpoint(tmp_path / "straight" / f"checkpoint-{STEPS:08d}")
    b = load_checkpoint(tmp_path / "resumed" / f"checkpoint-{STEPS:08d}")
    assert a.weights and a.ema and a.optimizers and a.schedulers and a.rng_states
    for part in ("weights", "ema", "optimizers", "schedulers", "rng_states", "method_state", "state"):
        assert_same(getattr(a, part), getattr(b, part), f"{name}.{part}")
    assert a.state["epoch"] >= 1, "the run should cross an epoch boundary after the resume"
    metrics_a = (tmp_path / "straight" / METRICS_FILE).read_text()
    assert metrics_a == (tmp_path / "resumed" / METRICS_FILE).read_text()
    assert len(metrics_a.splitlines()) == STEPS
    # the live objects agree too (what export() writes), not only the files
    assert_same(straight.state_dict(), resumed.state_dict(), f"{name}.method_state (live)")
    for module, (key, other) in zip(
        straight.trainable_modules().values(), resumed.trainable_modules().items(), strict=True
    ):
        assert_same(module.state_dict(), other.state_dict(), f"{name}.{key} (live)")
    rel_summary.add_to_list("resume", "methods with exact resume", name)
