"""`dpo.divergence` on the Flow-DPO method: reverse KL is today's loss, others train and are named."""

from __future__ import annotations

import math

import pytest
import torch

from flowalign.config import LoraConfig, load_config
from flowalign.training.method import StepContext
from flowalign.training.methods.dpo import DPOConfig, FlowDPO
from flowalign.training.runs import DPORun

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a small red circle in the center", "a large blue square in the top left"]


def _batch(method):
    g = torch.Generator().manual_seed(0)
    w, l_ = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    return method.collate(
        [{"media_w": w[i], "media_l": l_[i], "prompt": PROMPTS[i], "index": i} for i in range(2)]
    )


def test_divergence_key_on_the_dpo_method(toy_model):
    lora = LoraConfig(rank=4)
    rkl = FlowDPO(toy_model, DPOConfig(beta=500.0, divergence="rkl"), lora=lora)
    lora_b = next(p for n, p in toy_model.transformer.named_parameters() if "lora_B" in n)
    torch.nn.init.normal_(lora_b, std=0.5)  # policy != reference
    ctx = StepContext(step=0, seed=0, modules=rkl.trainable_modules())
    loss_rkl, _ = rkl.compute_loss(_batch(rkl), ctx, "main")
    rkl.config.divergence = "reverse_kl"
    loss_default, _ = rkl.compute_loss(_batch(rkl), ctx, "main")
    assert torch.equal(loss_rkl, loss_default)
    rkl.config.divergence = "js"
    loss_js, metrics = rkl.compute_loss(_batch(rkl), ctx, "main")
    assert torch.isfinite(loss_js) and not torch.equal(loss_js, loss_rkl)
    loss_js.backward()
    assert lora_b.grad is not None and lora_b.grad.abs().sum() > 0
    torch.nn.init.zeros_(lora_b)
    loss0, _ = rkl.compute_loss(_batch(rkl), ctx, "main")
    assert abs(loss0.item() - math.log(2)) < 1e-6


def test_divergence_from_the_config_and_a_bad_name(toy_model):
    run = load_config(DPORun, None, ["model=/m", "data=/d", "dpo.divergence=js", "dpo.ratio_scale=100"])
    assert run.dpo.divergence == "js" and run.dpo.ratio_scale == 100.0
    with pytest.raises(ValueError, match="unknown divergence 'tv'"):
        FlowDPO(toy_model, DPOConfig(divergence="tv"), lora=LoraConfig(rank=4))
