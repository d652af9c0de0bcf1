"""The planner knows the published sizes of FLUX.2 (dev, klein 4B/9B), Qwen-Image and Z-Image and their
text encoders; it plans FLUX.2 and Qwen-Image (block activations in flowalign/planning/activations.py,
checked against autograd in test_activations.py) and refuses, with one clear line, to predict Z-Image's
activations (not modelled yet)."""

from __future__ import annotations

import pytest

from flowalign.planning.architectures import SIZED_ONLY, build, get_architecture, param_count
from flowalign.planning.command import plan_main, recipe_from_yaml
from flowalign.planning.memory import Recipe, plan

# Meta-built parameter counts (billions, 2 decimals) of the written-out configs; the model cards state
# 32B, 4B, 9B, 20B and 6B for the transformers and 4B, 8B, 7B (+ vision) and 24B for the encoders.
SIZES = {
    "flux2-dev": 32.22, "flux2-klein-4b": 3.88, "flux2-klein-9b": 9.08, "qwen-image": 20.43, "z-image": 6.15,
    "qwen3-4b": 4.02, "qwen3-8b": 8.19, "qwen2.5-vl-7b": 8.29, "mistral-small-3.1": 24.01,
    "qwen-image-edit": 20.43, "qwen-image-edit-plus": 20.43,  # Qwen-Image's transformer
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SIZES))
def test_meta_built_counts_match_the_published_sizes(name: str) -> None:
    assert round(param_count(name) / 1e9, 2) == SIZES[name]


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("flux2-dev", "Flux2Transformer2DModel"),
        ("qwen-image", "QwenImageTransformer2DModel"),
        ("z-image", "ZImageTransformer2DModel"),
    ],
)
def test_written_configs_equal_the_diffusers_defaults(name: str, cls: str) -> None:
    """These three are diffusers' class defaults: the same count as a default-constructed model."""
    assert param_count(name) == sum(p.numel() for p in build(cls, {}).parameters())


def test_token_geometry_of_the_new_families() -> None:
    # 1024 x 1024: 128 x 128 latents, 2 x 2 patches -> 4096 tokens; FLUX.2's latents have 32 channels
    for name in SIZED_ONLY:
        assert get_architecture(name).image_tokens(1024, 1024) == 4096
    assert get_architecture("flux2-dev").latent_shape(1024, 1024) == (32, 1, 128, 128)
    assert get_architecture("z-image").hidden == 3840


@pytest.mark.parametrize("name", ["flux2-dev", "qwen-image"])
def test_flux2_and_qwen_image_plan(name) -> None:
    small, large = (plan(Recipe(name, height=s, width=s)).phases["training step"] for s in (512, 1024))
    # 4x the image tokens (1024 -> 4096) with the 512 text tokens unchanged: more than 2x, under 4x
    assert 2 * small["activations"] < large["activations"] < 4 * small["activations"]


def test_z_image_plan_refuses_with_one_line(tmp_path, capsys) -> None:
    with pytest.raises(ValueError, match="activation memory of z-image blocks is not modelled yet"):
        plan(Recipe("z-image"))
    with pytest.raises(ValueError, match="qwen-image-edit-plus: the activation memory of the edit models"):
        plan(Recipe("qwen-image-edit-plus"))  # the condition image's tokens are not counted yet
    cfg = tmp_path / "z.yaml"
    cfg.write_text("model: Tongyi-MAI/Z-Image\ndpo: {}\nlora: {rank: 16}\n")
    assert recipe_from_yaml(cfg).model == "z-image"
    assert plan_main([str(cfg)]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("error: z-image: the activation memory of z-image")


def test_qwen_image_edit_hub_ids_and_encoder(tmp_path) -> None:
    """Qwen-Image-Edit-2509 (Plus) and the first Edit: Qwen-Image's transformer with Qwen2.5-VL-7B."""
    for hub_id, name in (
        ("Qwen/Qwen-Image-Edit-2509", "qwen-image-edit-plus"),
        ("Qwen/Qwen-Image-Edit", "qwen-image-edit"),
    ):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(f"model: {hub_id}\ndpo: {{}}\nlora: {{rank: 16}}\n")
        assert recipe_from_yaml(cfg).model == name
        arch = get_architecture(name)
        assert (
            arch.text_encoders == ("qwen2.5-vl-7b",)
            and arch.transformer == get_architecture("qwen-image").transformer
        )
