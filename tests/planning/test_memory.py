"""The planner: exact parameter counts of the published configs, the arithmetic of each memory item,
its monotonicity, the suggested switches and the ``plan`` command's table and errors."""

from __future__ import annotations

import pytest

from flowalign.planning import activations as act
from flowalign.planning.architectures import (
    ARCHITECTURES,
    get_architecture,
    lora_param_count,
    param_count,
    shrunk,
)
from flowalign.planning.command import PRESETS, plan_main, recipe_from_yaml
from flowalign.planning.memory import Recipe, plan, suggest

# Published sizes (billions of parameters) rounded as the model cards and papers state them.
PUBLISHED = {
    "sd35m": 2.24, "sd35l": 8.06, "flux-dev": 11.90, "wan-1.3b": 1.42, "wan-14b": 14.29,
    "t5-xxl": 4.76, "umt5-xxl": 5.68, "clip-l": 0.12, "clip-g": 0.69,
}  # fmt: skip


# architectures whose block activations are modelled (the newer video families plan weights only)
MODELLED = [name for name, arch in ARCHITECTURES.items() if arch.family in ("sd3", "flux", "wan")]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_meta_built_parameter_counts_match_the_published_sizes(name: str) -> None:
    assert round(param_count(name) / 1e9, 2) == PUBLISHED[name]


def test_flux_schnell_differs_from_dev_by_the_guidance_embedder_only() -> None:
    # the guidance embedder is a 256 -> 3072 -> 3072 MLP: (256 + 1) * 3072 + (3072 + 1) * 3072
    assert param_count("flux-dev") - param_count("flux-schnell") == 257 * 3072 + 3073 * 3072


def test_lora_count_is_rank_times_in_plus_out_of_every_adapted_projection() -> None:
    # SD3.5-M: 24 blocks x 4 image projections (1536 -> 1536) + 13 dual attentions x 4 more
    arch = get_architecture("sd35m")
    assert lora_param_count(arch, 16, ("to_q", "to_k", "to_v", "to_out.0")) == 16 * 2 * 1536 * 4 * (24 + 13)


def test_unknown_model_is_one_value_error_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown model 'sd4'.*sd35m"):
        Recipe("sd4")


def test_token_geometry() -> None:
    sd3, flux, wan = (get_architecture(n) for n in ("sd35m", "flux-dev", "wan-14b"))
    assert sd3.image_tokens(1024, 1024) == 64 * 64
    assert flux.image_tokens(1024, 1024) == 64 * 64  # 2x2 latent packing
    assert wan.image_tokens(480, 832, 81) == 21 * 30 * 52  # 4x temporal, 8x spatial, 1x2x2 patch
    with pytest.raises(ValueError, match="multiples of 8"):
        sd3.image_tokens(1000, 1020)


def test_lora_dpo_resident_items_are_the_exact_products() -> None:
    r = Recipe("sd35m", device="cpu", vae="cached")
    p = plan(r)
    n, lora = param_count("sd35m"), lora_param_count("sd35m", 16, r.lora_targets)
    assert p.resident["frozen weights"] == 2 * n
    assert p.resident["trainable weights (fp32)"] == 4 * lora
    assert p.resident["gradients (fp32)"] == 4 * lora
    assert p.resident["optimizer (adamw)"] == 8 * lora
    assert "CUDA context reserve" not in p.resident


def test_checkpointing_lowers_activations() -> None:
    for name in MODELLED:
        arch = get_architecture(name)
        kw = dict(image_tokens=arch.image_tokens(512, 512), text_tokens=arch.text_tokens, samples=2)
        for rank in (16, None):
            full = act.transformer_activations(arch, lora_rank=rank, checkpointing=False, **kw)
            ckpt = act.transformer_activations(arch, lora_rank=rank, checkpointing=True, **kw)
            assert ckpt.saved < full.saved, (name, rank)


def test_activations_grow_with_resolution_and_pairs() -> None:
    a = plan(Recipe("sd35m", height=512, width=512)).phases["training step"]["activations"]
    b = plan(Recipe("sd35m")).phases["training step"]["activations"]
    c = plan(Recipe("sd35m", batch=2)).phases["training step"]["activations"]
    assert a < b < c


def test_more_gpus_lower_sharded_memory_and_leave_ddp_replicas() -> None:
    base = Recipe("flux-dev", lora_rank=None)
    plans = [plan(base.replace(num_gpus=g, strategy="fsdp")) for g in (2, 4, 8)]
    assert plans[0].step_peak > plans[1].step_peak > plans[2].step_peak
    assert plans[0].load_peak > plans[2].load_peak  # the networks reach each GPU as shards
    zero3 = [plan(base.replace(num_gpus=g, strategy="zero3")) for g in (2, 8)]
    assert zero3[0].load == zero3[1].load  # ZeRO-3: each process loads the whole model, then partitions
    z2 = [plan(base.replace(num_gpus=g, strategy="zero2")).resident["optimizer (adamw)"] for g in (2, 8)]
    assert z2[0] == 4 * z2[1]
    ddp = plan(base.replace(num_gpus=8, strategy="ddp"))
    assert ddp.resident["trainable weights (fp32)"] == 4 * param_count("flux-dev")


def test_lora_is_smaller_than_full_fine_tune() -> None:
    for name in MODELLED:
        assert plan(Recipe(name)).peak < plan(Recipe(name, lora_rank=None)).peak, name


def test_memory_savers_each_lower_the_peak() -> None:
    r = Recipe("flux-dev", gradient_checkpointing=False, text_encoders="device")
    peak = plan(r).peak
    for change in (
        {"gradient_checkpointing": True}, {"text_encoders": "cached"}, {"optimizer": "adamw8bit"},
        {"base_dtype": "int8"}, {"base_dtype": "nf4"}, {"cpu_offload": True}, {"lora_rank": 4},
    ):  # fmt: skip
        assert plan(r.replace(**change)).peak < peak, change


def test_suggest_returns_only_the_switches_needed() -> None:
    r = Recipe("flux-dev")
    switches, after = suggest(r, 24)
    assert after.fits(24) and not plan(r).fits(24)
    assert switches == ["8-bit frozen base (run config quantize_base: int8)"]
    assert suggest(Recipe("sd35m"), 24) == ([], plan(Recipe("sd35m")))


def test_issue_goals_for_the_presets() -> None:
    fits = {name: plan(r) for name, r in PRESETS.items()}
    assert fits["sd35m-lora-dpo"].fits(24)
    assert fits["flux-dev-lora-dpo"].fits(40)
    assert fits["flux-dev-lora-dpo-8bit"].fits(24)
    assert fits["wan-1.3b-lora-dpo"].fits(24)
    assert fits["wan-14b-lora-dpo"].fits(80)


def test_shrunk_keeps_the_dual_attention_layers_below_the_cut() -> None:
    s = shrunk(get_architecture("sd35m"), 4)
    assert s.transformer["dual_attention_layers"] == [0, 1, 2, 3]
    assert param_count(s) < param_count("sd35m")


def test_plan_command_prints_every_preset(capsys) -> None:
    assert plan_main(["all", "--gpu-memory", "24", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        assert f"\n{name} " in "\n" + out
    assert "flux-dev-lora-dpo at 24 GB: fits with 8-bit frozen base (run config quantize_base: int8)" in out


def test_plan_command_errors_are_one_line(capsys, tmp_path) -> None:
    assert plan_main(["nope"]) == 2
    assert capsys.readouterr().out.startswith("error: 'nope' is neither a preset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: someone/unknown-model\n")
    assert plan_main([str(bad)]) == 2
    assert capsys.readouterr().out.startswith(f"error: {bad}: model 'someone/unknown-model'")


def test_yaml_config_maps_to_a_recipe(tmp_path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "model: stabilityai/stable-diffusion-3.5-medium\n"
        "train: {batch_size: 2, gradient_checkpointing: true}\n"
        "dpo: {beta: 100.0}\nlora: {rank: 32}\n"
    )
    r = recipe_from_yaml(cfg)
    assert (r.arch.name, r.method, r.batch, r.lora_rank, r.gradient_checkpointing) == (
        "sd35m",
        "dpo",
        2,
        32,
        True,
    )
    (tmp_path / "local" / "transformer").mkdir(parents=True)
    import json

    (tmp_path / "local" / "transformer" / "config.json").write_text(
        json.dumps(ARCHITECTURES["wan-1.3b"].transformer)
    )
    cfg.write_text(f"model: {tmp_path / 'local'}\ntrain: {{batch_size: 1}}\n")
    assert recipe_from_yaml(cfg).arch.name == "wan-1.3b" and recipe_from_yaml(cfg).lora_rank is None
