"""Toy base recipes: stable cache keys, the video recipe's frozen pretrained text encoder and positions."""

import torch
from safetensors.torch import load_file
from transformers import CLIPTextModelWithProjection

from flowalign.experiments.toy_base import ToyBaseRecipe, default_recipe, toy_base_model
from flowalign.models.toy import ToyModel, ToyWanTransformer3DModel, build_toy_pipeline
from flowalign.toy.language import pretrain_on_captions
from flowalign.training.methods.sft import SFTConfig


def test_cache_keys_of_existing_recipes_do_not_change():
    # a changed key silently retrains every user's cached base model
    assert ToyBaseRecipe(kind="image", steps=900).key() == "toy-image-900-a86096a974"
    assert ToyBaseRecipe(kind="image").key() == default_recipe("image").key()
    video = default_recipe("video")
    assert video.key() != ToyBaseRecipe(kind="video", steps=3000).key()  # the text encoder source counts
    assert video.text_encoder_from == ToyBaseRecipe(kind="image", steps=900)  # the demo's image base
    assert video.sft.train_text_encoder is False
    assert video.absolute_positions is True
    assert video.language_pretraining_steps == 600
    without = ToyBaseRecipe(**{**video.__dict__, "absolute_positions": False})
    assert without.key() != video.key()  # the architecture counts


def _tiny_recipes(**video_fields) -> tuple[ToyBaseRecipe, ToyBaseRecipe]:
    """A 2-step image recipe and a 2-step video recipe reading its frozen text encoder."""
    tiny = dict(steps=2, batch_size=4, num_items=8, warmup_steps=1)
    image_recipe = ToyBaseRecipe(kind="image", **tiny)
    video_recipe = ToyBaseRecipe(
        kind="video",
        sft=SFTConfig(train_text_encoder=False),
        text_encoder_from=image_recipe,
        **video_fields,
        **tiny,
    )
    return image_recipe, video_recipe


def test_video_base_starts_from_the_image_text_encoder_and_keeps_it_frozen(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWALIGN_CACHE", str(tmp_path))
    image_recipe, video_recipe = _tiny_recipes(absolute_positions=True)
    video_dir = toy_base_model("video", recipe=video_recipe, progress=False)
    image_dir = tmp_path / image_recipe.key() / "model"
    assert (image_dir / "model_index.json").is_file()  # trained on the way
    image_te = load_file(str(image_dir / "text_encoder" / "model.safetensors"))
    video_te = load_file(str(video_dir / "text_encoder" / "model.safetensors"))
    assert image_te.keys() == video_te.keys()
    for name, weight in image_te.items():
        torch.testing.assert_close(video_te[name], weight, rtol=0, atol=0, msg=name)
    model = ToyModel.from_pretrained(video_dir)
    assert model.is_video
    assert type(model.transformer) is ToyWanTransformer3DModel
    initial = build_toy_pipeline("video", seed=video_recipe.seed).transformer.state_dict()
    trained = model.transformer.state_dict()
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)  # the transformer did train


def test_language_pretraining_runs_before_training_and_the_encoder_stays_frozen(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWALIGN_CACHE", str(tmp_path))
    image_recipe, video_recipe = _tiny_recipes(language_pretraining_steps=3)
    video_dir = toy_base_model("video", recipe=video_recipe, progress=False)
    expected = CLIPTextModelWithProjection.from_pretrained(
        tmp_path / image_recipe.key() / "model" / "text_encoder"
    )
    pretrain_on_captions(expected, ToyModel.from_pretrained(video_dir).pipe.tokenizer, steps=3, seed=0)
    saved = load_file(str(video_dir / "text_encoder" / "model.safetensors"))
    assert saved.keys() == expected.state_dict().keys()
    for name, weight in expected.state_dict().items():
        torch.testing.assert_close(saved[name], weight, rtol=0, atol=0, msg=name)
