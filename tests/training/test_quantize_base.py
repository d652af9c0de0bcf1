"""``quantize_base``: a bitsandbytes-quantized frozen transformer under LoRA DPO/RWR.

diffusers' bitsandbytes loader quantizes on a CUDA GPU only ("No GPU found. A GPU is needed for
quantization." from its quantizer's environment check), so on the CPU the run refuses with one
error, tested here. bitsandbytes' own CPU kernels do run the quantized Linear layers, so the CPU
DPO test replaces the loader alone by the same layers built in place (every ``nn.Linear`` of the
transformer, as diffusers converts them): LoRA on bitsandbytes layers, the DPO steps, the reference
with adapters off and the saved adapters are then all exercised without a GPU. The same test
through diffusers' loader runs where a GPU is present.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from flowalign.config import LoraConfig, TrainConfig, load_config
from flowalign.models.quantize import is_quantized_weight
from flowalign.training.loop import train
from flowalign.training.runs import DPORun, RWRRun, prepare_dpo, run_rwr
from flowalign.workflows.pairs import PairsConfig, build_pairs

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes quantizes on a CUDA GPU")


def _dpo(model_dir, data, out, *, kind="int8", lora=True, export_merged=False, cpu=True) -> DPORun:
    return DPORun(
        model=str(model_dir),
        data=str(data),
        train=TrainConfig(
            output_dir=out,
            max_steps=2,
            batch_size=2,
            cpu=cpu,
            mixed_precision="bf16",
            trackers=[],
            log_every=1,
        ),
        lora=LoraConfig(rank=4, export_merged=export_merged) if lora else None,
        quantize_base=kind,
    )


def test_config_key_loads_and_rejects_unknown_kinds(tmp_path):
    base = ["model=m", "data=d"]
    assert load_config(DPORun, None, base).quantize_base is None
    assert load_config(DPORun, None, [*base, "quantize_base=nf4"]).quantize_base == "nf4"
    assert load_config(RWRRun, None, [*base, "quantize_base=int8"]).quantize_base == "int8"
    with pytest.raises(ValueError, match="quantize_base"):
        load_config(DPORun, None, [*base, "quantize_base=int4"])


def test_full_finetune_and_merged_export_are_refused_before_loading(tmp_path):
    missing = tmp_path / "no-such-model"  # nothing is read: the refusal comes first
    with pytest.raises(ValueError, match=r"quantize_base=int8 needs a LoRA run: a full fine-tune"):
        prepare_dpo(_dpo(missing, missing, tmp_path / "run", lora=False))
    with pytest.raises(ValueError, match=r"quantize_base=nf4 needs lora.export_merged=false"):
        prepare_dpo(_dpo(missing, missing, tmp_path / "run", kind="nf4", export_merged=True))
    rwr = RWRRun(model=str(missing), data=str(missing), lora=None, quantize_base="int8")
    with pytest.raises(ValueError, match=r"quantize_base=int8 needs a LoRA run"):
        run_rwr(rwr, progress=False)


def test_missing_bitsandbytes_names_the_extra(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import then raises ImportError
    run = _dpo(tiny_model_dir("sd3"), tmp_path / "pairs.jsonl", tmp_path / "run")
    with pytest.raises(ValueError, match=r"needs bitsandbytes: pip install 'flowalign\[bitsandbytes\]'"):
        prepare_dpo(run)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_cpu_device_is_refused_with_one_error(kind, tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    run = _dpo(tiny_model_dir("sd3"), tmp_path / "pairs.jsonl", tmp_path / "run", kind=kind)
    with pytest.raises(ValueError, match=rf"quantize_base={kind} needs a CUDA GPU with bitsandbytes; .* cpu"):
        prepare_dpo(run)


def test_toy_models_are_refused(tmp_path):
    run = _dpo("toy:image", tmp_path / "pairs.jsonl", tmp_path / "run")
    with pytest.raises(
        ValueError, match="quantize_base=int8 needs a hub id or model folder, not 'toy:image'"
    ):
        prepare_dpo(run)


@needs_cuda
@pytest.mark.parametrize("kind", ["int8", "nf4"])
def _bnb_linear(linear: nn.Linear, kind: str, dtype: torch.dtype) -> nn.Module:
    """bitsandbytes' layer for ``linear``, quantized when moved to its device (as diffusers does)."""
    import bitsandbytes as bnb

    weight, bias = linear.weight.data.to(dtype), linear.bias is not None
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias, compute_dtype=dtype, quant_type="nf4"
        )
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    if bias:
        layer.bias = nn.Parameter(linear.bias.data.to(dtype), requires_grad=False)
    return layer.to(linear.weight.device)


def _quantize_in_place(module: nn.Module, kind: str, dtype: torch.dtype) -> nn.Module:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, _bnb_linear(child, kind, dtype))
        else:
            _quantize_in_place(child, kind, dtype)
    return module


def _cpu_quantized_transformer(path, kind, *, compute_dtype, device):
    """The loader's result built on the CPU: the saved transformer with its Linear layers quantized."""
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(str(path), subfolder="transformer")
    return _quantize_in_place(transformer.to(device, compute_dtype), kind, compute_dtype)


def _brightness(media, prompts):
    return {"overall": media.flatten(1).float().mean(1)}


@pytest.fixture(scope="module")
def sd3_pairs(tiny_model_dir, tmp_path_factory):
    from flowalign.models import load_flow_model

    source = load_flow_model(tiny_model_dir("sd3"))
    source.default_height = source.default_width = 32
    out = tmp_path_factory.mktemp("pairs-quantize")
    config = PairsConfig(num_candidates=2, num_inference_steps=2)
    build_pairs(source, ["a red cat", "a blue dog"], _brightness, out, config, progress=False)
    return out / "pairs.jsonl"


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_two_lora_dpo_steps_on_a_cpu_quantized_base(kind, tiny_model_dir, sd3_pairs, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    import flowalign.training.runs as runs

    model_dir = tiny_model_dir("sd3")
    monkeypatch.setattr(runs, "load_quantized_transformer", _cpu_quantized_transformer)
    run = _dpo(model_dir, sd3_pairs, tmp_path / "run", kind=kind)
    cpu = torch.device("cpu")
    _check_two_steps(
        run, lambda: _cpu_quantized_transformer(model_dir, kind, compute_dtype=torch.bfloat16, device=cpu)
    )


@needs_cuda
@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_two_lora_dpo_steps_on_a_quantized_base(kind, tiny_model_dir, sd3_pairs, tmp_path):
    pytest.importorskip("bitsandbytes")
    from flowalign.models.quantize import load_quantized_transformer

    model_dir = tiny_model_dir("sd3")
    run = _dpo(model_dir, sd3_pairs, tmp_path / "run", kind=kind, cpu=False)
    gpu = torch.device("cuda")
    _check_two_steps(
        run, lambda: load_quantized_transformer(model_dir, kind, compute_dtype=torch.bfloat16, device=gpu)
    )


def _inputs(config, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(2, config.in_channels, 8, 8, generator=gen),
        "encoder_hidden_states": torch.randn(2, 7, config.joint_attention_dim, generator=gen),
        "pooled_projections": torch.randn(2, config.pooled_projection_dim, generator=gen),
    }
    inputs = {k: v.to(device, torch.bfloat16) for k, v in inputs.items()}
    return inputs | {"timestep": torch.tensor([100.0, 700.0], device=device)}


def _check_two_steps(run: DPORun, load_base) -> None:
    """Two LoRA DPO steps on the quantized base: quantized Linear weights, fp32 trainable adapters, a
    finite loss, saved fp32 adapters, and a reference (adapters off) equal to a fresh quantized base."""
    method, data = prepare_dpo(run)
    transformer = method.model.transformer
    linears = [m for m in transformer.modules() if type(m).__name__ in ("Linear8bitLt", "Linear4bit")]
    assert linears and all(is_quantized_weight(m.weight) for m in linears)
    plain = [n for n, m in transformer.named_modules() if type(m) is nn.Linear and ".lora_" not in n]
    assert not plain  # every Linear of the base is quantized; only the adapters' own are plain fp32
    lora = {n: p for n, p in transformer.named_parameters() if "lora_" in n}
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())
    assert not any(p.requires_grad for n, p in transformer.named_parameters() if "lora_" not in n)

    result = train(method, data, run.train, progress=False, run_config=run)
    assert result.step == 2 and result.nan_skipped == 0
    assert torch.isfinite(torch.tensor(result.metrics["loss"]))
    assert any(p.abs().max() > 0 for n, p in lora.items() if "lora_B" in n)  # the steps moved the adapters
    saved = load_file(Path(run.train.output_dir) / "final" / "lora" / "pytorch_lora_weights.safetensors")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())

    # the reference is the quantized base itself: same codes, same kernels, so the same output bits
    base = load_base().eval()
    inputs = _inputs(base.config, next(transformer.parameters()).device)
    with torch.no_grad():
        with method.reference.network(transformer) as reference:
            got = reference(**inputs).sample
        want = base(**inputs).sample
        adapted = transformer(**inputs).sample
    assert torch.equal(got, want)
    assert not torch.equal(adapted, want)  # the trained adapters are on again after the block
