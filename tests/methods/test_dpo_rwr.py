"""Flow-DPO and Flow-RWR methods on the shared loop: reference handling, pair layout, properties."""

from __future__ import annotations

import math

import pytest
import torch

from flowalign.config import CheckpointConfig, LoraConfig, OptimConfig, TrainConfig
from flowalign.models import load_flow_model
from flowalign.models.lora import has_lora
from flowalign.training.loop import train
from flowalign.training.method import StepContext
from flowalign.training.methods.dpo import DPOConfig, FlowDPO
from flowalign.training.methods.rwr import FlowRWR, RWRConfig, WeightedSamples
from flowalign.training.methods.sft import FlowMatchingSFT, SFTConfig

PROMPTS = ["a small red circle in the center", "a large blue square in the top left"]


def _pairs(n=4, identical=False):
    g = torch.Generator().manual_seed(0)
    w = torch.rand(n, 3, 32, 32, generator=g)
    l_ = w.clone() if identical else torch.rand(n, 3, 32, 32, generator=g)
    return [{"media_w": w[i], "media_l": l_[i], "prompt": PROMPTS[i % 2], "index": i} for i in range(n)]


def _ctx(method, step=0):
    return StepContext(step=step, seed=0, modules=method.trainable_modules())


@pytest.mark.parametrize("lora", [LoraConfig(rank=4), None])
def test_dpo_loss_is_log2_at_init(toy_model, lora):
    method = FlowDPO(toy_model, DPOConfig(beta=500.0), lora=lora)
    batch = method.collate(_pairs())
    loss, metrics = method.compute_loss(batch, _ctx(method), "main")
    assert abs(loss.item() - math.log(2)) < 1e-6
    assert metrics["implicit_acc"].item() == 0.0  # inside == 0 exactly: no pair counted as right


def test_dpo_shares_noise_and_t_within_a_pair(toy_model):
    # with chosen == rejected the pair's errors coincide only if both members get the same noise and t
    method = FlowDPO(toy_model, DPOConfig(beta=500.0), lora=LoraConfig(rank=4))
    torch.nn.init.normal_(
        next(p for n, p in toy_model.transformer.named_parameters() if "lora_B" in n), std=0.5
    )
    batch = method.collate(_pairs(identical=True))
    loss, metrics = method.compute_loss(batch, _ctx(method), "main")
    assert abs(loss.item() - math.log(2)) < 1e-6
    assert metrics["inside"].abs().item() < 1e-6


def test_dpo_lora_training_moves_only_adapters_and_exports(toy_image_dir, tmp_path):
    model = load_flow_model(toy_image_dir)
    base = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    method = FlowDPO(model, DPOConfig(beta=2000.0), lora=LoraConfig(rank=4))
    assert has_lora(model.transformer)
    config = TrainConfig(
        output_dir=tmp_path / "run",
        max_steps=3,
        batch_size=4,
        log_every=1,
        trackers=[],
        cpu=True,
        optim=OptimConfig(lr=1e-2),
        checkpoint=CheckpointConfig(every=0),
    )
    result = train(method, _pairs(8), config, progress=False)
    state = model.transformer.state_dict()
    changed = [k for k in state if "lora" in k and not torch.equal(state[k], torch.zeros_like(state[k]))]
    assert changed, "LoRA weights did not move"
    for key, value in base.items():  # base weights untouched (peft renames them with base_layer)
        peft_key = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state.get(key, state.get(peft_key)), value), key
    assert (result.export_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    merged = load_flow_model(result.export_dir)
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([0.3, 0.8])
    cond, _ = model.encode_prompt(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(
            merged.velocity(x, t, cond), model.velocity(x, t, cond), rtol=1e-4, atol=1e-4
        )


def test_dpo_raises_policy_preference_after_training(toy_image_dir, tmp_path):
    model = load_flow_model(toy_image_dir)
    method = FlowDPO(model, DPOConfig(beta=5000.0), lora=LoraConfig(rank=8))
    pairs = _pairs(4)
    config = TrainConfig(
        output_dir=tmp_path / "run",
        max_steps=15,
        batch_size=4,
        log_every=1,
        trackers=[],
        cpu=True,
        optim=OptimConfig(lr=3e-3),
        checkpoint=CheckpointConfig(every=0),
    )
    before, _ = method.compute_loss(method.collate(pairs), _ctx(method, step=100), "main")
    train(method, pairs, config, progress=False)
    after, _ = method.compute_loss(method.collate(pairs), _ctx(method, step=100), "main")
    assert after.item() < before.item() - 0.05  # the same pairs, noise and t: the policy now prefers w


def test_rwr_with_equal_rewards_equals_flow_matching(toy_model):
    media = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    prompts = [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    data = WeightedSamples(media, prompts, torch.full((4,), 0.7), RWRConfig(temperature=0.1))
    assert torch.equal(data.weights, torch.ones(4))
    rwr = FlowRWR(toy_model, RWRConfig())
    batch = torch.utils.data.default_collate([data[i] for i in range(4)])
    rwr_loss, _ = rwr.compute_loss(batch, _ctx(rwr), "main")
    sft = FlowMatchingSFT(toy_model, SFTConfig(caption_dropout=0.0))
    sft_loss, _ = sft.compute_loss(sft.collate([data[i] for i in range(4)]), _ctx(sft), "main")
    torch.testing.assert_close(rwr_loss, sft_loss)


def test_rwr_caption_dropout_drops_the_prompts_sft_drops(toy_model):
    """Equal rewards and the same dropout: RWR is SFT, empty prompts included; dropout changes the loss."""
    media = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    data = WeightedSamples(media, [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2, torch.zeros(4), RWRConfig())
    items = [data[i] for i in range(4)]
    batch = torch.utils.data.default_collate(items)
    losses = {}
    for p in (0.0, 0.5, 1.0):
        rwr = FlowRWR(toy_model, RWRConfig(caption_dropout=p))
        losses[p], _ = rwr.compute_loss(batch, _ctx(rwr), "main")
        sft = FlowMatchingSFT(toy_model, SFTConfig(caption_dropout=p))
        sft_loss, _ = sft.compute_loss(sft.collate(items), _ctx(sft), "main")
        torch.testing.assert_close(losses[p], sft_loss)
    assert not torch.allclose(losses[0.0], losses[1.0])
    with pytest.raises(ValueError, match="caption_dropout"):
        RWRConfig(caption_dropout=1.5)


def test_rwr_weights_favour_higher_reward_within_group():
    media = torch.rand(4, 3, 8, 8)
    data = WeightedSamples(
        media,
        ["a", "a", "b", "b"],
        torch.tensor([0.9, 0.1, 0.2, 0.3]),
        RWRConfig(temperature=0.1, max_weight=None),
    )
    assert data.weights[0] > 1 > data.weights[1]
    assert data.weights[3] > data.weights[2]
    torch.testing.assert_close(data.weights[:2].sum(), torch.tensor(2.0))


def test_bad_dpo_settings_are_named(toy_model):
    with pytest.raises(ValueError, match="beta_schedule"):
        FlowDPO(toy_model, DPOConfig(beta_schedule="linear"))
    with pytest.raises(ValueError, match="reduction"):
        FlowDPO(toy_model, DPOConfig(reduction="median"))
