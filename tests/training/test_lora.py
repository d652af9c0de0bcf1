"""LoRA on a tiny SD3 transformer: reference = adapters off, export loadable by diffusers, merge, training."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from safetensors import safe_open
from torch.utils.data import Dataset

from flowalign import flow
from flowalign.config import LoraConfig, OptimConfig, TrainConfig
from flowalign.models.lora import (
    LORA_WEIGHT_NAME,
    adapters_disabled,
    add_lora,
    has_lora,
    lora_parameters,
    merge_lora,
    save_lora,
)
from flowalign.training.checkpoint import load_checkpoint
from flowalign.training.loop import train
from flowalign.training.method import Method


def tiny_transformer(seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
    ).eval()


def _inputs(n: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(n, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(n, 5, 16, generator=g),
        "pooled_projections": torch.randn(n, 8, generator=g),
        "timestep": torch.tensor([500.0, 200.0][:n]),
    }


def _run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _perturb(params) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_only_lora_parameters_are_trainable_and_disabled_adapters_give_the_base_output():
    model, inputs = tiny_transformer(), _inputs()
    base = _run(model, inputs)
    params = add_lora(model, LoraConfig(rank=4, alpha=8.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(params) == len(trainable) == 8  # to_q/k/v/out.0 x (A, B) in one block
    assert torch.equal(_run(model, inputs), base)  # B = 0 at init
    _perturb(params)
    adapted = _run(model, inputs)
    assert (adapted - base).abs().max() > 1e-3
    with adapters_disabled(model):
        assert torch.equal(_run(model, inputs), base)
    assert torch.equal(_run(model, inputs), adapted)  # re-enabled afterwards
    with pytest.raises(ValueError, match="no LoRA adapters"):
        with adapters_disabled(tiny_transformer()):
            pass
    with pytest.raises(ValueError, match="cannot attach LoRA"):
        add_lora(tiny_transformer(), LoraConfig(target_modules=["no_such_layer"]))


def test_export_loads_in_a_diffusers_pipeline_and_merge_matches(tmp_path):
    model, inputs = tiny_transformer(), _inputs()
    _perturb(add_lora(model, LoraConfig(rank=4, alpha=8.0)))  # alpha != rank: the scale must travel too
    adapted = _run(model, inputs)
    path = save_lora(model, tmp_path)
    assert path.name == LORA_WEIGHT_NAME
    with safe_open(str(path), "pt") as fh:
        assert all(k.startswith("transformer.") for k in fh.keys())
        assert "lora_adapter_metadata" in fh.metadata()
    pipe = StableDiffusion3Pipeline(
        transformer=tiny_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.load_lora_weights(tmp_path)
    torch.testing.assert_close(_run(pipe.transformer, inputs), adapted, rtol=0, atol=1e-6)
    fresh = tiny_transformer()
    fresh.load_lora_adapter(tmp_path, prefix="transformer", weight_name=LORA_WEIGHT_NAME)
    torch.testing.assert_close(_run(fresh, inputs), adapted, rtol=0, atol=1e-6)
    merged = merge_lora(model)
    assert not has_lora(merged) and not lora_parameters(merged)
    torch.testing.assert_close(_run(merged, inputs), adapted, rtol=1e-5, atol=1e-5)


class LoraFlowMatching(Method):
    """Flow matching with LoRA on the tiny SD3 transformer; logs how far the policy is from the base."""

    def __init__(self, cfg: LoraConfig) -> None:
        self.transformer = tiny_transformer()
        add_lora(self.transformer, cfg)

    def trainable_modules(self):
        return {"transformer": self.transformer}

    def compute_loss(self, batch, ctx, group):
        x0, ids = batch["x0"], batch["index"]  # [B, 4, 8, 8]
        noise = ctx.randn_like(x0, ids, key="noise")
        t = ctx.rand((), ids, key="t")
        x_t = flow.interpolate(x0, noise, t)
        kwargs = {
            "encoder_hidden_states": batch["text"],
            "pooled_projections": batch["pooled"],
            "return_dict": False,
        }
        net = ctx.module("transformer")
        v = net(hidden_states=x_t, timestep=flow.t_to_timesteps(t), **kwargs)[0]
        loss = (v.float() - flow.velocity_target(x0, noise)).pow(2).mean()
        if not has_lora(net):
            return loss, {}
        with torch.no_grad(), adapters_disabled(net):
            v_ref = net(hidden_states=x_t, timestep=flow.t_to_timesteps(t), **kwargs)[0]
        return loss, {"dist_to_ref": (v - v_ref).pow(2).mean()}


class LatentData(Dataset):
    def __init__(self, n: int = 4) -> None:
        g = torch.Generator().manual_seed(0)
        self.x0, self.text, self.pooled = (
            torch.randn(n, 4, 8, 8, generator=g),
            torch.randn(n, 5, 16, generator=g),
            torch.randn(n, 8, generator=g),
        )

    def __len__(self) -> int:
        return len(self.x0)

    def __getitem__(self, i):
        return {"x0": self.x0[i], "text": self.text[i], "pooled": self.pooled[i]}


def test_lora_training_saves_only_adapters_and_exports_a_loadable_lora(tmp_path):
    lcfg = LoraConfig(rank=2, alpha=2.0, init="gaussian")
    cfg = TrainConfig(output_dir=tmp_path, max_steps=3, batch_size=2, log_every=1, trackers=[], cpu=True)
    cfg.optim = OptimConfig(lr=1e-2)
    method = LoraFlowMatching(lcfg)
    result = train(method, LatentData(), cfg, progress=False)
    ckpt = load_checkpoint(result.checkpoint)
    names = list(ckpt.weights["transformer"])
    assert names and all("lora_" in n for n in names)
    assert result.metrics["dist_to_ref"] > 0  # the policy moved away from the (adapters-off) reference
    inputs = _inputs()
    fresh = tiny_transformer()
    fresh.load_lora_adapter(
        result.export_dir / "transformer", prefix="transformer", weight_name=LORA_WEIGHT_NAME
    )
    torch.testing.assert_close(_run(fresh, inputs), _run(method.transformer, inputs), rtol=0, atol=1e-6)


class FullFineTune(LoraFlowMatching):
    def __init__(self) -> None:
        self.transformer = tiny_transformer()


def test_gradient_checkpointing_gives_the_same_training_run(tmp_path):
    """Recomputing activations in backward changes memory, not numbers (tolerance 1e-6 on losses)."""
    losses = {}
    for flag in (False, True):
        cfg = TrainConfig(output_dir=tmp_path / str(flag), max_steps=2, batch_size=2, trackers=[], cpu=True)
        cfg.gradient_checkpointing = flag
        method = FullFineTune()
        result = train(method, LatentData(), cfg, progress=False)
        assert method.transformer.is_gradient_checkpointing == flag
        losses[flag] = result.metrics["loss"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
