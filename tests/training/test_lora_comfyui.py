"""ComfyUI export of Wan LoRAs: diffusers' loader of original-layout Wan LoRAs gives the same model back."""

import json

import pytest
import safetensors.torch
import torch
from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

from flowalign.config import LoraConfig
from flowalign.models.lora import add_lora, save_lora
from flowalign.models.toy import build_toy_pipeline
from flowalign.training.lora_comfyui import convert_wan_lora_to_comfyui, wan_lora_to_comfyui

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2", "proj_out", "time_proj"]


def _wan():
    transformer = build_toy_pipeline("video", seed=0, num_layers=2, width=64).transformer
    return transformer.eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 2, 16, 16, generator=g)
    text = torch.randn(2, 16, 64, generator=g)
    return dict(
        hidden_states=x, timestep=torch.tensor([300.0, 800.0]), encoder_hidden_states=text, return_dict=False
    )


@torch.no_grad()
def test_converted_lora_reproduces_the_adapted_model(tmp_path):
    adapted = _wan()
    add_lora(adapted, LoraConfig(rank=4, alpha=2.0, target_modules=TARGETS))
    g = torch.Generator().manual_seed(2)
    for name, p in adapted.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    expected = adapted(**_inputs())[0]
    save_lora(adapted, tmp_path / "lora")
    comfy = convert_wan_lora_to_comfyui(tmp_path / "lora", tmp_path / "comfy.safetensors")

    keys = safetensors.torch.load_file(str(comfy))
    assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in keys
    assert "diffusion_model.blocks.1.ffn.2.lora_up.weight" in keys
    assert "diffusion_model.head.head.lora_up.weight" in keys
    assert not any(k.endswith(".alpha") for k in keys)  # alpha / r is folded into lora_up
    assert all(k.startswith("diffusion_model.") for k in keys)

    fresh = _wan()
    base = fresh(**_inputs())[0]
    assert not torch.allclose(base, expected, atol=1e-4)  # the LoRA does change the output
    state = WanLoraLoaderMixin.lora_state_dict(str(comfy))
    fresh.load_lora_adapter(state, prefix="transformer")
    torch.testing.assert_close(fresh(**_inputs())[0], expected, rtol=1e-4, atol=1e-5)


def test_modules_without_an_original_name_and_missing_headers_are_refused(tmp_path):
    w = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="patch_embedding"):
        wan_lora_to_comfyui({"transformer.patch_embedding.lora_A.weight": w}, rank=4, alpha=4.0)
    with pytest.raises(ValueError, match="not a LoRA weight"):
        wan_lora_to_comfyui({"transformer.blocks.0.attn1.to_q.weight": w}, rank=4, alpha=4.0)
    with pytest.raises(ValueError, match="rank 4"):
        wan_lora_to_comfyui({"transformer.blocks.0.attn1.to_q.lora_A.weight": w}, rank=8, alpha=4.0)
    bare = tmp_path / "bare.safetensors"
    safetensors.torch.save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": w}, str(bare))
    with pytest.raises(ValueError, match="bare.safetensors.*header"):
        convert_wan_lora_to_comfyui(bare, tmp_path / "out.safetensors")
    dora = tmp_path / "dora.safetensors"
    header = {
        "lora_adapter_metadata": json.dumps(
            {"transformer.r": 4, "transformer.lora_alpha": 4, "transformer.use_dora": True}
        )
    }
    safetensors.torch.save_file(
        {"transformer.blocks.0.attn1.to_q.lora_A.weight": w}, str(dora), metadata=header
    )
    with pytest.raises(ValueError, match="DoRA"):
        convert_wan_lora_to_comfyui(dora, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_converts_and_names_a_bad_file(tmp_path):
    from typer.testing import CliRunner

    from flowalign.cli import app

    adapted = _wan()
    add_lora(adapted, LoraConfig(rank=2, alpha=2.0))
    save_lora(adapted, tmp_path / "lora")
    result = CliRunner().invoke(
        app, ["lora-comfyui", str(tmp_path / "lora"), "--out", str(tmp_path / "c.safetensors")]
    )
    assert result.exit_code == 0, result.output
    assert (
        len(safetensors.torch.load_file(str(tmp_path / "c.safetensors"))) == 2 * 2 * 4 * 2
    )  # blocks, attns, projs, A/B
    result = CliRunner().invoke(
        app, ["lora-comfyui", str(tmp_path / "none"), "--out", str(tmp_path / "d.safetensors")]
    )
    assert result.exit_code == 2 and "no LoRA file at" in result.output
