"""ImageReward: a tiny checkpoint in the published key layout, loaded through ``load_reward``, against a
reference forward written here with plain torch ops on the ORIGINAL key names (BLIP's timm ViT and
med.py BERT with cross-attention, as in the ``image-reward`` package) and the published torchvision
PIL transform.

Tolerances: the network given the same pixels matches the reference to float32 rounding (1e-5).
From PIL's uint8 resize instead of our float resize, the pixels differ by at most 1.5 uint8 levels
(test_preprocess.py) and the scores of this tiny model (spread 0.13-0.77 across images) by at most
5.4e-3, measured over 3 weight seeds and 4 image sizes; we assert 1e-2.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from flowalign.rewards import RewardInputError, load_reward
from flowalign.rewards.imagereward import (
    IMAGEREWARD_MEAN,
    IMAGEREWARD_STD,
    convert_imagereward_state_dict,
    to_published_key,
)
from flowalign.rewards.preprocess import preprocess_images

PROMPTS = ["a red circle", "a blue square on grass", "a red circle", "two green triangles"]
WORDS = ["a", "red", "circle", "blue", "square", "on", "grass", "two", "green", "tri", "##angle", "##s"]
BASE_VOCAB = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
# Tiny sizes: ViT width 128 (2 heads of 64, the published head width), 32 px, 8 px patches; BERT width 32.
VIT = {"width": 128, "depth": 2, "heads": 2, "mlp": 256, "patch": 8, "size": 32}
MED = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 40,
    "model_type": "bert",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": len(BASE_VOCAB) + 2,  # + [DEC], [ENC]
    "encoder_width": 768,  # overridden by the ViT width, as BLIP does
    "add_cross_attention": True,
}
MLP_DIMS = [(1024, 32), (128, 1024), (64, 128), (16, 64), (1, 16)]  # published head, input = BERT width


def _published_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """Random weights under ImageReward.pt's key names and shapes (built without our classes)."""
    g = torch.Generator().manual_seed(seed)

    def lin(out_f: int, in_f: int, name: str, sd: dict) -> None:
        sd[f"{name}.weight"] = torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)
        sd[f"{name}.bias"] = 0.1 * torch.randn(out_f, generator=g)

    def norm(dim: int, name: str, sd: dict) -> None:
        sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
        sd[f"{name}.bias"] = 0.1 * torch.randn(dim, generator=g)

    sd: dict[str, torch.Tensor] = {}
    w, p = VIT["width"], VIT["patch"]
    v = "blip.visual_encoder."
    sd[v + "cls_token"] = torch.randn(1, 1, w, generator=g)
    sd[v + "pos_embed"] = 0.5 * torch.randn(1, (VIT["size"] // p) ** 2 + 1, w, generator=g)
    sd[v + "patch_embed.proj.weight"] = torch.randn(w, 3, p, p, generator=g) / math.sqrt(3 * p * p)
    sd[v + "patch_embed.proj.bias"] = 0.1 * torch.randn(w, generator=g)
    for i in range(VIT["depth"]):
        b = f"{v}blocks.{i}."
        norm(w, b + "norm1", sd)
        lin(3 * w, w, b + "attn.qkv", sd)
        lin(w, w, b + "attn.proj", sd)
        norm(w, b + "norm2", sd)
        lin(VIT["mlp"], w, b + "mlp.fc1", sd)
        lin(w, VIT["mlp"], b + "mlp.fc2", sd)
    norm(w, v + "norm", sd)
    d, t = MED["hidden_size"], "blip.text_encoder."
    sd[t + "embeddings.word_embeddings.weight"] = torch.randn(MED["vocab_size"], d, generator=g)
    sd[t + "embeddings.position_embeddings.weight"] = torch.randn(
        MED["max_position_embeddings"], d, generator=g
    )
    sd[t + "embeddings.position_ids"] = torch.arange(MED["max_position_embeddings"])[None]
    norm(d, t + "embeddings.LayerNorm", sd)
    for i in range(MED["num_hidden_layers"]):
        b = f"{t}encoder.layer.{i}."
        for part, kv_in in (("attention", d), ("crossattention", w)):
            lin(d, d, f"{b}{part}.self.query", sd)
            lin(d, kv_in, f"{b}{part}.self.key", sd)
            lin(d, kv_in, f"{b}{part}.self.value", sd)
            lin(d, d, f"{b}{part}.output.dense", sd)
            norm(d, f"{b}{part}.output.LayerNorm", sd)
        lin(MED["intermediate_size"], d, b + "intermediate.dense", sd)
        lin(d, MED["intermediate_size"], b + "output.dense", sd)
        norm(d, b + "output.LayerNorm", sd)
    lin(8, w, "blip.vision_proj", sd)  # unused by the reward, present in the checkpoint
    lin(8, d, "blip.text_proj", sd)
    for layer, (out_f, in_f) in zip((0, 2, 4, 6, 7), MLP_DIMS, strict=True):
        lin(out_f, in_f, f"mlp.layers.{layer}", sd)
    return sd


def _write_folder(folder, state: dict[str, torch.Tensor], name: str = "ImageReward.pt"):
    folder.mkdir(parents=True, exist_ok=True)
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / name))
    else:
        torch.save(state, folder / name)
    (folder / "med_config.json").write_text(json.dumps(MED))
    (folder / "vocab.txt").write_text("\n".join(BASE_VOCAB) + "\n")
    return folder


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    state = _published_state_dict(seed=0)
    return _write_folder(tmp_path_factory.mktemp("imagereward"), state), state


@pytest.fixture(scope="module")
def reward(published):
    return load_reward("imagereward", path=published[0])


# ------------------------------------------------------------------- reference (published layout)


def _reference_tokens(folder, prompts):
    """init_tokenizer() + tokenizer(prompt, padding='max_length', truncation=True, max_length=35)."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(folder))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    enc = tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _attend(q, k, v, heads, mask=None):
    n, lq, d = q.shape
    split = lambda x: x.reshape(n, x.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None:
        scores = scores + mask
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(n, lq, d)


def _ref_vit(sd, pixels):
    """BLIP VisionTransformer.forward: patchify, cls + pos, pre-norm blocks (eps 1e-6), final norm."""
    v, w = "blip.visual_encoder.", VIT["width"]
    ln = lambda x, name: F.layer_norm(x, (w,), sd[name + ".weight"], sd[name + ".bias"], 1e-6)  # noqa: E731
    lin = lambda x, name: F.linear(x, sd[name + ".weight"], sd[name + ".bias"])  # noqa: E731
    x = F.conv2d(
        pixels, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=VIT["patch"]
    )
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[v + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd[v + "pos_embed"]
    for i in range(VIT["depth"]):
        b = f"{v}blocks.{i}."
        q, k, val = lin(ln(x, b + "norm1"), b + "attn.qkv").chunk(3, dim=-1)
        x = x + lin(_attend(q, k, val, VIT["heads"]), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2")
    return ln(x, v + "norm")


def _ref_text_cls(sd, ids, mask, image_embeds):
    """med.py BertModel(mode='multimodal'): self-attn, cross-attn to all image tokens, FFN; post-norm."""
    t, d, eps = "blip.text_encoder.", MED["hidden_size"], MED["layer_norm_eps"]
    ln = lambda x, name: F.layer_norm(x, (d,), sd[name + ".weight"], sd[name + ".bias"], eps)  # noqa: E731
    lin = lambda x, name: F.linear(x, sd[name + ".weight"], sd[name + ".bias"])  # noqa: E731
    positions = sd[t + "embeddings.position_ids"][:, : ids.shape[1]]
    h = (
        sd[t + "embeddings.word_embeddings.weight"][ids]
        + sd[t + "embeddings.position_embeddings.weight"][positions]
    )
    h = ln(h, t + "embeddings.LayerNorm")
    ext = (1.0 - mask[:, None, None, :].float()) * -10000.0  # get_extended_attention_mask
    for i in range(MED["num_hidden_layers"]):
        b = f"{t}encoder.layer.{i}."
        for part, source, m in (("attention", None, ext), ("crossattention", image_embeds, None)):
            kv = h if source is None else source
            q, k, val = (lin(x, f"{b}{part}.self.{n}") for x, n in ((h, "query"), (kv, "key"), (kv, "value")))
            ctx = _attend(q, k, val, MED["num_attention_heads"], m)
            h = ln(lin(ctx, f"{b}{part}.output.dense") + h, f"{b}{part}.output.LayerNorm")
        ffn = lin(F.gelu(lin(h, b + "intermediate.dense")), b + "output.dense")
        h = ln(ffn + h, b + "output.LayerNorm")
    return h[:, 0]


def _ref_mlp(sd, x):
    for layer in (0, 2, 4, 6, 7):  # dropout between, no activations
        x = F.linear(x, sd[f"mlp.layers.{layer}.weight"], sd[f"mlp.layers.{layer}.bias"])
    return x[:, 0]


def _reference_scores(folder, sd, pixels, prompts):
    ids, mask = _reference_tokens(folder, prompts)
    with torch.no_grad():
        raw = _ref_mlp(sd, _ref_text_cls(sd, ids, mask, _ref_vit(sd, pixels)).float())
    return (raw - 0.16717362830052426) / 1.0333394966054072


def _published_transform(size):
    """ImageReward's _transform(n_px): Resize(bicubic) -> CenterCrop -> RGB -> ToTensor -> Normalize."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    return Compose(
        [
            Resize(size, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(size),
            lambda im: im.convert("RGB"),
            ToTensor(),
            Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )


def _uint8_images(n=4, h=40, w=52, seed=1):
    g = torch.Generator().manual_seed(seed)
    u8 = (torch.rand(n, 3, h, w, generator=g) * 255).round().to(torch.uint8)
    return u8.float() / 255, [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in u8]


# ---------------------------------------------------------------------------------------- tests


def test_key_mapping_covers_the_model_and_round_trips(published, reward):
    _, state = published
    converted = convert_imagereward_state_dict(state)
    assert set(converted) == set(reward.state_dict())
    for key in converted:
        published_key = to_published_key(key)
        assert published_key in state and state[published_key] is converted[key]
    assert to_published_key("blip.visual_encoder.encoder.layers.1.self_attn.projection.bias") == (
        "blip.visual_encoder.blocks.1.attn.proj.bias"
    )
    # LayerNorm eps: 1e-6 in BLIP's ViT, med_config's 1e-12 in the BERT (too small to show in scores).
    vit_eps = {m.eps for m in reward.blip.visual_encoder.modules() if isinstance(m, torch.nn.LayerNorm)}
    bert_eps = {m.eps for m in reward.blip.text_encoder.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert (vit_eps, bert_eps) == ({1e-6}, {1e-12})
    dropped = set(state) - {to_published_key(k) for k in converted}
    assert dropped == {
        "blip.vision_proj.weight",
        "blip.vision_proj.bias",
        "blip.text_proj.weight",
        "blip.text_proj.bias",
        "blip.text_encoder.embeddings.position_ids",
    }


def test_matches_reference_forward_on_the_same_pixels(published, reward):
    folder, state = published
    x, _ = _uint8_images()
    pixels = preprocess_images(x, reward.preprocess)
    ref = _reference_scores(folder, state, pixels, PROMPTS)
    ours = reward.score(x, PROMPTS)["imagereward"]
    assert ours.shape == (4,) and ours.dtype == torch.float32
    assert float(ref.std()) > 0.05, "the tiny model should separate the images"
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_matches_reference_with_published_pil_preprocessing(published, reward):
    folder, state = published
    x, pils = _uint8_images(h=45, w=37, seed=3)  # upscaled and cropped along the height
    pixels = torch.stack([_published_transform(32)(im) for im in pils])
    ref = _reference_scores(folder, state, pixels, PROMPTS)
    ours_pixels = preprocess_images(x, reward.preprocess)
    assert ours_pixels.shape == pixels.shape == (4, 3, 32, 32)
    assert float((ours_pixels - pixels).abs().max()) <= 1.5 / 255 / 0.26130258
    torch.testing.assert_close(reward.score(x, PROMPTS)["imagereward"], ref, atol=1e-2, rtol=0)


def test_tokens_keep_cls_first_pad_to_35_and_are_cached(published, reward):
    folder, _ = published
    reward.clear_text_cache()
    misses, hits = reward.text_cache.misses, reward.text_cache.hits
    ids, mask = reward.tokens(PROMPTS)
    ref_ids, ref_mask = _reference_tokens(folder, PROMPTS)
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)
    assert ids.shape == (4, 35) and (ids[:, 0] == BASE_VOCAB.index("[CLS]")).all()  # not [ENC]
    assert reward.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [
        len(BASE_VOCAB),
        len(BASE_VOCAB) + 1,
    ]
    assert len(reward.text_cache) == 3  # one entry per distinct prompt
    assert (reward.text_cache.misses - misses, reward.text_cache.hits - hits) == (3, 1)
    long_ids, long_mask = reward.tokens([" ".join(["red"] * 50)])
    assert long_mask.sum() == 35 and long_ids[0, -1] == BASE_VOCAB.index("[SEP]")


def test_deterministic_batch_invariant_and_frames_averaged(reward):
    x, _ = _uint8_images()
    one = reward.score(x, PROMPTS, batch_size=1)["imagereward"]
    torch.testing.assert_close(reward.score(x, PROMPTS, batch_size=4)["imagereward"], one, atol=1e-5, rtol=0)
    assert torch.equal(reward.score(x, PROMPTS)["imagereward"], reward.score(x, PROMPTS)["imagereward"])
    video = x[None].expand(2, -1, -1, -1, -1)  # [2, T=4, 3, H, W]
    clip_scores = reward.score(video, ["a red circle", "two green triangles"])["imagereward"]
    per_frame = reward.score(x, ["a red circle"] * 4)["imagereward"]
    torch.testing.assert_close(clip_scores[0], per_frame.mean(), atol=1e-5, rtol=0)


def test_normalisation_uses_the_published_constants(tmp_path):
    assert (IMAGEREWARD_MEAN, IMAGEREWARD_STD) == (0.16717362830052426, 1.0333394966054072)
    state = _published_state_dict(seed=1)
    for layer in (0, 2, 4, 6, 7):  # head = a constant: raw score 0.75 whatever the input
        state[f"mlp.layers.{layer}.weight"].zero_()
        state[f"mlp.layers.{layer}.bias"].zero_()
    state["mlp.layers.7.bias"].fill_(0.75)
    model = load_reward("imagereward", path=_write_folder(tmp_path / "const", state))
    out = model.score(_uint8_images(n=2)[0], PROMPTS[:2])["imagereward"]
    expected = (0.75 - 0.16717362830052426) / 1.0333394966054072
    torch.testing.assert_close(out, torch.full((2,), expected), atol=1e-7, rtol=0)


def test_checkpoint_file_and_safetensors_give_the_same_scores(published, reward, tmp_path):
    folder, state = published
    x, _ = _uint8_images(n=2)
    expected = reward.score(x, PROMPTS[:2])["imagereward"]
    from_file = load_reward("imagereward", path=folder / "ImageReward.pt").score(x, PROMPTS[:2])
    st_folder = _write_folder(tmp_path / "st", state, name="ImageReward.safetensors")
    from_st = load_reward("imagereward", path=st_folder).score(x, PROMPTS[:2])
    torch.testing.assert_close(from_file["imagereward"], expected)
    torch.testing.assert_close(from_st["imagereward"], expected)


def test_gradient_reaches_pixels_and_matches_finite_difference(reward):
    x = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(5)) * 0.8 + 0.1
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    xg = x.clone().requires_grad_(True)
    reward.score(xg, PROMPTS[:1], differentiable=True)["imagereward"].sum().backward()
    eps = 1e-3
    plus = reward.score(x + eps * direction, PROMPTS[:1])["imagereward"]
    minus = reward.score(x - eps * direction, PROMPTS[:1])["imagereward"]
    numeric = float((plus - minus) / (2 * eps))
    analytic = float((xg.grad * direction).sum())
    assert abs(analytic) > 1e-3
    assert abs(numeric - analytic) <= 0.05 * abs(analytic) + 1e-3, (numeric, analytic)


def test_bfloat16_scores_are_float32_and_close(published, reward):
    x, _ = _uint8_images()
    half = load_reward("imagereward", path=published[0], dtype=torch.bfloat16)
    assert half.mlp.layers[0].weight.dtype == torch.float32
    assert half.blip.visual_encoder.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    out = half.score(x, PROMPTS)["imagereward"]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reward.score(x, PROMPTS)["imagereward"], atol=0.1, rtol=0.05)


def test_missing_and_unknown_keys_name_the_file_and_keys(published, tmp_path):
    _, state = published
    broken = {k: v for k, v in state.items() if k != "blip.visual_encoder.blocks.1.attn.qkv.weight"}
    folder = _write_folder(tmp_path / "missing", broken)
    with pytest.raises(
        ValueError, match=r"missing\.*/ImageReward\.pt.*1 missing.*blocks\.1\.attn\.qkv\.weight"
    ):
        load_reward("imagereward", path=folder)
    extra = dict(state, **{"blip.text_decoder.cls.bias": torch.zeros(3)})
    folder = _write_folder(tmp_path / "extra", extra)
    with pytest.raises(ValueError, match=r"extra/ImageReward\.pt.*blip\.text_decoder\.cls\.bias"):
        load_reward("imagereward", path=folder)
    reshaped = dict(state, **{"mlp.layers.2.weight": torch.zeros(64, 1024)})
    folder = _write_folder(tmp_path / "shape", reshaped)
    with pytest.raises(ValueError, match=r"mlp\.layers\.2\.weight: expected \(128, 1024\), got \(64, 1024\)"):
        load_reward("imagereward", path=folder)


def test_missing_files_and_bad_inputs_are_explained(published, reward, tmp_path):
    folder, state = published
    lone = tmp_path / "lone"
    lone.mkdir()
    torch.save(state, lone / "ImageReward.pt")
    with pytest.raises(FileNotFoundError, match=r"lone/med_config\.json"):
        load_reward("imagereward", path=lone)
    with pytest.raises(FileNotFoundError, match=r"ImageReward\.pt"):
        load_reward("imagereward", path=tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a file, a folder nor a hub id"):
        load_reward("imagereward", path=tmp_path / "absent" / "ImageReward.pt")
    x, _ = _uint8_images()
    with pytest.raises(RewardInputError, match="got 3 prompts for 4 media items"):
        reward.score(x, PROMPTS[:3])
    with pytest.raises(RewardInputError, match="needs one prompt per media item"):
        reward.score(x)
