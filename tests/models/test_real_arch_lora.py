"""The published SD3.5-M/-L, FLUX.1-dev/-schnell and Wan2.1-1.3B/-14B transformers, shrunk with every
architectural switch kept, through the path a user takes: save -> load in bf16 -> generate -> two LoRA
DPO steps -> LoRA export -> diffusers' own pipeline loads the file with ``load_lora_weights`` and gives
our adapted model's output."""

from __future__ import annotations

import json
import re

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, WanPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from typer.testing import CliRunner

from flowalign.cli import app
from flowalign.config import LoraConfig, OptimConfig, TrainConfig
from flowalign.models import load_flow_model
from flowalign.models.flux import pack_2x2
from flowalign.models.lora import LORA_WEIGHT_NAME, adapters_disabled, add_lora, save_lora
from flowalign.pipelines import FlowPipeline
from flowalign.pipelines.generate_files import GenerationSettings, generate_files
from flowalign.planning.architectures import get_architecture
from flowalign.planning.shrink import DEPTH_KEYS, WIDTH_KEYS, save_shrunk_model, shrink_transformer
from flowalign.training.loop import train
from flowalign.training.runs import DPORun, prepare_dpo

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = ["sd35m", "sd35l", "flux-dev", "flux-schnell", "wan-1.3b", "wan-14b"]
PIPELINES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline, "wan": WanPipeline}
PROMPTS = ["a red cat", "a blue dog on the left"]
SEQ = 16  # text tokens of the T5 / UMT5 encoders (the pipelines' max_sequence_length)
FP32_EPS = 2.0**-23


def _size(name: str, side: int = 32) -> dict:
    return dict(height=side, width=side, num_frames=5 if get_architecture(name).family == "wan" else 1)


def _kwargs(name: str, side: int = 32) -> dict:
    """Size arguments of the family's diffusers pipeline (no num_frames for images)."""
    size = _size(name, side)
    if get_architecture(name).family != "wan":
        size.pop("num_frames")
    return size


def _make_pairs(name: str, model_dir, out, side: int = 32):
    """pairs.jsonl of two samples per prompt made by ``generate_files`` (``flowalign generate``) in bf16."""
    model = load_flow_model(model_dir, torch_dtype=torch.bfloat16)
    model.max_sequence_length = SEQ
    settings = GenerationSettings(
        num_inference_steps=2, guidance_scale=2.0, samples_per_prompt=2, **_size(name, side)
    )
    rows = generate_files(model, PROMPTS, out, settings, batch_size=4, progress=False)
    assert len(rows) == 4
    with open(out / "pairs.jsonl", "w") as f:
        for a, b in zip(rows[::2], rows[1::2], strict=True):
            row = {"prompt": a["prompt"], "path_A": a["file"], "path_B": b["file"], "label": "A"}
            f.write(json.dumps(row) + "\n")
    return out / "pairs.jsonl"


@pytest.fixture(scope="module")
def arch_dir(tmp_path_factory):
    """Factory: the saved pipeline folder of a shrunk published architecture (built once per module)."""
    made = {}

    def get(name: str):
        if name not in made:
            made[name] = save_shrunk_model(name, tmp_path_factory.mktemp(name))
        return made[name]

    return get


@pytest.fixture(scope="module")
def pairs_of(arch_dir, tmp_path_factory):
    """Factory: pairs.jsonl of two samples per prompt made by ``generate_files`` from the bf16 model."""
    made = {}

    def get(name: str):
        if name not in made:
            made[name] = _make_pairs(name, arch_dir(name), tmp_path_factory.mktemp(f"gen-{name}"))
        return made[name]

    return get


def _dpo(name, model_dir, data, out, *, precision: str, lr: float):
    run = DPORun(
        model=str(model_dir),
        data=str(data),
        train=TrainConfig(
            output_dir=out,
            max_steps=2,
            batch_size=2,
            cpu=True,
            mixed_precision=precision,
            trackers=[],
            log_every=1,
            optim=OptimConfig(lr=lr, weight_decay=0.0),
        ),
        lora=LoraConfig(rank=4, alpha=8.0, export_merged=False),  # alpha != rank: the scale must travel
    )
    method, dataset = prepare_dpo(run)
    method.model.max_sequence_length = SEQ
    result = train(method, dataset, run.train, progress=False, run_config=run)
    assert result.step == 2 and result.nan_skipped == 0
    lora_dir = out / "final" / "lora"
    assert (lora_dir / LORA_WEIGHT_NAME).is_file()
    return method.model, lora_dir


@pytest.mark.parametrize("name", ARCHS)
def test_shrunk_config_changes_only_sizes(name):
    arch = get_architecture(name)
    published, small = arch.transformer, shrink_transformer(name)
    assert set(small) == set(published)
    kept = {k for k in published if k not in DEPTH_KEYS + WIDTH_KEYS}
    assert kept and all(small[k] == published[k] for k in kept)
    assert small["num_attention_heads"] * small["attention_head_dim"] <= 64
    if arch.family == "sd3":
        assert small["qk_norm"] == "rms_norm"
        dual = small.get("dual_attention_layers")
        assert (dual is None) == (name == "sd35l")
        if dual is not None:  # SD3.5-M mixes MMDiT-X (dual attention) blocks and plain ones
            assert dual == [0] and small["num_layers"] == 2
    if arch.family == "flux":
        assert small["guidance_embeds"] is (name == "flux-dev")
        assert sum(small["axes_dims_rope"]) == small["attention_head_dim"]
    if arch.family == "wan":
        assert small["cross_attn_norm"] and small["qk_norm"] == "rms_norm_across_heads"
        ratio = published["ffn_dim"] / (published["num_attention_heads"] * published["attention_head_dim"])
        assert abs(small["ffn_dim"] / 32 - ratio) <= 0.5 / 32  # the published ffn ratio, rounded


def _check_bf16(name: str, model_dir, pairs, out, side: int = 32) -> None:
    """Two bf16 LoRA DPO steps; diffusers' pipeline in bf16 loads the export and samples finite latents."""
    family = get_architecture(name).family
    model, lora_dir = _dpo(name, model_dir, pairs, out, precision="bf16", lr=1e-3)
    assert model.compute_dtype == torch.bfloat16
    pipe = PIPELINES[family].from_pretrained(str(model_dir), torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora_dir)
    assert _adapted(pipe.transformer) == _adapted(model.transformer)
    result = pipe(
        PROMPTS[0],
        num_inference_steps=2,
        output_type="latent",
        max_sequence_length=SEQ,
        **_kwargs(name, side),
    )
    assert torch.isfinite(_latents(result).float()).all()


def test_shrink_refuses_sizes_the_architecture_cannot_take():
    with pytest.raises(ValueError, match=r"scales the rotary axes \[16, 56, 56\] to \[3, 10, 10\]"):
        shrink_transformer("flux-dev", head_dim=24)  # each rotary axis must stay even
    with pytest.raises(ValueError, match="unknown model 'sd4'"):
        shrink_transformer("sd4")
    with pytest.raises(ValueError, match="must be >= 1"):
        shrink_transformer("wan-1.3b", layers=0)
    assert shrink_transformer("sd35m", layers=4)["dual_attention_layers"] == [0, 1]  # 13 of 24 -> 2 of 4
    assert shrink_transformer("sd35m", layers=24)["dual_attention_layers"] == list(range(13))


@pytest.mark.parametrize("name", ARCHS)
def test_bf16_generate_dpo_export_and_diffusers_loads_the_lora(name, arch_dir, pairs_of, tmp_path):
    _check_bf16(name, arch_dir(name), pairs_of(name), tmp_path / "run")


def _latents(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else getattr(out, "images", getattr(out, "frames", None))


def _sampling_bound(model, steps: int, v_max: float, x_max: float) -> float:
    """Largest difference between two fp32 Euler samplers that differ only in rounding order.

    Each step computes x + dt v: the product and the sum each round by a relative eps32 (2 eps32 |x|
    with |dt| <= 1), and a time grid or timestep rounded differently, or a rounding carried in from the
    last step, reaches the velocity through the transformer, where (as in tests/models/test_bf16.py) each
    of its L parameterised layers rounds its output once more and its weights are exact: at most
    (2L + 2) eps32 |v| for networks of near-isometric random layers. Summed over the steps.
    """
    layers = sum(isinstance(m, nn.Linear | nn.Conv2d | nn.Conv3d) for m in model.transformer.modules())
    return steps * ((2 * layers + 2) * v_max + 2 * x_max) * FP32_EPS


def _check_fp32(name: str, model_dir, pairs, out, side: int = 32) -> None:
    """Two fp32 DPO steps, export, ``load_lora_weights`` into diffusers' pipeline: the same transformer
    output bit for bit (the same peft layers with the same fp32 weights and scale alpha / r, run by the same
    kernels; a wrong key, scale or missing module shows as the LoRA's whole effect), and the same samples up
    to :func:`_sampling_bound` (diffusers' scheduler and our sampler round in different orders)."""
    family = get_architecture(name).family
    model, lora_dir = _dpo(name, model_dir, pairs, out, precision="no", lr=1e-2)
    pipe = PIPELINES[family].from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora_dir)
    x = model.prepare_noise(2, generator=torch.Generator().manual_seed(0), **_size(name, side))
    t = torch.tensor([0.8, 0.3])
    with torch.no_grad():
        cond, _ = model.encode_prompt(PROMPTS)
        ours = model.velocity(x, t, cond)
        theirs = model.velocity(x, t, cond, net=pipe.transformer)
        with adapters_disabled(model.transformer):
            base = model.velocity(x, t, cond)
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()
    assert (ours - base).abs().max() > 1e-3  # the two steps moved the adapters
    if (
        family == "wan"
    ):  # `flowalign lora-comfyui` (original Wan key layout (original Wan key layout, alpha / r folded into B) too:
        # alpha / r = 2 scales exactly in binary floating point, so (x A)(2 B) rounds as 2 ((x A) B)
        comfy = out / "comfyui.safetensors"
        result = CliRunner().invoke(app, ["lora-comfyui", str(lora_dir), "--out", str(comfy)])
        assert result.exit_code == 0 and comfy.is_file(), result.output
        other = WanPipeline.from_pretrained(str(model_dir))
        other.load_lora_weights(str(comfy.parent), weight_name=comfy.name)
        with torch.no_grad():
            assert torch.equal(model.velocity(x, t, cond, net=other.transformer), ours)

    settings = dict(num_inference_steps=2, guidance_scale=2.0, **_kwargs(name, side))
    ref = _latents(
        pipe(
            PROMPTS,
            output_type="latent",
            max_sequence_length=SEQ,
            generator=torch.Generator().manual_seed(7),
            **settings,
        )
    )
    sample = FlowPipeline(model)
    mine = sample(PROMPTS, generator=torch.Generator().manual_seed(7), **settings).latents
    with adapters_disabled(model.transformer):
        mine_base = sample(PROMPTS, generator=torch.Generator().manual_seed(7), **settings).latents
    if family == "flux":  # FluxPipeline returns packed latents
        mine, mine_base = pack_2x2(mine), pack_2x2(mine_base)
    bound = _sampling_bound(
        model, 2, ours.abs().max().item(), max(x.abs().max().item(), mine.abs().max().item())
    )
    diff, effect = (mine - ref).abs().max().item(), (mine - mine_base).abs().max().item()
    print(f"{name}: sample diff {diff:.3g}, bound {bound:.3g}, LoRA effect {effect:.3g}")
    assert diff <= bound < effect / 10, (diff, bound, effect)


@pytest.mark.parametrize("name", ARCHS)
def test_fp32_lora_export_gives_diffusers_our_output(name, arch_dir, pairs_of, tmp_path):
    _check_fp32(name, arch_dir(name), pairs_of(name), tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("name", ARCHS)
def test_wider_deeper_shrink_through_the_whole_path(name, tmp_path):
    """The fuller version: 4 blocks (and 4 FLUX single blocks) of 4 heads, 64x64 (Wan 5 x 64 x 64)."""
    model_dir = save_shrunk_model(name, tmp_path / "model", layers=4, single_layers=4, heads=4)
    pairs = _make_pairs(name, model_dir, tmp_path / "gen", side=64)
    _check_bf16(name, model_dir, pairs, tmp_path / "bf16", side=64)
    _check_fp32(name, model_dir, pairs, tmp_path / "fp32", side=64)


def _linear_names(net: nn.Module) -> list[str]:
    """Every Linear layer's name inside its block (``attn.to_q``) or at the top (``proj_out``)."""
    return sorted({re.sub(r"^.*?\.\d+\.", "", n) for n, m in net.named_modules() if isinstance(m, nn.Linear)})


def _adapted(net: nn.Module) -> set[str]:
    return {n for n, m in net.named_modules() if isinstance(m, BaseTunerLayer)}


@pytest.mark.parametrize("name", ARCHS)
def test_lora_on_every_linear_layer_round_trips_through_load_lora_weights(name, arch_dir, tmp_path):
    """LoRA on every Linear of the transformer (embedders, modulation, FFNs, context projections, the
    guidance embedder of FLUX.1-dev): diffusers adapts exactly the same modules and gives the same output
    bit for bit (the argument of the fp32 test above)."""
    model = load_flow_model(arch_dir(name))
    model.max_sequence_length = SEQ
    linears = {n for n, m in model.transformer.named_modules() if isinstance(m, nn.Linear)}
    add_lora(
        model.transformer, LoraConfig(rank=4, alpha=2.0, target_modules=_linear_names(model.transformer))
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    save_lora(model.transformer, tmp_path)
    pipe = PIPELINES[get_architecture(name).family].from_pretrained(str(arch_dir(name)))
    pipe.load_lora_weights(tmp_path)
    ours = _adapted(model.transformer)
    assert ours == _adapted(pipe.transformer)
    assert ours == linears  # every Linear layer, none missed
    x = model.prepare_noise(2, generator=torch.Generator().manual_seed(0), **_size(name))
    t = torch.tensor([0.8, 0.3])
    with torch.no_grad():
        cond, _ = model.encode_prompt(PROMPTS)
        ours_v = model.velocity(x, t, cond)
        theirs = model.velocity(x, t, cond, net=pipe.transformer)
        with adapters_disabled(model.transformer):
            base = model.velocity(x, t, cond)
    assert torch.equal(ours_v, theirs), (ours_v - theirs).abs().max()
    assert (ours_v - base).abs().max() > 1e-2
