"""A wider one-step student: function-preserving widening of the teacher's transformer, through f-distill."""

from __future__ import annotations

import copy

import pytest
import torch
from onestep_helpers import SIZE, make_batch, run_group

from flowalign.models.widen import widen_transformer
from flowalign.training.methods.fdistill import FDistill, FDistillConfig
from flowalign.training.methods.onestep_common import GENERATOR, load_generator_weights


def _inputs(transformer, n: int = 2):
    g = torch.Generator().manual_seed(0)
    c = transformer.config
    x = torch.randn(n, c.in_channels, SIZE, SIZE, generator=g, dtype=torch.float64)
    ctx = torch.randn(n, 5, c.joint_attention_dim, generator=g, dtype=torch.float64)
    pooled = torch.randn(n, c.pooled_projection_dim, generator=g, dtype=torch.float64)
    return {
        "hidden_states": x,
        "timestep": torch.tensor([250.0, 900.0][:n], dtype=torch.float64),
        "encoder_hidden_states": ctx,
        "pooled_projections": pooled,
    }


@pytest.mark.parametrize("factor", [2, 3])
def test_widened_transformer_computes_the_same_function(teacher, factor):
    narrow = copy.deepcopy(teacher.transformer).double().eval()
    wide = widen_transformer(narrow, factor, noise=1e-2).eval()
    c, w = narrow.config, wide.config
    assert w.num_attention_heads == factor * c.num_attention_heads
    assert w.attention_head_dim == c.attention_head_dim
    assert sum(p.numel() for p in wide.parameters()) > factor * sum(p.numel() for p in narrow.parameters())
    inputs = _inputs(narrow)
    with torch.no_grad():
        a, b = narrow(**inputs).sample, wide(**inputs).sample
    # the same sums in another order, in float64: differences of a few ulp of the largest activations
    assert (a - b).abs().max() <= 1e-10 * a.abs().max()


def test_symmetry_breaking_noise_makes_the_copies_learn_differently(teacher):
    narrow = copy.deepcopy(teacher.transformer).double()
    exact = widen_transformer(narrow, 2, noise=0.0)
    noisy = widen_transformer(narrow, 2, noise=1e-2)
    d = narrow.config.num_attention_heads * narrow.config.attention_head_dim

    def copy_gap(model):  # how far the two copies of the first block's q projection are apart, in grads
        model.zero_grad()
        model(**_inputs(narrow)).sample.square().sum().backward()
        grad = model.transformer_blocks[0].attn.to_q.weight.grad
        return ((grad[:d] - grad[d:]).abs().max() / grad.abs().max()).item()

    # exact copies see the same gradients up to float64 summation order: they would never separate
    assert copy_gap(exact) < 1e-12
    # noise of 1e-2 x std on the copies' outgoing weights: gradients differ at about that relative scale
    assert copy_gap(noisy) > 1e-4


def test_fdistill_trains_a_wider_generator_and_di_star_can_start_from_it(teacher, tmp_path):
    cfg = FDistillConfig(height=SIZE, width=SIZE, divergence="js", generator_widen=2)
    method = FDistill(teacher, cfg)
    heads = teacher.transformer.config.num_attention_heads
    assert method.generator.config.num_attention_heads == 2 * heads
    assert method.fake.config.num_attention_heads == heads  # the critic keeps the teacher's width
    loss, _ = run_group(method, make_batch(2), GENERATOR)
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in method.generator.parameters() if p.requires_grad)
    method.export(tmp_path / "wide")
    # a method started from the wide folder builds the wide generator and loads it exactly
    again = FDistill(teacher, FDistillConfig(height=SIZE, width=SIZE, generator_init=tmp_path / "wide"))
    for (name, p), q in zip(
        method.generator.state_dict().items(), again.generator.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="does not fit"):
        load_generator_weights(copy.deepcopy(teacher.transformer), tmp_path / "wide")


def test_bad_widening_is_one_clear_error(teacher):
    with pytest.raises(ValueError, match="not supported"):
        widen_transformer(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="factor"):
        widen_transformer(teacher.transformer, 0)
    with pytest.raises(ValueError, match="must be >= 1, got 0") as err:
        FDistillConfig(generator_widen=0)
    assert err.value.key == "generator_widen"
