"""The noise-aware latent reward model: what it reads, save/load round trips, and refusals."""

from __future__ import annotations

import json

import pytest
import torch
from nrg_helpers import IMAGE_PROMPTS, VIDEO_PROMPTS, tiny_toy

from flowalign.config import LoraConfig
from flowalign.models import load_flow_model
from flowalign.models.lora import add_lora
from flowalign.rewards.latent import (
    CONFIG_NAME,
    LatentRewardLoadError,
    LatentRewardModel,
    LatentRewardSpec,
    supported_transformers,
)


def _inputs(model, prompts, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond, _ = model.encode_prompt(prompts)
    return torch.randn(len(prompts), *shape, generator=g), cond


def test_scores_depend_on_the_latent_the_time_and_the_prompt(toy_image):
    guide = LatentRewardModel.from_flow_model(
        toy_image, dimensions=("vq", "ta"), num_blocks=2, head_hidden=16
    )
    x, cond = _inputs(toy_image, IMAGE_PROMPTS, (3, 24, 24))
    t = torch.tensor([0.3, 0.3])
    with torch.no_grad():
        base = guide(x, t, cond)
        assert set(base) == {"vq", "ta"} and all(
            v.shape == (2,) and v.dtype == torch.float32 for v in base.values()
        )
        assert not torch.allclose(guide(x, torch.tensor([0.9, 0.9]), cond)["ta"], base["ta"])  # noise-aware
        other, _ = toy_image.encode_prompt(IMAGE_PROMPTS[::-1])
        assert not torch.allclose(guide(x, t, other)["ta"], base["ta"])  # prompt-aware
        assert not torch.allclose(guide(x + 0.5, t, cond)["vq"], base["vq"])
        # rows are independent: scoring one row alone gives its score in the batch
        alone = guide(x[:1], t[:1], cond.index(slice(0, 1)))
    torch.testing.assert_close(alone["vq"], base["vq"][:1], rtol=1e-5, atol=1e-6)


def test_the_trunk_is_a_copy_of_the_base_transformer_blocks(toy_image):
    guide = LatentRewardModel.from_flow_model(toy_image, dimensions=("ta",), num_blocks=1)
    src = toy_image.transformer.transformer_blocks[0].state_dict()
    copy = guide.trunk["blocks"][0].state_dict()
    assert src.keys() == copy.keys() and all(torch.equal(src[k], copy[k]) for k in src)
    with torch.no_grad():
        next(guide.trunk.parameters()).add_(1.0)
    assert not torch.equal(next(guide.trunk.parameters()), next(toy_image.transformer.parameters()))


@pytest.mark.parametrize("kind", ["image", "video"])
def test_save_and_load_round_trip(tmp_path, kind, toy_image, toy_video):
    model, prompts = (toy_image, IMAGE_PROMPTS) if kind == "image" else (toy_video, VIDEO_PROMPTS)
    dims = ("vq", "ta") if kind == "image" else ("vq", "mq", "ta")
    shape = (3, 24, 24) if kind == "image" else (3, 4, 24, 24)
    guide = LatentRewardModel.from_flow_model(model, dimensions=dims, num_blocks=2, head_hidden=16, seed=3)
    guide.set_normalisation({"vq": (0.5, 2.0), "ta": (-1.0, 0.25)})
    guide.spec.metadata["note"] = "round trip"
    guide.save_pretrained(tmp_path)
    loaded = LatentRewardModel.from_pretrained(tmp_path, model=model)
    without_model = LatentRewardModel.from_pretrained(tmp_path)
    x, cond = _inputs(model, prompts, shape)
    t = torch.tensor([0.2, 0.8])
    with torch.no_grad():
        expected = guide(x, t, cond)
        for other in (loaded, without_model):
            got = other(x, t, cond)
            assert all(torch.equal(got[d], expected[d]) for d in dims)
    assert loaded.dimensions == dims and loaded.family == "toy"
    assert loaded.normalisation == {**{d: (0.0, 1.0) for d in dims}, "vq": (0.5, 2.0), "ta": (-1.0, 0.25)}
    assert loaded.spec.metadata == {"note": "round trip"}
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


def test_lora_is_merged_on_save(tmp_path, toy_image):
    guide = LatentRewardModel.from_flow_model(toy_image, dimensions=("vq",), num_blocks=1, head_hidden=16)
    add_lora(guide.trunk, LoraConfig(rank=4, alpha=4.0, init="gaussian"))
    x, cond = _inputs(toy_image, IMAGE_PROMPTS, (3, 24, 24))
    t = torch.tensor([0.5, 0.5])
    guide.save_pretrained(tmp_path)
    loaded = LatentRewardModel.from_pretrained(tmp_path, model=toy_image)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, cond)["vq"], guide(x, t, cond)["vq"], rtol=1e-4, atol=1e-5)
    assert not any("lora" in k for k in loaded.state_dict())


def test_weighted_score_is_the_normalised_weighted_sum(toy_image):
    guide = LatentRewardModel.from_flow_model(
        toy_image, dimensions=("vq", "ta"), num_blocks=1, head_hidden=16
    )
    guide.set_normalisation({"vq": (1.0, 2.0), "ta": (-0.5, 4.0)})
    x, cond = _inputs(toy_image, IMAGE_PROMPTS, (3, 24, 24))
    t = torch.tensor([0.1, 0.6])
    with torch.no_grad():
        raw = guide(x, t, cond)
        total = guide.weighted(x, t, cond, {"vq": 0.3, "ta": -2.0})
    torch.testing.assert_close(total, 0.3 * (raw["vq"] - 1.0) / 2.0 - 2.0 * (raw["ta"] + 0.5) / 4.0)


def test_guide_of_another_family_or_architecture_is_refused(tmp_path, toy_image, toy_video, tiny_model_dir):
    sd3 = load_flow_model(tiny_model_dir("sd3"))
    sd3_guide = LatentRewardModel.from_flow_model(sd3, dimensions=("vq",), num_blocks=1, head_hidden=8)
    cond, _ = sd3.encode_prompt(["a red circle"])
    with torch.no_grad():
        assert sd3_guide(torch.randn(1, 16, 8, 8), torch.tensor([0.5]), cond)["vq"].shape == (1,)
    sd3_guide.save_pretrained(tmp_path / "sd3")
    with pytest.raises(LatentRewardLoadError, match="family 'sd3'.*family 'toy'"):
        LatentRewardModel.from_pretrained(tmp_path / "sd3", model=toy_image)
    LatentRewardModel.from_flow_model(toy_image, dimensions=("vq",), num_blocks=1).save_pretrained(
        tmp_path / "img"
    )
    with pytest.raises(LatentRewardLoadError, match="SD3Transformer2DModel trunk.*WanTransformer3DModel"):
        LatentRewardModel.from_pretrained(tmp_path / "img", model=toy_video)
    wider = tiny_toy("image", width=64)
    with pytest.raises(
        LatentRewardLoadError,
        match="config 'num_attention_heads' is 1 in the latent reward but 2 in the model",
    ):
        LatentRewardModel.from_pretrained(tmp_path / "img", model=wider)


def test_bad_folders_and_arguments_give_clear_errors(tmp_path, toy_image, tiny_model_dir):
    with pytest.raises(LatentRewardLoadError, match="no latent_reward.json"):
        LatentRewardModel.from_pretrained(tmp_path)
    guide = LatentRewardModel.from_flow_model(toy_image, dimensions=("vq",), num_blocks=1, head_hidden=8)
    guide.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "format": "something else"}))
    with pytest.raises(LatentRewardLoadError, match="'format' must be"):
        LatentRewardModel.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "head_hidden": 9}))
    with pytest.raises(LatentRewardLoadError, match="weights do not match"):
        LatentRewardModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"num_blocks must be in \[1, 2\]"):
        LatentRewardModel.from_flow_model(toy_image, dimensions=("vq",), num_blocks=3)
    with pytest.raises(ValueError, match="unique"):
        LatentRewardModel.from_flow_model(toy_image, dimensions=("vq", "vq"))
    with pytest.raises(ValueError, match="unknown dimension"):
        guide.set_normalisation({"mq": (0.0, 1.0)})
    with pytest.raises(ValueError, match="std > 0"):
        guide.set_normalisation({"vq": (0.0, 0.0)})
    unknown = LatentRewardSpec("toy", "UNetLikeModel", {}, 1, ("vq",))
    with pytest.raises(ValueError, match="no trunk for transformer class 'UNetLikeModel'; supported"):
        LatentRewardModel.from_spec(unknown)
    assert supported_transformers() == [
        "Flux2Transformer2DModel",
        "FluxTransformer2DModel",
        "HunyuanVideo15Transformer3DModel",
        "LTX2VideoTransformer3DModel",
        "QwenImageTransformer2DModel",
        "SD3Transformer2DModel",
        "WanTransformer3DModel",
        "ZImageTransformer2DModel",
    ]
