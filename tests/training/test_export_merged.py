"""Merged LoRA export: on the CPU in the base's dtype, optional (lora.export_merged), live model untouched."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from flowalign.config import LoraConfig
from flowalign.models import load_flow_model
from flowalign.models.lora import has_lora
from flowalign.training.methods.dpo import FlowDPO, export_merged


def _method(model_dir, *, merged: bool = True) -> FlowDPO:
    model = load_flow_model(str(model_dir), torch_dtype=torch.bfloat16)
    method = FlowDPO(model, lora=LoraConfig(rank=4, alpha=8.0, export_merged=merged))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)  # a non-zero update to merge
    return method


def test_merge_on_cpu_in_bf16_rounds_once_and_keeps_the_live_adapters(tiny_model_dir, tmp_path):
    method = _method(tiny_model_dir("sd3"))
    net = method.model.transformer
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    export_merged(method.model, tmp_path / "final")
    assert has_lora(net) and all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    saved = load_file(next((tmp_path / "final" / "transformer").glob("*.safetensors")))
    assert not any("lora" in k for k in saved)
    layer = net.transformer_blocks[0].attn.to_q
    w = layer.base_layer.weight.double()
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    exact = w + (8.0 / 4) * b @ a  # W + (alpha / r) B A in fp64
    merged = saved["transformer_blocks.0.attn.to_q.weight"]
    assert merged.dtype == torch.bfloat16 and layer.base_layer.weight.dtype == torch.bfloat16
    # the fp32 delta is added to the bf16 base and rounded to bf16: at most one rounding of the sum
    # plus the fp32 delta's own rounding, each within eps_bf16 / 2 of its magnitude
    bound = torch.finfo(torch.bfloat16).eps * (w.abs() + (exact - w).abs())
    assert bool(((merged.double() - exact).abs() <= bound).all())
    assert float((merged.double() - w).abs().max()) > 0  # the update is really in there


def test_export_merged_false_writes_the_lora_file_only(tiny_model_dir, tmp_path):
    method = _method(tiny_model_dir("sd3"), merged=False)
    method.export(tmp_path / "final")
    files = sorted(
        p.relative_to(tmp_path / "final").as_posix() for p in (tmp_path / "final").rglob("*") if p.is_file()
    )
    assert files and all(f.startswith("lora/") for f in files)
    assert not (tmp_path / "final" / "model_index.json").exists()
