"""Properties of flowalign.objectives.fdistill (docs/algorithms.md 2.3-2.5 and the checks of 2.9)."""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F

from flowalign import flow
from flowalign.objectives.f_divergences import f_weight
from flowalign.objectives.fdistill import (
    RatioBinEMA,
    density_ratio_from_logits,
    f_distill_weights,
    fake_score_loss,
    fdistill_generator_loss,
    normalize_weights,
    time_bin_index,
)

ALL_DIVERGENCES = ["rkl", "sf", "js", "sh", "kl", "jf", "pearson", "neyman", "alpha"]


def _batch(b: int = 64, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(b, 3, generator=g, dtype=dtype)
    t = torch.rand(b, generator=g, dtype=dtype)
    return logits, t


def test_ratio_clamps_and_head_average():
    logits = torch.tensor([[-100.0, -100.0], [0.0, 2.0], [100.0, 100.0], [1.0, -1.0]])
    r = density_ratio_from_logits(logits)
    torch.testing.assert_close(r, torch.tensor([0.1, math.e, 20.0, 1.0]))
    raw = density_ratio_from_logits(torch.tensor([12.0]), logit_clamp=None, ratio_min=None, ratio_max=None)
    torch.testing.assert_close(raw, torch.tensor([math.exp(12.0)]))
    torch.testing.assert_close(
        density_ratio_from_logits(torch.tensor([12.0]), ratio_max=None), torch.tensor([math.exp(10.0)])
    )
    assert not density_ratio_from_logits(logits.requires_grad_()).requires_grad


def test_time_bins_are_equal_width_and_cover_the_edges():
    t = torch.tensor([0.0, 0.05, 0.15, 0.55, 0.999, 1.0])
    assert time_bin_index(t).tolist() == [0, 0, 1, 5, 9, 9]
    assert time_bin_index(t, num_bins=2, t_min=0.0, t_max=1.0).tolist() == [0, 0, 0, 1, 1, 1]


def test_bin_means_after_normalisation_are_one():
    r = torch.rand(500, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 10 + 0.1
    t = (
        torch.rand(500, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.8
    )  # bins 8, 9 empty
    state = RatioBinEMA()
    state.update(*state.bin_sums(r, t))
    r_tilde = state.normalize(r, t)
    bins = time_bin_index(t)
    for b in range(8):
        assert r_tilde[bins == b].mean().item() == pytest.approx(1.0, abs=1e-6)
    assert state.seen.tolist() == [True] * 8 + [False] * 2
    assert state.means[8:].tolist() == [1.0, 1.0]  # empty bins untouched


def test_ema_update_rule_and_state_dict_round_trip():
    state = RatioBinEMA(num_bins=2, decay=0.5)
    t = torch.tensor([0.25, 0.25, 0.75])
    state.update(*state.bin_sums(torch.tensor([1.0, 3.0, 4.0]), t))  # first sight: batch means 2, 4
    assert state.means.tolist() == [2.0, 4.0]
    state.update(*state.bin_sums(torch.tensor([6.0]), torch.tensor([0.25])))  # only bin 0 present
    assert state.means.tolist() == [4.0, 4.0]  # 0.5 * 2 + 0.5 * 6; bin 1 unchanged
    restored = RatioBinEMA(num_bins=2)
    restored.load_state_dict(state.state_dict())
    assert restored.decay == 0.5
    r = torch.tensor([2.0, 8.0, 1.0])
    torch.testing.assert_close(restored.normalize(r, t), state.normalize(r, t))
    torch.testing.assert_close(state.normalize(r, t), torch.tensor([0.5, 2.0, 0.25]))
    with pytest.raises(ValueError, match="num_bins is 10 here but 2 in the state"):
        RatioBinEMA().load_state_dict(state.state_dict())
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        RatioBinEMA(decay=1.0)


def test_global_weight_mean_is_one():
    logits, t = _batch(seed=3)
    for name in ALL_DIVERGENCES:
        w, m = f_distill_weights(logits, t, divergence=name)
        assert w.mean().item() == pytest.approx(1.0, abs=1e-12)
        assert (w > 0).all() and not w.requires_grad
        assert m["weight_max"] >= 1.0 >= m["weight_min"]


def test_reverse_kl_weights_are_exactly_one():
    logits, t = _batch(seed=4)
    w, _ = f_distill_weights(logits, t, divergence="rkl")
    assert torch.equal(w, torch.ones_like(w))
    w_alpha0, _ = f_distill_weights(logits, t, divergence="alpha", alpha=0.0)
    assert torch.equal(w_alpha0, torch.ones_like(w_alpha0))


@pytest.mark.parametrize("name", ALL_DIVERGENCES)
@pytest.mark.parametrize("logit", [-20.0, 0.0, 1.3])
def test_constant_logits_give_unit_weights_for_every_divergence(name, logit):
    t = torch.rand(37, generator=torch.Generator().manual_seed(5))
    w, _ = f_distill_weights(torch.full((37, 2), logit), t, divergence=name)
    torch.testing.assert_close(w, torch.ones(37), rtol=0, atol=1e-6)


def test_weights_follow_the_divergence_without_bin_normalisation():
    logits, t = _batch(seed=6)
    r = density_ratio_from_logits(logits)
    for name in ("js", "kl", "neyman"):
        w, _ = f_distill_weights(logits, t, divergence=name, bin_normalize=False)
        h = f_weight(r, divergence=name)
        torch.testing.assert_close(w, h / h.mean())
    # forward-KL weights grow with the logit; softened reverse-KL weights fall
    order = r.argsort()
    assert (f_distill_weights(logits, t, divergence="kl", bin_normalize=False)[0][order].diff() >= 0).all()
    assert (f_distill_weights(logits, t, divergence="sf", bin_normalize=False)[0][order].diff() <= 0).all()


def test_all_reduce_across_two_ranks_equals_one_process_on_the_global_batch():
    logits, t = _batch(b=40, seed=7)
    single, _ = f_distill_weights(logits, t, divergence="kl")

    barrier, slots = threading.Barrier(2), [None, None]

    def make_reduce(rank: int):
        def reduce_fn(x: torch.Tensor) -> torch.Tensor:  # an in-process SUM all-reduce
            slots[rank] = x.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total

        return reduce_fn

    out = [None, None]

    def run(rank: int):
        part = slice(0, 15) if rank == 0 else slice(15, 40)  # unequal local batches
        out[rank] = f_distill_weights(logits[part], t[part], divergence="kl", reduce_fn=make_reduce(rank))[0]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    torch.testing.assert_close(torch.cat(out), single)
    # without the all-reduce each rank normalises by its own statistics, which differs
    local = torch.cat(
        [
            f_distill_weights(logits[:15], t[:15], divergence="kl")[0],
            f_distill_weights(logits[15:], t[15:], divergence="kl")[0],
        ]
    )
    assert not torch.allclose(local, single)


def _dmd2_reference_grad(x: torch.Tensor, x0_teacher: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    # DMD2's generator loss, written out independently (tianweiy/DMD2 distribution matching loss)
    x = x.detach().clone().requires_grad_()
    p_real = x - x0_teacher
    p_fake = x - x0_fake
    grad = (p_real - p_fake) / p_real.abs().mean(dim=[1, 2, 3], keepdim=True)
    loss = 0.5 * F.mse_loss(x, (x - grad).detach(), reduction="mean")
    loss.backward()
    return x.grad


def test_reverse_kl_student_gradient_equals_dmd2_exactly():
    g = torch.Generator().manual_seed(8)
    kw = {"generator": g, "dtype": torch.float64}
    x = torch.randn(6, 4, 8, 8, **kw).requires_grad_()
    x0_teacher, x0_fake = torch.randn(6, 4, 8, 8, **kw), torch.randn(6, 4, 8, 8, **kw)
    logits, t = _batch(b=6, seed=9)
    w, _ = f_distill_weights(logits, t, divergence="rkl")
    loss, _ = fdistill_generator_loss(x, x0_teacher, x0_fake, weights=w, eps=0.0)
    loss.mean().backward()
    torch.testing.assert_close(x.grad, _dmd2_reference_grad(x, x0_teacher, x0_fake), rtol=1e-12, atol=0)
    # and a non-trivial divergence re-weights each sample's DMD2 gradient by h~
    x.grad = None
    w_js, _ = f_distill_weights(logits, t, divergence="js")
    fdistill_generator_loss(x, x0_teacher, x0_fake, weights=w_js, eps=0.0)[0].mean().backward()
    torch.testing.assert_close(
        x.grad, w_js[:, None, None, None] * _dmd2_reference_grad(x, x0_teacher, x0_fake)
    )


def test_fake_score_equal_to_teacher_gives_zero_generator_gradient():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(5, 3, 4, 4, generator=g).requires_grad_()
    x0 = torch.randn(5, 3, 4, 4, generator=g)
    logits, t = _batch(b=5, seed=11, dtype=torch.float32)
    w, _ = f_distill_weights(logits, t, divergence="kl")
    loss, m = fdistill_generator_loss(x, x0, x0.clone(), weights=w)
    loss.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert m["dm_grad_norm"] == 0


def test_generator_step_moves_the_sample_toward_the_teacher_prediction():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(4, 2, 8, generator=g).requires_grad_()
    x0_teacher = torch.randn(4, 2, 8, generator=g)
    x0_fake = x.detach() + 0.1 * torch.randn(4, 2, 8, generator=g)
    loss, m = fdistill_generator_loss(x, x0_teacher, x0_fake)
    loss.sum().backward()
    # dL/dx = kappa (x0_fake - x0_teacher) / D with kappa = 1 / (mean |x - x0_teacher| + eps)
    kappa = 1 / ((x.detach() - x0_teacher).abs().mean(dim=(1, 2)) + 1e-6)
    torch.testing.assert_close(x.grad, kappa[:, None, None] * (x0_fake - x0_teacher) / 16)
    torch.testing.assert_close(m["dmd_scale"], kappa.mean())


def test_gan_term_is_added_with_its_weight_and_reaches_the_logits():
    g = torch.Generator().manual_seed(13)
    x = torch.randn(3, 2, 4, generator=g).requires_grad_()
    x0_t, x0_f = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    logits = torch.randn(3, 2, generator=g).requires_grad_()
    base, _ = fdistill_generator_loss(x, x0_t, x0_f)
    loss, m = fdistill_generator_loss(x, x0_t, x0_f, fake_logits=logits, gan_weight=1e-3)
    torch.testing.assert_close(loss, base + 1e-3 * F.softplus(-logits).mean(dim=1))
    loss.sum().backward()
    assert (logits.grad < 0).all()  # raising the fake logit lowers the generator loss
    with pytest.raises(ValueError, match="needs fake_logits"):
        fdistill_generator_loss(x, x0_t, x0_f, gan_weight=1e-3)


@pytest.mark.parametrize("theta", [0.6, -0.4])
def test_gaussian_toy_gradient_equals_theta(theta):
    # teacher p = N(0, 1), student q = N(theta, 1), x = theta + z; exact scores and ratio (docs/algorithms.md 2.9).
    # With x0_hat = x + s(x) (unit noise scale), x0_fake - x0_teacher = s_q - s_p = theta, and the
    # f-distill gradient -E_q[h(r) (s_p - s_q)] = theta E_q[h(r)] = theta for h = 1 and h = r (E_q[r] = 1).
    n = 50_000
    z = torch.randn(n, 1, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    thetas = torch.full((n, 1), theta, dtype=torch.float64, requires_grad=True)  # per-sample grads
    x = thetas + z
    x_d = x.detach()
    r = torch.exp(-theta * x_d[:, 0] + theta**2 / 2)  # p / q
    x0_teacher, x0_fake = x_d - x_d, x_d - (x_d - theta)
    for name in ("rkl", "kl"):
        thetas.grad = None
        loss, _ = fdistill_generator_loss(
            x, x0_teacher, x0_fake, weights=f_weight(r, divergence=name), dmd_normalize=False
        )
        loss.sum().backward(retain_graph=True)
        grads = thetas.grad[:, 0]
        se = grads.std().item() / math.sqrt(n)
        assert abs(grads.mean().item() - theta) <= 5 * se + 1e-12, name
    # every divergence: after the weight normalisation the toy gradient is exactly theta (so of its sign)
    for name in ALL_DIVERGENCES:
        thetas.grad = None
        h = normalize_weights(f_weight(r, divergence=name))
        loss, _ = fdistill_generator_loss(x, x0_teacher, x0_fake, weights=h, dmd_normalize=False)
        loss.sum().backward(retain_graph=True)
        assert thetas.grad.mean().item() == pytest.approx(theta, rel=1e-9), name


def test_fake_score_loss_is_flow_matching_on_detached_student_samples():
    g = torch.Generator().manual_seed(15)
    x0 = torch.randn(4, 3, 5, generator=g).requires_grad_()
    noise = torch.randn(4, 3, 5, generator=g)
    v_exact = flow.velocity_target(x0.detach(), noise)
    loss, _ = fake_score_loss(v_exact, x0, noise)
    assert torch.equal(loss, torch.zeros(4))
    v_fake = (v_exact + 0.5).requires_grad_()
    loss, m = fake_score_loss(v_fake, x0, noise, weights=torch.tensor([1.0, 2.0, 0.0, 1.0]))
    torch.testing.assert_close(loss, torch.tensor([0.25, 0.5, 0.0, 0.25]))
    loss.sum().backward()
    assert x0.grad is None and v_fake.grad is not None  # the generator is not trained by this loss
    torch.testing.assert_close(m["mse"], torch.tensor(0.25))


def test_bad_inputs_raise_clear_errors():
    logits, t = _batch(b=8)
    with pytest.raises(ValueError, match=r"t must have shape \[B\] = \[8\]"):
        f_distill_weights(logits, t[:7])
    with pytest.raises(ValueError, match="unknown divergence 'wasserstein'"):
        f_distill_weights(logits, t, divergence="wasserstein")
    with pytest.raises(ValueError, match=r"logits must have shape \[B\] or \[B, H\]"):
        density_ratio_from_logits(torch.zeros(2, 3, 4))
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"x0_fake must have the shape of x \[4, 3\]"):
        fdistill_generator_loss(x, x, torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"weights must have shape \[B\] = \[4\]"):
        fdistill_generator_loss(x, x, x, weights=torch.ones(3))
