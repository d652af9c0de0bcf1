"""ComfyUI export of FLUX.2, Qwen-Image and Z-Image LoRAs: diffusers' own converter of each family's
non-diffusers layout (``<Family>LoraLoaderMixin.lora_state_dict``) reads the file back to our modules,
each module's B A equal to ours, and the reloaded transformer reproduces the adapted velocity (fp32).
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from diffusers.loaders.lora_pipeline import (
    Flux2LoraLoaderMixin,
    QwenImageLoraLoaderMixin,
    ZImageLoraLoaderMixin,
)
from typer.testing import CliRunner

from flowalign.cli import app
from flowalign.config import LoraConfig
from flowalign.models import load_flow_model
from flowalign.models.lora import add_lora, save_lora
from flowalign.training.lora_comfyui import convert_lora_to_comfyui

pytestmark = pytest.mark.usefixtures("one_thread")

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
TARGETS = {
    "flux2": ATTN
    + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.linear_in", "ff_context.linear_out"]
    + ["to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out", "x_embedder", "proj_out"],
    "qwen-image": ATTN + ["add_q_proj", "to_add_out", "img_mlp.net.0.proj", "txt_mlp.net.2", "img_in"],
    "z-image": ATTN + ["feed_forward.w1", "feed_forward.w3", "cap_embedder.1"],
}
LOADERS = {
    "flux2": Flux2LoraLoaderMixin,
    "qwen-image": QwenImageLoraLoaderMixin,
    "z-image": ZImageLoraLoaderMixin,
}
EXPECTED_KEYS = {
    "flux2": [
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight",
        "diffusion_model.double_blocks.0.txt_attn.proj.lora_B.weight",
        "diffusion_model.single_blocks.0.linear1.lora_A.weight",
        "diffusion_model.single_blocks.0.linear2.lora_B.weight",
        "diffusion_model.img_in.lora_A.weight",
    ],
    "qwen-image": ["diffusion_model.transformer_blocks.0.attn.to_q.lora_down.weight"],
    "z-image": ["diffusion_model.layers.0.attention.out.lora_up.weight"],
}


def _adapted(model, family):
    transformer = model.transformer
    add_lora(transformer, LoraConfig(rank=4, alpha=2.0, target_modules=TARGETS[family]))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return transformer


def _velocity(model, net):
    cond, _ = model.encode_prompt(["a red circle", "a blue square"])
    x = torch.randn(model.latent_shape(2, 32, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.velocity(x, torch.tensor([0.3, 0.8]), cond, net=net)


def _products(state, prefix="transformer."):
    """{module: B A} of a diffusers-layout LoRA state dict (lora_A / lora_B keys)."""
    out = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix(prefix).removesuffix(".lora_A.weight")
            out[module] = state[key.replace("lora_A", "lora_B")].double() @ a.double()
    return out


@pytest.mark.parametrize("family", ["flux2", "qwen-image", "z-image"])
def test_comfyui_file_loads_back_through_diffusers(tiny_model_dir, tmp_path, family):
    folder = tiny_model_dir(family)
    model = load_flow_model(folder)
    adapted = _adapted(model, family)
    expected = _velocity(model, adapted)
    save_lora(adapted, tmp_path / "lora")
    comfy = convert_lora_to_comfyui(tmp_path / "lora", tmp_path / "comfy.safetensors", family=family)

    keys = safetensors.torch.load_file(str(comfy))
    assert all(k.startswith("diffusion_model.") for k in keys)
    assert not any(k.endswith(".alpha") for k in keys)  # alpha / r is folded into lora_up
    assert set(EXPECTED_KEYS[family]) <= set(keys)

    ours = safetensors.torch.load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    theirs = LOADERS[family].lora_state_dict(str(comfy))
    ours_products, theirs_products = _products(ours), _products(theirs)
    assert theirs_products.keys() == ours_products.keys()  # diffusers' converter gives our modules back
    for module, product in ours_products.items():  # peft's scale alpha / r = 0.5
        torch.testing.assert_close(theirs_products[module], 0.5 * product, rtol=1e-12, atol=1e-12)

    fresh = load_flow_model(folder)
    base = _velocity(fresh, fresh.transformer)
    assert (base - expected).abs().max() > 1e-3  # the LoRA changes the output
    fresh.transformer.load_lora_adapter(theirs, prefix="transformer")
    torch.testing.assert_close(_velocity(fresh, fresh.transformer), expected, rtol=1e-4, atol=1e-5)


def test_cli_reads_the_family_beside_the_lora_and_refuses_unknown_ones(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("qwen-image")
    model = load_flow_model(folder)
    adapted = _adapted(model, "qwen-image")
    model.save_pretrained(tmp_path / "final")
    save_lora(adapted, tmp_path / "final" / "lora")
    out = tmp_path / "c.safetensors"
    res = CliRunner().invoke(app, ["lora-comfyui", str(tmp_path / "final" / "lora"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "diffusion_model.transformer_blocks.0.attn.to_q.lora_down.weight" in safetensors.torch.load_file(
        str(out)
    )
    res = CliRunner().invoke(
        app, ["lora-comfyui", str(tmp_path / "final" / "lora"), "--out", str(out), "--family", "ltx2"]
    )
    assert res.exit_code != 0 and "no ComfyUI LoRA layout for family 'ltx2'" in res.output
