"""Numerical guards: non-finite losses and gradients are skipped and counted, then stop the run; method
statistics (f-distill's ratio means, reward normalisers) survive a bad step; rewards are finite or raise.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import rel_summary
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rel_methods import METHOD_SPECS, PROMPTS, loop_config
from torch import Tensor

from flowalign.objectives.fdistill import RatioBinEMA
from flowalign.rewards.base import RewardModel, RewardOutputError
from flowalign.training.checkpoint import load_checkpoint
from flowalign.training.loop import TrainingDiverged, train
from flowalign.training.method import StepContext

NAN_LOSS_STEP, NAN_GRAD_STEP = 1, 3


class Faulty:
    """Delegates every Method hook to ``method``; makes the loss NaN at ``nan_loss`` steps and the gradient
    (not the loss) NaN at ``nan_grad`` steps, like an overflow in the forward or the backward pass."""

    def __init__(self, method: Any, *, nan_loss: set[int], nan_grad: set[int] = frozenset()) -> None:
        self._method, self._nan_loss, self._nan_grad = method, nan_loss, nan_grad

    def __getattr__(self, name: str) -> Any:
        return getattr(self._method, name)

    def compute_loss(self, batch: dict, ctx: StepContext, group: str):
        loss, metrics = self._method.compute_loss(batch, ctx, group)
        if ctx.step in self._nan_loss:
            loss = loss * float("nan")
        if ctx.step in self._nan_grad:
            groups = self._method.optimizer_groups()
            first = (groups[group] if group in groups else next(iter(groups.values())))[0]
            loss = loss + (first.sum() * 0.0).abs().sqrt()  # value + 0, gradient 0 * inf = NaN
        return loss, metrics


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("name", list(METHOD_SPECS))
def test_non_finite_loss_or_gradient_skips_the_step(name, tmp_path):
    case = METHOD_SPECS[name]()
    cfg = loop_config(tmp_path, steps=5, **case.train_overrides)
    cfg.checkpoint.every = 1
    method = Faulty(case.method, nan_loss={NAN_LOSS_STEP}, nan_grad={NAN_GRAD_STEP})
    result = train(method, case.dataset, cfg, progress=False)
    assert result.step == 5 and result.nan_skipped == 2 and not result.interrupted
    ckpts = [load_checkpoint(tmp_path / f"checkpoint-{s:08d}") for s in range(1, 6)]
    for bad in (NAN_LOSS_STEP, NAN_GRAD_STEP):  # step index s leads from checkpoint s to s + 1
        before, after = ckpts[bad - 1], ckpts[bad]
        for part in ("weights", "ema"):
            assert _same(getattr(before, part), getattr(after, part)), (
                f"{name}: {part} changed in skipped step {bad}"
            )
        for (
            group,
            opt,
        ) in before.optimizers.items():  # Adam moments and step counts (the LR schedule moves on)
            assert _same(opt["state"], after.optimizers[group]["state"]), (
                f"{name}: {group} optimizer state changed"
            )
        assert after.state["nan_skipped"] == before.state["nan_skipped"] + 1
    assert not _same(ckpts[1].weights, ckpts[2].weights), "the step after a skipped one must train again"
    for ckpt in ckpts:  # method statistics stay finite through the bad steps
        for key, value in ckpt.method_state.items():
            tensors = (
                [value] if isinstance(value, Tensor) else [v for v in _leaves(value) if isinstance(v, Tensor)]
            )
            assert all(torch.isfinite(t).all() for t in tensors), f"{name}: method state {key} is not finite"
    records = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert ['"skipped": true' in r for r in records] == [False, True, False, True, False]
    rel_summary.add_to_list("numerics", "methods whose NaN loss/gradient steps are skipped and counted", name)


def _leaves(value: Any):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    else:
        yield value


@pytest.mark.parametrize("name", list(METHOD_SPECS))
def test_consecutive_non_finite_steps_stop_training_with_a_clear_message(name, tmp_path):
    case = METHOD_SPECS[name]()
    cfg = loop_config(tmp_path, steps=6, **case.train_overrides)
    cfg.max_nan_steps_in_row = 3
    before = {
        k: {n: p.detach().clone() for n, p in m.named_parameters()}
        for k, m in case.method.trainable_modules().items()
    }
    with pytest.raises(
        TrainingDiverged, match=r"3 steps in a row had a non-finite loss.*max_nan_steps_in_row=3"
    ):
        train(Faulty(case.method, nan_loss=set(range(6))), case.dataset, cfg, progress=False)
    for key, module in case.method.trainable_modules().items():
        assert all(torch.equal(p, before[key][n]) for n, p in module.named_parameters()), (
            f"{name}.{key} changed"
        )
    rel_summary.add_to_list("numerics", "methods stopped by TrainingDiverged after 3 non-finite steps", name)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_ratio_means_ignore_a_non_finite_batch(bad):
    state = RatioBinEMA(num_bins=4, decay=0.5)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9])
    state.update(*state.bin_sums(torch.tensor([1.0, 2.0, 3.0, 4.0]), t))
    means = state.means.clone()
    state.update(*state.bin_sums(torch.tensor([bad, 2.0, bad, 1.0]), t))
    assert torch.isfinite(state.means).all()
    assert state.means[0] == means[0] and state.means[2] == means[2]  # the bad bins kept their value
    assert state.means[1] == 2.0 and state.means[3] == 0.5 * 4.0 + 0.5 * 1.0


def test_latent_reward_normaliser_survives_a_non_finite_batch():
    case = METHOD_SPECS["latent_reward"]()
    method = case.method
    items = [case.dataset[i] for i in range(4)]
    ctx = StepContext(step=0, seed=0, modules=method.trainable_modules())
    method.compute_loss(method.collate(items), ctx, "main")
    state = {k: v.clone() if isinstance(v, Tensor) else v for k, v in method.state_dict().items()}
    poisoned = method.collate(items)
    poisoned.latents_w[1] = float("nan")
    loss, _ = method.compute_loss(poisoned, ctx, "main")
    assert not torch.isfinite(loss)  # the loop skips this step...
    assert _same(method.state_dict(), state)  # ...and the exported normalisation does not change


@pytest.mark.skipif("reward_model" not in METHOD_SPECS, reason="no reward-model training method")
def test_reward_model_normaliser_survives_a_non_finite_step(monkeypatch):
    case = METHOD_SPECS["reward_model"]()
    method = case.method
    items = [case.dataset[i] for i in range(4)]
    ctx = StepContext(step=0, seed=0, modules=method.trainable_modules())
    method.compute_loss(method.collate(items), ctx, "main")
    state = {k: v.clone() if isinstance(v, Tensor) else v for k, v in method.state_dict().items()}
    heads = type(method.reward_model)._heads

    def nan_heads(self, *args):
        return {k: v * float("nan") for k, v in heads(self, *args).items()}

    monkeypatch.setattr(type(method.reward_model), "_heads", nan_heads)  # an overflow inside the model
    loss, _ = method.compute_loss(method.collate(items), ctx, "main")
    assert not torch.isfinite(loss)
    assert _same(method.state_dict(), state)


# ---------------------------------------------------------------------------------------- rewards


class Broken(RewardModel):
    """A frozen scorer whose weights went bad: NaN for the second item, inf for the third."""

    name = "broken"
    dimensions = ("vq",)
    needs_prompts = False

    def _score_images(self, images: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        out = images.mean(dim=(1, 2, 3)).clone()
        out[1:2] = float("nan")
        out[2:3] = float("inf")
        return {"vq": out}


def test_a_reward_returning_non_finite_scores_raises_naming_the_items():
    with pytest.raises(
        RewardOutputError, match=r"broken: non-finite scores .*'vq' at item\(s\) \[1, 2\] of 4"
    ):
        Broken().eval().score(torch.rand(4, 3, 8, 8))
    rel_summary.count("numerics", "reward output checks (non-finite scores raise RewardOutputError)")


def _toy_rewards() -> dict[str, RewardModel]:
    from flowalign.rewards.registry import load_reward

    rewards = {"toy": load_reward("toy")}
    if "reward_model" in METHOD_SPECS:
        rewards["multihead"] = METHOD_SPECS["reward_model"]().method.reward_model.eval().requires_grad_(False)
    return rewards


@pytest.fixture(scope="module")
def offline_rewards():
    return _toy_rewards()


def _finite_or_clear_error(rewards: dict[str, RewardModel], images: Tensor, prompts: list[str]) -> None:
    for name, reward in rewards.items():
        try:
            scores = reward.score(images, prompts if reward.needs_prompts else None)
        except ValueError as err:  # a documented refusal (e.g. the toy oracle's caption grammar), never a NaN
            assert not isinstance(err, RewardOutputError) and str(err).startswith(
                f"{reward.name.split('_')[0]}"
            )
            rel_summary.count("fuzz", f"reward outputs ({name}): inputs refused with a clear error")
            continue
        assert scores and set(scores) & set(reward.dimensions)
        for dim, v in scores.items():
            assert v.shape == (images.shape[0],) and v.dtype == torch.float32
            assert torch.isfinite(v).all(), f"{name}.{dim} is not finite: {v}"
        rel_summary.count("fuzz", f"reward outputs ({name}): finite scores")


@st.composite
def media(draw) -> Tensor:
    """Valid but extreme images: constant black/white/grey, one-hot channels, salt-and-pepper, random."""
    n = draw(st.integers(1, 2))
    size = draw(st.sampled_from([16, 24]))
    kind = draw(st.sampled_from(["constant", "channel", "salt", "random"]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if kind == "constant":
        return torch.full((n, 3, size, size), draw(st.sampled_from([0.0, 1.0, 0.5, 1e-7, 1 - 1e-7])))
    if kind == "channel":
        x = torch.zeros(n, 3, size, size)
        x[:, draw(st.integers(0, 2))] = 1.0
        return x
    if kind == "salt":
        return (torch.rand(n, 3, size, size, generator=g) > 0.5).float()
    return torch.rand(n, 3, size, size, generator=g)


@given(images=media(), prompt=st.sampled_from([*PROMPTS, "", "x" * 500, "ünïcødé ✓ 🚀", "<script>"]))
@settings(settings.get_profile("flowalign-ci"), max_examples=25)
def test_offline_rewards_give_finite_scores_on_extreme_valid_media(offline_rewards, images, prompt):
    assert math.isfinite(float(images.sum()))
    _finite_or_clear_error(offline_rewards, images, [prompt] * images.shape[0])
