"""The planner's load phase: staged runs hold the encoders alone while they build their caches (FSDP
runs then shard their networks from the CPU), other runs every component at once; the README table and the configs' memory notes are the planner's numbers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flowalign.planning.activations import BF16, FP32
from flowalign.planning.architectures import buffer_count, param_count, vae_param_count
from flowalign.planning.command import PRESETS, plan_main, recipe_from_yaml
from flowalign.planning.memory import CACHE_BATCH, CUDA_RESERVE, GIB, Recipe, _text_encode_peak, plan

ROOT = Path(__file__).resolve().parents[2]
ENCODERS = "text encoders (bf16)"


def _encoders(recipe: Recipe) -> float:
    return sum(param_count(k) for k in recipe.text_encoder_keys) * BF16


def test_staged_load_holds_the_encoders_and_the_vae_alone() -> None:
    r = Recipe("sd35l")
    assert r.staged
    p = plan(r)
    text_pass = _text_encode_peak(r.arch, r, CACHE_BATCH)
    assert p.load == {
        ENCODERS: _encoders(r),
        "VAE (bf16)": vae_param_count(r.arch) * BF16,
        "CUDA context reserve": CUDA_RESERVE,
        "text encode (cache batch)": text_pass,
    }
    assert p.load_phase == "load: prompt caching, staged"
    assert p.peak == p.step_peak > p.load_peak  # the step, not the load, is SD3.5-L's peak


@pytest.mark.parametrize(
    "recipe",
    [
        Recipe("sd35l", base_dtype="int8"),  # bitsandbytes quantizes on the way to the GPU
        Recipe("sd35l", strategy="zero2"),  # DeepSpeed prepares modules already on the device
        Recipe("flux-dev", lora_rank=None, num_gpus=8, strategy="zero3"),  # ZeRO-3 partitions on the GPU
        Recipe("sd35l", method="fdistill", strategy="zero2"),
        Recipe("sd35l", method="fdistill", num_gpus=8, strategy="fsdp"),  # one-step: one phase under FSDP
    ],
    ids=["int8", "zero2", "zero3-8-full", "fdistill-zero2", "fdistill-fsdp8"],
)
def test_one_phase_load_holds_every_component_unsharded(recipe: Recipe) -> None:
    assert not recipe.staged
    p = plan(recipe)
    staged_items = plan(recipe.replace(method="dpo", base_dtype="bf16", strategy="ddp", num_gpus=1)).load
    transformer = p.load["frozen weights"] + p.load["buffers (bf16 position tables)"]
    transformer += p.load["trainable weights (fp32)"]
    assert p.load_peak == pytest.approx(sum(staged_items.values()) + transformer, rel=1e-12)
    assert p.load_phase.endswith("every component on the device")
    assert p.load["buffers (bf16 position tables)"] == buffer_count(recipe.arch) * BF16
    if recipe.lora_rank is None:  # fp32 master weights and the bf16 reference, whole on each process
        assert p.load["trainable weights (fp32)"] == param_count(recipe.arch) * FP32
        assert p.load["frozen weights"] == param_count(recipe.arch) * BF16


def test_fsdp_load_caches_without_the_transformer_and_shards_it_from_the_cpu() -> None:
    """FSDP runs stage and shard on the CPU: FLUX.1-dev full fine-tune over 8 GPUs caches its prompts
    with the encoders alone (10.5 GiB, 77.0 GiB when every process loaded the whole model), so its
    step (32.0 GiB) is its peak. The sharding moment holds a shard per GPU of the fp32 policy and the
    bf16 reference plus one whole fp32 block; over 2 GPUs those shards make it the load's worst moment."""
    r = Recipe("flux-dev", lora_rank=None, num_gpus=8, strategy="fsdp")
    assert r.staged and Recipe("flux-dev", num_gpus=8, strategy="fsdp", text_encoders="device").staged
    p = plan(r)
    one_gpu = plan(r.replace(strategy="ddp", num_gpus=1))
    assert p.load == one_gpu.load and p.load_phase == "load: prompt caching, staged, sharded on the CPU"
    assert round(p.load_peak / GIB, 1) == 10.5 and p.peak == p.step_peak and round(p.peak / GIB, 1) == 32.0
    two = plan(r.replace(num_gpus=2))
    n = param_count(r.arch)
    blocks = r.arch.transformer["num_layers"] + r.arch.transformer["num_single_layers"]
    assert two.load_phase == "load: sharding, staged, sharded on the CPU"
    assert two.load == {
        "frozen weights (shard)": n * BF16 / 2,
        "buffers (bf16 position tables)": buffer_count(r.arch) * BF16,
        "trainable weights (fp32, shard)": n * FP32 / 2,
        "one unsharded block": n * FP32 / blocks,
        "VAE (bf16)": vae_param_count(r.arch) * BF16,
        "CUDA context reserve": CUDA_RESERVE,
    }


@pytest.mark.parametrize("fake_score", ["full", "lora"])
def test_one_step_runs_with_cached_prompts_load_in_stages(fake_score: str) -> None:
    """f-distill / DI* build their caches before the teacher, the generator and the fake score join the
    device: the load holds what a staged DPO run's does, and the three transformers only at the step."""
    r = Recipe("sd35m", method="fdistill", lora_rank=None, fake_score=fake_score)
    assert r.staged
    p = plan(r)
    assert p.load == plan(Recipe("sd35m")).load and p.load_phase == "load: prompt caching, staged"
    one_phase = plan(r.replace(strategy="zero2"))
    transformers = sum(one_phase.load[k] for k in ("frozen weights", "trainable weights (fp32)"))
    transformers += one_phase.load["buffers (bf16 position tables)"]
    assert one_phase.load_peak - p.load_peak == pytest.approx(transformers, rel=1e-12)
    assert not r.replace(text_encoders="device").staged


def test_load_numbers_of_the_issue() -> None:
    """SD3.5-L loaded in one phase needs 26.9 GiB, more than its 19.3 GiB step; staged it peaks at
    the step. FLUX.1-dev with an 8-bit base cannot be staged: its load (21.7 GiB) is its peak."""
    one_phase = plan(Recipe("sd35l", strategy="zero2"))
    assert round(one_phase.load_peak / GIB, 1) == 26.9
    assert round(plan(Recipe("sd35l")).peak / GIB, 1) == 19.3
    eight_bit = plan(PRESETS["flux-dev-lora-dpo-8bit"])
    assert eight_bit.peak == eight_bit.load_peak and round(eight_bit.peak / GIB, 1) == 21.7


def test_latent_caching_runs_after_the_encoders_left() -> None:
    r = Recipe("sd35m", vae="cached", drop_t5=True, height=2048, width=2048)
    p = plan(r)
    assert p.load_phase == "load: latent caching, staged" and ENCODERS not in p.load
    assert plan(r.replace(vae="device")).load_phase == "load: prompt caching, staged"


def test_plan_output_shows_the_load_phase(capsys) -> None:
    assert plan_main(["sd35m-lora-dpo", "--breakdown"]) == 0
    out = capsys.readouterr().out
    head, row = out.splitlines()[:2]
    assert head.split()[5:8] == ["staged", "load", "step"]
    p = plan(PRESETS["sd35m-lora-dpo"])
    assert row.split()[6:9] == ["yes", f"{p.load_peak / GIB:.1f}", f"{p.step_peak / GIB:.1f}"]
    assert "  load: prompt caching, staged\n" in out and "peak phase: load: prompt caching, staged" in out


def test_readme_table_is_the_plan_output() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| recipe (`flowalign plan all`)"))
    rows = lines[start + 2 : start + 2 + len(PRESETS)]
    assert len(rows) == len(PRESETS)
    for row, (name, recipe) in zip(rows, PRESETS.items(), strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        p = plan(recipe)
        load = f"{p.load_peak / GIB:.1f}" + (" (staged)" if recipe.staged else "")
        fits = ["yes" if p.fits(s) else "no" for s in (24, 40, 80)]
        assert cells[1:] == [load, f"{p.step_peak / GIB:.1f}", f"{p.peak / GIB:.1f}", *fits], name


@pytest.mark.parametrize("config", ["sd35m_dpo.yaml", "wan13b_dpo.yaml"])
def test_config_memory_notes_are_the_plan_output(config: str) -> None:
    path = ROOT / "configs" / config
    note = re.search(r"--breakdown`\): ([\d.]+) GiB per GPU", path.read_text())
    then = re.search(r"Training then needs ([\d.]+) GiB", path.read_text())
    assert note and then
    p = plan(recipe_from_yaml(path))
    assert (note[1], then[1]) == (f"{p.peak / GIB:.1f}", f"{p.step_peak / GIB:.1f}")
