"""The multi-head reward model: shapes, the context design, files, registry and input errors."""

from __future__ import annotations

import json

import pytest
import torch

from flowalign.rewards import RewardInputError, load_reward
from flowalign.rewards.multihead import MultiHeadConfig, MultiHeadLoadError, MultiHeadRewardModel

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE_PROMPTS = ["a small red circle in the center", "a large blue square in the top left"] * 2
VIDEO_PROMPTS = [
    "a small red circle in the center moving left",
    "a large blue square in the top left staying still",
] * 2
TINY = {
    "embed_dim": 16,
    "vision": {
        "image_size": 24,
        "patch_size": 8,
        "width": 16,
        "layers": 1,
        "head_width": 8,
        "pool_type": "avg",
    },
    "text": {"context_length": 16, "width": 16, "heads": 2, "layers": 1},
    "hidden": 16,
}


def tiny_model(kind: str = "image", **overrides) -> MultiHeadRewardModel:
    dims = ["vq", "ta"] if kind == "image" else ["vq", "mq", "ta"]
    config = MultiHeadConfig(dimensions=dims, media_kind=kind, **{**TINY, **overrides})
    return MultiHeadRewardModel.build(config, seed=0).eval()


def media(kind: str, n: int = 4, seed: int = 0) -> torch.Tensor:
    shape = (n, 3, 24, 24) if kind == "image" else (n, 4, 3, 24, 24)
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["image", "video"])
def test_scores_one_float32_value_per_item_and_dimension(kind):
    model = tiny_model(kind)
    prompts = IMAGE_PROMPTS if kind == "image" else VIDEO_PROMPTS
    scores = model.score(media(kind), prompts)
    assert list(scores) == (["vq", "ta"] if kind == "image" else ["vq", "mq", "ta"])
    for value in scores.values():
        assert value.shape == (4,) and value.dtype == torch.float32 and torch.isfinite(value).all()
    # batched scoring equals one item at a time
    singles = [model.score(media(kind)[i : i + 1], prompts[i : i + 1], batch_size=1) for i in range(4)]
    for dim, value in scores.items():
        torch.testing.assert_close(value, torch.cat([s[dim] for s in singles]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_quality_heads_ignore_the_prompt_and_alignment_reads_it(kind):
    model = tiny_model(kind)
    x = media(kind)
    prompts = IMAGE_PROMPTS if kind == "image" else VIDEO_PROMPTS
    a = model.score(x, prompts)
    b = model.score(x, prompts[::-1])
    for dim in ("vq", "mq") if kind == "video" else ("vq",):
        assert torch.equal(a[dim], b[dim])
    assert not torch.allclose(a["ta"], b["ta"])


def test_motion_head_sees_frame_order():
    """Mean-pooling alone is blind to the order of frames; the temporal layer (frame differences) is not."""
    model = tiny_model("video")
    x = media("video")
    forward, backward = model.score(x, VIDEO_PROMPTS), model.score(x.flip(1), VIDEO_PROMPTS)
    assert not torch.allclose(forward["mq"], backward["mq"])


def test_differentiable_scores_reach_the_pixels():
    model = tiny_model()
    x = media("image").requires_grad_(True)
    scores = model.score(x, IMAGE_PROMPTS, differentiable=True)
    (scores["vq"].sum() + scores["ta"].sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not model.score(media("image"), IMAGE_PROMPTS)["vq"].requires_grad


def test_save_load_round_trip_gives_equal_scores(tmp_path):
    # frozen like the loaded copy: torch's attention takes another (fast) kernel when nothing needs grad
    model = tiny_model("video").requires_grad_(False)
    model.set_normalisation({"vq": (0.5, 2.0), "ta": (-1.0, 0.5)})
    model.save_pretrained(tmp_path / "rm")
    assert sorted(p.name for p in (tmp_path / "rm").iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer",
    ]
    loaded = MultiHeadRewardModel.from_pretrained(tmp_path / "rm")
    x = media("video")
    before, after = model.score(x, VIDEO_PROMPTS), loaded.score(x, VIDEO_PROMPTS)
    assert all(torch.equal(before[d], after[d]) for d in before)
    assert loaded.normalisation == {"vq": (0.5, 2.0), "ta": (-1.0, 0.5)}
    assert not any(p.requires_grad for p in loaded.parameters())
    via_registry = load_reward("multihead", path=tmp_path / "rm")
    assert torch.equal(via_registry.score(x, VIDEO_PROMPTS)["mq"], before["mq"])
    normalised = loaded.normalise(after)
    torch.testing.assert_close(normalised["vq"], (after["vq"] - 0.5) / 2.0)
    assert torch.equal(normalised["mq"], after["mq"])  # not calibrated: (0, 1)
    # saving again replaces the folder as a whole
    model.set_normalisation({"vq": (0.0, 1.0)})
    model.save_pretrained(tmp_path / "rm")
    assert MultiHeadRewardModel.from_pretrained(tmp_path / "rm").normalisation == {"vq": (0.0, 1.0)}
    assert [p.name for p in tmp_path.iterdir()] == ["rm"]  # no temporary folders left behind


def test_bf16_model_returns_float32_scores(tmp_path):
    tiny_model().save_pretrained(tmp_path / "rm")
    model = MultiHeadRewardModel.from_pretrained(tmp_path / "rm", dtype=torch.bfloat16)
    scores = model.score(media("image"), IMAGE_PROMPTS)
    assert model.dtype == torch.bfloat16 and scores["ta"].dtype == torch.float32


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(MultiHeadLoadError, match="config.json"):
        MultiHeadRewardModel.from_pretrained(tmp_path / "nothing")
    folder = tiny_model().save_pretrained(tmp_path / "rm")
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(MultiHeadLoadError, match="model.safetensors"):
        MultiHeadRewardModel.from_pretrained(folder)
    folder = tiny_model().save_pretrained(tmp_path / "rm2")
    (folder / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(MultiHeadLoadError, match="tokenizer.json"):
        MultiHeadRewardModel.from_pretrained(folder)
    folder = tiny_model().save_pretrained(tmp_path / "rm3")
    blob = json.loads((folder / "config.json").read_text())
    blob["config"]["hidden"] = 32
    (folder / "config.json").write_text(json.dumps(blob))
    with pytest.raises(MultiHeadLoadError, match="model.safetensors.*shape differs"):
        MultiHeadRewardModel.from_pretrained(folder)
    blob["format"] = "something else"
    (folder / "config.json").write_text(json.dumps(blob))
    with pytest.raises(MultiHeadLoadError, match="config.json.*format"):
        MultiHeadRewardModel.from_pretrained(folder)


def test_bad_inputs_are_refused_with_the_counts():
    model = tiny_model()
    with pytest.raises(RewardInputError, match="3 prompts for 4 media"):
        model.score(media("image"), IMAGE_PROMPTS[:3])
    with pytest.raises(RewardInputError, match="needs one prompt"):
        model.score(media("image"), None)
    with pytest.raises(RewardInputError, match="videos"):
        tiny_model("video").score(media("image"), IMAGE_PROMPTS)
    with pytest.raises(ValueError, match="normalisation"):
        model.set_normalisation({"vq": (0.0, 0.0)})
    with pytest.raises(ValueError, match="unknown dimension"):
        model.set_normalisation({"mq": (0.0, 1.0)})
    with pytest.raises(ValueError, match="text_dimensions"):
        MultiHeadConfig(dimensions=["vq"], media_kind="image").check()


def test_an_open_clip_architecture_by_name(tmp_path):
    """Both towers and the tokenizer from open_clip (a tiny architecture registered for the test)."""
    import open_clip

    arch = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    }
    (tmp_path / "flowalign-test-tiny-clip.json").write_text(json.dumps(arch))
    open_clip.add_model_config(tmp_path / "flowalign-test-tiny-clip.json")
    config = MultiHeadConfig(
        dimensions=["vq", "ta"], media_kind="image", open_clip_model="flowalign-test-tiny-clip", hidden=8
    )
    model = MultiHeadRewardModel.build(config).eval().requires_grad_(False)
    x = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(0))  # resized inside
    scores = model.score(x, IMAGE_PROMPTS[:2])
    model.save_pretrained(tmp_path / "rm")
    assert not (tmp_path / "rm" / "tokenizer").exists()
    loaded = MultiHeadRewardModel.from_pretrained(tmp_path / "rm")
    assert torch.equal(loaded.score(x, IMAGE_PROMPTS[:2])["ta"], scores["ta"])
    with pytest.raises(ValueError, match="not an open_clip architecture"):
        MultiHeadRewardModel.build(MultiHeadConfig(dimensions=["vq"], media_kind="image", text_dimensions=[],
                                                   open_clip_model="no-such-clip"))  # fmt: skip


def test_a_model_without_text_heads_needs_no_prompts_and_reports_its_unused_text_tower():
    config = MultiHeadConfig(dimensions=["vq"], media_kind="image", text_dimensions=[], **TINY)
    model = MultiHeadRewardModel.build(config).eval()
    assert not model.needs_prompts and set(model.score(media("image"))) == {"vq"}
    unused = {id(p) for p in model.unused_parameters()}
    assert unused and all(id(p) in unused for p in model.text_proj.parameters())
    assert not any(id(p) in unused for p in model.clip.visual.parameters())
    assert all(id(p) not in unused for p in tiny_model().text_proj.parameters())  # ta reads the prompt
