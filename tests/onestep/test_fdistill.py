"""f-distill Method: gradient routing, the docs/algorithms.md 2.9 properties at method level, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from onestep_helpers import SIZE, grads, make_batch, run_group

from flowalign import flow
from flowalign.config import ConfigError
from flowalign.models.base import ModelLoadError
from flowalign.objectives.fdistill import fdistill_generator_loss
from flowalign.training.method import StepContext
from flowalign.training.methods.fdistill import FDistill, FDistillConfig
from flowalign.training.methods.onestep_common import load_teacher
from flowalign.training.methods.onestep_heads import TeacherFeatures, find_blocks


def cfg(**kw) -> FDistillConfig:
    return FDistillConfig(height=SIZE, width=SIZE, **kw)


def _all_none(module) -> bool:
    return all(g is None for g in grads(module))


def test_generator_step_updates_only_the_generator(teacher):
    method = FDistill(teacher, cfg(divergence="js", gan_weight=0.1, guidance_scale=2.0))
    loss, metrics = run_group(method, make_batch(), "generator")
    assert torch.isfinite(loss)
    assert all(g is not None and torch.isfinite(g).all() for g in grads(method.generator))
    assert any(g.abs().sum() > 0 for g in grads(method.generator))
    for name in ("fake_score", "discriminator"):
        assert _all_none(method.trainable_modules()[name]), name
    assert _all_none(teacher.transformer) and _all_none(teacher.pipe.text_encoder)
    # weights are normalised to mean 1 over the batch
    assert metrics["weight_min"] <= 1.0 <= metrics["weight_max"]


def test_critic_step_updates_fake_score_and_discriminator_only(teacher):
    method = FDistill(teacher, cfg(divergence="kl", r1_weight=1.0))
    loss, metrics = run_group(method, make_batch(), "critic", step=1)
    assert torch.isfinite(loss) and {"fake_score_loss", "d_loss", "r1"} <= set(metrics)
    assert all(g is not None for g in grads(method.fake))
    assert all(g is not None for g in grads(method.discriminator))
    assert _all_none(method.generator) and _all_none(teacher.transformer)


def test_alternation_generator_every_k_after_warmup(teacher):
    method = FDistill(
        teacher, cfg(divergence="rkl", gan_weight=0.0, generator_every=3, critic_warmup_steps=2)
    )
    order = [method.groups_to_update(s)[0] for s in range(8)]
    assert order == ["critic", "critic", "generator", "critic", "critic", "generator", "critic", "critic"]


def test_reverse_kl_without_gan_builds_no_discriminator(teacher):
    method = FDistill(teacher, cfg(divergence="rkl", gan_weight=0.0))
    assert method.discriminator is None and "discriminator" not in method.trainable_modules()
    # and needs no real media
    loss, _ = run_group(method, make_batch(pixels=False), "critic", step=1)
    assert torch.isfinite(loss)


def test_fake_score_equal_to_teacher_gives_zero_generator_gradient(teacher_dir):
    """Fake = teacher (initial state, no CFG) => x0_fake = x0_teacher => the distribution-matching gradient is 0."""
    from flowalign.models import load_flow_model

    for mode in ("full", "lora"):
        method = FDistill(load_flow_model(teacher_dir), cfg(divergence="js", gan_weight=0.0, fake_score=mode))
        run_group(method, make_batch(), "generator")
        assert all(g is not None and g.abs().max() == 0 for g in grads(method.generator)), mode


def test_constant_discriminator_equals_reverse_kl_gradient(teacher_dir):
    """Constant logits => h~ = 1 for every divergence => the same gradient as reverse-KL (DMD) exactly."""
    from flowalign.models import load_flow_model

    def gen_grads(divergence: str):
        torch.manual_seed(0)
        method = FDistill(
            load_flow_model(teacher_dir), cfg(divergence=divergence, gan_weight=0.0, guidance_scale=2.0)
        )
        if method.discriminator is not None:
            for out in method.discriminator.out:  # logits = bias = 0.3 for every input
                torch.nn.init.zeros_(out.weight)
                torch.nn.init.constant_(out.bias, 0.3)
        run_group(method, make_batch(), "generator")
        return [g.clone() for g in grads(method.generator)]

    reference = gen_grads("rkl")
    assert any(g.abs().sum() > 0 for g in reference)
    for div in ("js", "kl", "sf", "jf"):
        for a, b in zip(reference, gen_grads(div), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_generator_step_matches_the_objective_on_the_same_draws(teacher):
    """The method's loss = fdistill_generator_loss on x = G(z), the CFG teacher's and the fake's x0 at x_t."""
    omega = 2.5
    method = FDistill(teacher, cfg(divergence="rkl", gan_weight=0.0, guidance_scale=omega))
    batch = make_batch()
    ctx = StepContext(step=0, seed=3, group="generator", modules=method.trainable_modules())
    loss, _ = method.compute_loss(batch, ctx, "generator")
    with torch.no_grad():
        ids = batch["index"]
        cond, uncond = teacher.encode_prompt(batch["prompt"], with_uncond=True)
        z = ctx.randn((3, SIZE, SIZE), ids, key="z")
        x = z - teacher.velocity(z, torch.ones(4), cond, net=method.generator)
        t = 0.02 + 0.96 * ctx.rand((), ids, key="generator/t")
        x_t = flow.interpolate(x, ctx.randn_like(x, ids, key="generator/noise"), t)
        v_c = teacher.velocity(x_t, t, cond)
        v_u = teacher.velocity(x_t, t, uncond)
        x0_teacher = flow.x0_from_velocity(x_t, v_u + omega * (v_c - v_u), t)
        x0_fake = flow.x0_from_velocity(x_t, teacher.velocity(x_t, t, cond, net=method.fake), t)
        expected, _ = fdistill_generator_loss(x, x0_teacher, x0_fake)
    torch.testing.assert_close(loss, expected.mean(), rtol=1e-5, atol=1e-7)


def test_ratio_state_round_trips(teacher):
    method = FDistill(teacher, cfg(divergence="kl", ratio_decay=0.5))
    run_group(method, make_batch(), "generator")
    state = method.state_dict()
    assert bool(state["ratio_state"]["seen"].any())
    other = FDistill(teacher, cfg(divergence="kl", ratio_decay=0.5))
    other.load_state_dict(state)
    torch.testing.assert_close(other.ratio_state.means, method.ratio_state.means)
    with pytest.raises(ValueError, match="ratio_state"):
        other.load_state_dict({})


def test_teacher_features_stop_early_and_match_a_full_forward(teacher):
    feats = TeacherFeatures(teacher, [0, -1])
    x = torch.randn(2, 3, SIZE, SIZE, requires_grad=True)
    t = torch.tensor([0.3, 0.7])
    cond, _ = teacher.encode_prompt(["a small red circle in the center"] * 2)
    got = feats(x, t, cond)
    seen = {}
    blocks = find_blocks(teacher.transformer)
    handles = [
        blocks[i].register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o[-1])) for i in (0, 1)
    ]
    teacher.velocity(x, t, cond)
    for h in handles:
        h.remove()
    assert [f.shape[-1] for f in got] == feats.dims(x, t, cond)
    torch.testing.assert_close(got[0], seen[0])
    torch.testing.assert_close(got[1], seen[1])
    (gx,) = torch.autograd.grad(got[1].sum(), x)
    assert gx.abs().sum() > 0
    with pytest.raises(ValueError, match="out of range"):
        TeacherFeatures(teacher, [5])


def test_bad_inputs_have_clear_errors(teacher, tmp_path):
    with pytest.raises(ConfigError, match="unknown divergence 'wasserstein'") as err:
        FDistillConfig(divergence="wasserstein")
    assert err.value.key == "divergence"
    with pytest.raises(ConfigError, match=">= 1") as err:
        FDistillConfig(generator_every=0)
    assert err.value.key == "generator_every"
    with pytest.raises(ConfigError, match="t_min"):
        FDistillConfig(t_min=0.0)
    # a teacher of an unsupported family (an SD1.5-style UNet pipeline folder)
    folder = tmp_path / "sd15"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelLoadError, match="f-distill: cannot use .*StableDiffusionPipeline"):
        load_teacher(folder, method="f-distill")
    with pytest.raises(ValueError, match="no 'transformer_blocks' or 'blocks'"):
        find_blocks(torch.nn.Linear(2, 2))
    # the discriminator needs real media
    method = FDistill(teacher, cfg(divergence="js"))
    with pytest.raises(ValueError, match="needs real media in each batch"):
        run_group(method, make_batch(pixels=False), "critic", step=1)


def test_run_configs_load_from_dotted_overrides():
    from flowalign.config import load_config
    from flowalign.training.methods.distar import DistarRun
    from flowalign.training.methods.fdistill import FDistillRun

    run = load_config(
        FDistillRun,
        None,
        [
            "teacher=/m",
            "method.divergence=kl",
            "method.discriminator_blocks=[1, 3]",
            "data.toy_items=64",
            "method.critic_optim.lr=1e-3",
        ],
    )
    assert run.method.divergence == "kl" and run.method.discriminator_blocks == [1, 3]
    assert run.data.toy_items == 64 and run.method.critic_optim.lr == 1e-3
    di = load_config(
        DistarRun,
        None,
        [
            "teacher=/m",
            "method.reward=pickscore",
            "method.reward_scale=100",
            "method.alpha=2",
            "method.regularizer=kl",
        ],
    )
    assert (di.method.reward_scale, di.method.alpha, di.method.regularizer) == (100.0, 2.0, "kl")
    with pytest.raises(ConfigError) as err:
        load_config(FDistillRun, None, ["method.divergence=wasserstein"])
    assert err.value.key == "method.divergence"


def test_time_sampling_stays_in_range_and_t_power_favours_low_noise(teacher):
    ids = torch.arange(512)
    x0 = torch.zeros(512, 3, 2, 2)
    medians = {}
    for p in (1.0, 3.0):
        method = FDistill(teacher, cfg(divergence="rkl", gan_weight=0.0, t_min=0.1, t_max=0.9, t_power=p))
        ctx = StepContext(step=0, seed=0, group="critic", modules={})
        t, noise, x_t = method.noised(x0, ids, ctx, key="k")
        assert float(t.min()) >= 0.1 and float(t.max()) <= 0.9
        torch.testing.assert_close(x_t, t[:, None, None, None] * noise)
        medians[p] = float(t.median())
    assert abs(medians[1.0] - 0.5) < 0.05 and abs(medians[3.0] - (0.1 + 0.8 * 0.5**3)) < 0.05
    with pytest.raises(ConfigError) as err:
        FDistillConfig(t_power=0.0)
    assert err.value.key == "t_power"
