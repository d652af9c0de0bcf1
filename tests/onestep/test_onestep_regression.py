"""Regression warm start of the one-step generator: schedule, ODE target, loss and gradient routing."""

from __future__ import annotations

import pytest
import torch
from onestep_helpers import SIZE, grads, make_batch, run_group

from flowalign.config import ConfigError
from flowalign.training.method import StepContext
from flowalign.training.methods.fdistill import FDistill, FDistillConfig
from flowalign.training.methods.onestep_common import generate_x0
from flowalign.training.methods.onestep_regression import teacher_ode_x0


def cfg(**kw) -> FDistillConfig:
    return FDistillConfig(height=SIZE, width=SIZE, **kw)


def test_schedule_regression_then_warmup_then_alternation(teacher):
    method = FDistill(
        teacher,
        cfg(divergence="rkl", gan_weight=0.0, regression_steps=2, critic_warmup_steps=1, generator_every=2),
    )
    order = [method.groups_to_update(s)[0] for s in range(7)]
    assert order == ["generator", "generator", "critic", "generator", "critic", "generator", "critic"]


@pytest.mark.parametrize("key", ["regression_steps", "regression_teacher_steps"])
def test_bad_regression_settings_name_the_key(key):
    with pytest.raises(ConfigError) as err:
        cfg(**{key: -1})
    assert err.value.key == key


def test_one_euler_step_is_the_teacher_one_step_sample(teacher):
    """With one Euler step the ODE target is z - v_teacher(z, 1): the teacher called as a one-step generator."""
    method = FDistill(teacher, cfg(divergence="rkl", gan_weight=0.0, guidance_scale=1.0))
    cond, _ = method.encode(["a small red circle in the center"] * 2, with_uncond=False)
    z = torch.randn(teacher.latent_shape(2, SIZE, SIZE, None), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        direct = generate_x0(teacher, teacher.transformer, z, cond)
    torch.testing.assert_close(teacher_ode_x0(method, z, cond, None, 1), direct, rtol=0, atol=0)


def test_regression_loss_is_zero_for_the_teacher_at_one_step_and_trains_only_the_generator(teacher):
    # one Euler step without CFG: the untouched generator (a teacher copy) already equals its target
    method = FDistill(
        teacher,
        cfg(
            divergence="js",
            gan_weight=0.1,
            guidance_scale=1.0,
            regression_steps=1,
            regression_teacher_steps=1,
        ),
    )
    loss, metrics = run_group(method, make_batch(), "generator", step=0)
    # the copy runs the same fp32 ops as the teacher: equal outputs bit for bit
    assert float(loss) == 0.0 and float(metrics["regression_loss"]) == 0.0
    for name in ("fake_score", "discriminator"):
        assert all(g is None for g in grads(method.trainable_modules()[name])), name


def test_regression_loss_is_the_mean_squared_distance_to_the_ode_output(teacher):
    method = FDistill(
        teacher,
        cfg(
            divergence="rkl",
            gan_weight=0.0,
            guidance_scale=2.0,
            regression_steps=3,
            regression_teacher_steps=4,
        ),
    )
    batch = make_batch(pixels=False)
    loss, _ = run_group(method, batch, "generator", step=1)
    assert any(g is not None and g.abs().sum() > 0 for g in grads(method.generator))
    # recompute by hand from the same per-sample noise
    ctx = StepContext(step=1, seed=0, group="generator", modules=method.trainable_modules())
    z = ctx.randn(teacher.latent_shape(1, SIZE, SIZE, None)[1:], batch["index"], key="regression/z")
    cond, uncond = method.encode(batch["prompt"], with_uncond=True)
    x = z
    with torch.no_grad():
        for k in range(4):
            t = torch.full((4,), 1.0 - k / 4)
            v_c = teacher.velocity(x, t, cond, net=teacher.transformer)
            v_u = teacher.velocity(x, t, uncond, net=teacher.transformer)
            x = x - (v_c + (v_c - v_u)) / 4
        g = generate_x0(teacher, method.generator, z, cond)
    expected = (g - x).pow(2).mean().double()
    # same fp32 ops up to batching of CFG: relative error a few fp32 eps per reduction
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)
