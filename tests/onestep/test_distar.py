"""Diff-Instruct* Method: reward checks, zero-gradient and reduction properties, gradient routing, reward sign."""

from __future__ import annotations

import math

import pytest
import torch
from onestep_helpers import SIZE, grads, make_batch, run_group
from stand_ins import BrightnessReward

from flowalign import flow
from flowalign.config import ConfigError
from flowalign.objectives.distar import distar_regularizer
from flowalign.rewards.toy import ToyOracleReward
from flowalign.training.method import StepContext
from flowalign.training.methods.distar import DiffInstructStar, DistarConfig, check_reward


def cfg(**kw) -> DistarConfig:
    kw.setdefault("reward_scale", 0.0)
    return DistarConfig(height=SIZE, width=SIZE, **kw)


def test_non_differentiable_reward_is_refused(teacher):
    with pytest.raises(ValueError, match="reward 'toy' is not differentiable"):
        DiffInstructStar(teacher, cfg(reward="toy", reward_scale=1.0))
    with pytest.raises(ValueError, match="not differentiable"):
        check_reward(ToyOracleReward(), {})


def test_unknown_reward_dimension_is_refused(teacher):
    with pytest.raises(
        ValueError, match=r"has no dimension\(s\) \['mq'\]; its dimensions are \['vq', 'ta'\]"
    ):
        DiffInstructStar(
            teacher,
            cfg(reward="brightness", reward_scale=1.0, reward_weights={"mq": 1.0}),
            reward=BrightnessReward(),
        )
    assert check_reward(BrightnessReward(), {}) == {"vq": 1.0, "ta": 1.0}


def test_config_errors_name_the_key(teacher):
    with pytest.raises(ValueError, match="reward_scale = 1.0 > 0 needs a reward"):
        DiffInstructStar(teacher, cfg(reward_scale=1.0, reward=""))
    with pytest.raises(ConfigError) as err:
        DistarConfig(reward_scale=0.0, alpha=0.0)
    assert err.value.key == "alpha"


@pytest.mark.parametrize("regularizer", ["score", "kl"])
def test_online_score_equal_to_reference_gives_zero_gradient(teacher, regularizer):
    """s_psi = s_ref (fake = teacher at init, omega = 1) => y = 0 => d'(0) = 0 => no generator gradient."""
    method = DiffInstructStar(teacher, cfg(regularizer=regularizer))
    run_group(method, make_batch(pixels=False), "generator")
    assert all(g is not None and g.abs().max() == 0 for g in grads(method.generator))


def test_generator_loss_is_the_objective_with_grad_through_both_networks(teacher):
    """Same draws by hand: gradients through the online and the CFG reference network (parameters frozen)."""
    omega = 2.0
    method = DiffInstructStar(teacher, cfg(guidance_scale=omega, time_weighting="t", alpha=0.7))
    with torch.no_grad():  # move the online network away from the teacher
        for p in method.fake.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = make_batch(pixels=False)
    ctx = StepContext(step=0, seed=1, group="generator", modules=method.trainable_modules())
    loss, _ = method.compute_loss(batch, ctx, "generator")
    (got,) = torch.autograd.grad(loss, [next(method.generator.parameters())])

    ids = batch["index"]
    cond, uncond = teacher.encode_prompt(batch["prompt"], with_uncond=True)
    z = ctx.randn((3, SIZE, SIZE), ids, key="z")
    x = z - teacher.velocity(z, torch.ones(4), cond, net=method.generator)
    t = 0.02 + 0.96 * ctx.rand((), ids, key="generator/t")
    noise = ctx.randn_like(x, ids, key="generator/noise")
    x_t = flow.interpolate(x, noise, t)
    method.fake.requires_grad_(False)
    v_online = teacher.velocity(x_t, t, cond, net=method.fake)
    v_c, v_u = teacher.velocity(x_t, t, cond), teacher.velocity(x_t, t, uncond)
    c = 0.1 * math.sqrt(3 * SIZE * SIZE)
    expected, _ = distar_regularizer(v_online, v_u + omega * (v_c - v_u), x_t, noise, t, c=c, weights=0.7 * t)
    (want,) = torch.autograd.grad(expected.mean(), [next(method.generator.parameters())])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-8)
    assert want.abs().sum() > 0


def test_reward_scale_zero_is_score_divergence_distillation(teacher):
    """With reward_scale = 0 the loss is exactly the regulariser (no reward is loaded at all)."""
    method = DiffInstructStar(teacher, cfg(guidance_scale=1.5))
    assert method.reward is None
    with torch.no_grad():
        for p in method.fake.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = make_batch(pixels=False)
    ctx = StepContext(step=0, seed=2, group="generator", modules=method.trainable_modules())
    loss, metrics = method.compute_loss(batch, ctx, "generator")
    assert float(metrics["reward"]) == 0.0
    torch.testing.assert_close(loss.detach(), metrics["reg_loss"])


def test_reward_gradient_raises_the_reward(teacher):
    """A step along the generator loss gradient (reward dominant) increases the reward of the samples."""
    reward = BrightnessReward()
    method = DiffInstructStar(
        teacher, cfg(reward="brightness", reward_scale=100.0, reward_weights={"vq": 1.0}), reward=reward
    )
    batch = make_batch(pixels=False)
    ctx = StepContext(step=0, seed=0, group="generator", modules=method.trainable_modules())

    def mean_reward() -> float:
        with torch.no_grad():
            cond, _ = teacher.encode_prompt(batch["prompt"])
            x = method.sample(batch["index"], ctx, cond, net=method.generator)
            return float(reward.score(teacher.decode_latents(x))["vq"].mean())

    before = mean_reward()
    loss, metrics = method.compute_loss(batch, ctx, "generator")
    loss.backward()
    with torch.no_grad():
        for p in method.generator.parameters():
            p.sub_(1e-3 * p.grad / (p.grad.norm() + 1e-12))
    assert mean_reward() > before
    assert float(metrics["reward"]) == pytest.approx(before, abs=1e-5)


def test_critic_step_trains_the_online_score_only(teacher):
    method = DiffInstructStar(teacher, cfg(reward="brightness", reward_scale=1.0), reward=BrightnessReward())
    loss, metrics = run_group(method, make_batch(pixels=False), "critic", step=1)
    assert torch.isfinite(loss) and "fake_score_loss" in metrics
    assert all(g is not None for g in grads(method.fake))
    assert all(g is None for g in grads(method.generator))
    assert "reward" in method.frozen_modules()


def test_toy_classifier_reward_loads_by_name(teacher, tmp_path):
    from safetensors.torch import save_file

    from flowalign.rewards.toy_classifier import ToyAttributeClassifier

    clf = ToyAttributeClassifier(width=8, size=SIZE)
    save_file(dict(clf.state_dict()), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(f'{{"width": 8, "size": {SIZE}}}')
    method = DiffInstructStar(teacher, cfg(reward=f"toy_classifier:path={tmp_path}", reward_scale=1.0))
    assert method.reward.name == "toy_classifier" and method.reward_weights == {"ta": 1.0}
    loss, metrics = run_group(method, make_batch(pixels=False), "generator")
    assert torch.isfinite(loss) and 0 < float(metrics["reward"]) < 1
