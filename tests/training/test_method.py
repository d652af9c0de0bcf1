"""StepContext's per-sample random numbers and the Method defaults."""

from __future__ import annotations

import pytest
import torch
from training_toy import ToyFlowMatching

from flowalign.config import OptimConfig
from flowalign.training.method import StepContext, sample_seed


def _ctx(**kw) -> StepContext:
    return StepContext(**{"step": 5, "seed": 1, **kw})


def test_draws_depend_only_on_sample_id_not_on_batch_layout():
    x = torch.zeros(6, 3, 4)
    ids = torch.tensor([10, 11, 12, 13, 14, 15])
    full = _ctx().randn_like(x, ids, key="noise")
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert torch.equal(_ctx().randn_like(x[perm], ids[perm], key="noise"), full[perm])
    # two processes / micro-batches with half the batch each draw the same numbers
    halves = torch.cat(
        [
            _ctx(process_index=p, micro_step=p).randn_like(x[:3], ids[p * 3 : p * 3 + 3], key="noise")
            for p in range(2)
        ]
    )
    assert torch.equal(halves[:3], full[:3])
    assert torch.equal(_ctx(process_index=1).randn_like(x[3:], ids[3:], key="noise"), full[3:])


def test_draws_change_with_step_seed_group_and_key():
    ids = [0, 1, 2]
    base = _ctx().randn(4, ids, key="noise")
    assert base.shape == (3, 4)
    for other in (_ctx(step=6), _ctx(seed=2), _ctx(group="critic")):
        assert not torch.equal(other.randn(4, ids, key="noise"), base)
    assert not torch.equal(_ctx().randn(4, ids, key="other"), base)
    assert not torch.equal(base[0], base[1])  # different samples, different streams


def test_automatic_keys_make_repeated_calls_independent_and_reproducible():
    ctx = _ctx()
    first, second = ctx.rand((), [0, 1, 2]), ctx.rand((), [0, 1, 2])
    assert first.shape == (3,) and not torch.equal(first, second)
    again = _ctx()
    assert torch.equal(again.rand((), [0, 1, 2]), first) and torch.equal(again.rand((), [0, 1, 2]), second)
    u = _ctx().rand(10_000, [0])
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.02


def test_per_sample_accepts_any_generator_function_and_checks_ids():
    ctx = _ctx()
    t = ctx.per_sample(lambda g: torch.randint(0, 1000, (), generator=g), [3, 4], key="timestep")
    assert t.shape == (2,) and t.dtype == torch.int64
    with pytest.raises(ValueError, match="batch size 2 but 3 sample_ids"):
        ctx.randn_like(torch.zeros(2, 3), [0, 1, 2])
    with pytest.raises(ValueError, match="integer tensor"):
        ctx.randn(2, torch.tensor([0.5, 1.5]))
    with pytest.raises(KeyError, match="no trainable module named 'x'"):
        ctx.module("x")


def test_sample_seed_is_stable_and_63_bit():
    s = sample_seed(1, 2, "main", "noise", 3)
    assert s == sample_seed(1, 2, "main", "noise", 3) and 0 <= s < 2**63
    assert len({sample_seed(1, 2, "main", "noise", i) for i in range(1000)}) == 1000


def test_method_defaults():
    m = ToyFlowMatching()
    groups = m.optimizer_groups()
    assert list(groups) == ["main"] and len(groups["main"]) == len(list(m.net.parameters()))
    assert m.groups_to_update(7) == ["main"] and m.ema_modules() == ["net"]
    base = OptimConfig(lr=0.5)
    assert m.optim_config("main", base) is base
    assert m.state_dict() == {}
    with pytest.raises(ValueError, match="keeps no extra state"):
        m.load_state_dict({"x": 1})
