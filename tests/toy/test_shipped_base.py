"""The toy image base shipped with the package: what it holds, how it reaches the cache, and (slow) that
the default recipe trains it again."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from flowalign.experiments.toy_base import (
    SHIPPED_BASES,
    SHIPPED_FILES,
    ToyBaseRecipe,
    default_recipe,
    evaluate_toy,
    fetch_toy_base,
    shipped_toy_base,
    toy_base_model,
    train_toy_base,
)

SHIPPED = SHIPPED_BASES / "toy_base_image"


def test_shipped_base_is_the_default_image_recipe():
    meta = json.loads((SHIPPED / "recipe.json").read_text())
    assert meta["key"] == default_recipe("image").key() == ToyBaseRecipe().key()
    assert meta["recipe"]["steps"] == 1500
    assert shipped_toy_base(default_recipe("image")) == SHIPPED
    assert shipped_toy_base(ToyBaseRecipe(steps=900)) is None  # another recipe is trained, not substituted
    files = sorted(str(p.relative_to(SHIPPED)) for p in SHIPPED.rglob("*") if p.is_file())
    assert files == sorted([*SHIPPED_FILES, "recipe.json"])


def test_first_use_copies_the_shipped_base_into_the_cache(tmp_path, monkeypatch):
    from flowalign.models import load_flow_model

    monkeypatch.setenv("FLOWALIGN_CACHE", str(tmp_path))
    model_dir, source = fetch_toy_base("image")
    assert source == "shipped" and model_dir.parent.name == default_recipe("image").key()
    assert fetch_toy_base("image") == (model_dir, "cached")
    assert toy_base_model("image") == model_dir
    for name in SHIPPED_FILES:
        if name.endswith(".safetensors"):
            shipped, installed = load_file(SHIPPED / name), load_file(model_dir / name)
            assert shipped.keys() == installed.keys()
            for key, value in shipped.items():
                assert installed[key].dtype == torch.float32
                assert torch.equal(installed[key], value.float())
    model = load_flow_model(model_dir)  # every parameter comes from the shipped file
    weights = load_file(SHIPPED / "transformer" / "diffusion_pytorch_model.safetensors")
    for name, param in model.transformer.named_parameters():
        assert torch.equal(param.detach(), weights[name].float()), name


def test_a_corrupt_shipped_record_is_named(tmp_path, monkeypatch):
    from flowalign.experiments import toy_base

    folder = tmp_path / "toy_base_image"
    folder.mkdir()
    (folder / "recipe.json").write_text("{}")
    monkeypatch.setattr(toy_base, "SHIPPED_BASES", tmp_path)
    with pytest.raises(ValueError, match="recipe.json"):
        shipped_toy_base(default_recipe("image"))


@pytest.mark.slow
def test_the_default_recipe_trains_the_shipped_base_again(tmp_path):
    """Retrained from ToyBaseRecipe() (about 12 minutes on 2 cores), the base scores as the shipped one:
    the held-out means of text alignment and visual quality differ by less than two standard errors of
    the difference of two independent means, sqrt(se_a^2 + se_b^2)."""
    torch.set_num_threads(2)
    retrained = train_toy_base(default_recipe("image"), tmp_path / "retrained", progress=False)
    a, b = evaluate_toy(SHIPPED), evaluate_toy(retrained)
    for key in ("ta", "vq"):
        x, y = a.scores[key].double(), b.scores[key].double()
        se = math.sqrt(x.var() / x.numel() + y.var() / y.numel())
        assert abs(float(x.mean() - y.mean())) < 2 * se, (key, float(x.mean()), float(y.mean()), se)
