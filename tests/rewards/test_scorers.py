"""Published scorers, built tiny in their published formats, loaded through the user-facing path,
and compared with the reference computation (PIL preprocessing, one image at a time).

Score tolerances follow from the preprocessing tolerance (test_preprocess.py): uint8 PIL resize vs
our float resize moves the cosine of these tiny random models by at most 7.3e-4 (measured over
3 seeds, open_clip and transformers); we assert 2e-3.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_clip import PROMPTS, write_hf_clip_dir, write_open_clip_dir

from flowalign.rewards import load_reward
from flowalign.rewards.aesthetic import AestheticMLP
from flowalign.rewards.backbones import load_open_clip, load_state_dict_file
from flowalign.rewards.clip import ClipSimilarityReward

COS_ATOL = 2e-3


def _uint8_images(
    n: int = 4, h: int = 40, w: int = 48, seed: int = 1
) -> tuple[torch.Tensor, list[Image.Image]]:
    g = torch.Generator().manual_seed(seed)
    u8 = (torch.rand(n, 3, h, w, generator=g) * 255).round().to(torch.uint8)
    pils = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in u8]
    return u8.float() / 255, pils


def _open_clip_reference(folder, pils, prompts):
    """CLIP cosine exactly as open_clip users compute it: PIL transform, encode, normalise."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    with torch.no_grad():
        img = F.normalize(model.encode_image(torch.stack([preprocess(p) for p in pils])), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
    return (img * txt).sum(-1), model


def _hf_reference(folder, pils, prompts, processor_folder=None):
    """PickScore reference: processor(images), tokenizer(padding, truncation, 77), normalise, logit scale."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    src = processor_folder or folder
    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPImageProcessor.from_pretrained(src)
    tokenizer = AutoTokenizer.from_pretrained(src)
    with torch.no_grad():
        pixels = processor(images=pils, return_tensors="pt")["pixel_values"]
        img = model.get_image_features(pixel_values=pixels)
        enc = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        txt = model.get_text_features(**enc)
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    cos = (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)
    return cos, model.logit_scale.exp().item()


# ---------------------------------------------------------------------------------- CLIPScore


def test_clipscore_open_clip_local_dir_matches_reference(open_clip_dir):
    x, pils = _uint8_images()
    ref_cos, _ = _open_clip_reference(open_clip_dir, pils, PROMPTS)
    reward = load_reward("clip", model=f"local-dir:{open_clip_dir}")
    assert reward.dimensions == ("clip",) and reward.differentiable
    ours_cos = reward.backbone.cosine(reward.backbone.image_features(x), reward.text_embeddings(PROMPTS))
    torch.testing.assert_close(ours_cos, ref_cos, atol=COS_ATOL, rtol=0)
    torch.testing.assert_close(reward.score(x, PROMPTS)["clip"], 100 * ours_cos.clamp(min=0))


def test_clipscore_transformers_folder_matches_reference(hf_clip_dir):
    x, pils = _uint8_images()
    ref_cos, _ = _hf_reference(hf_clip_dir, pils, PROMPTS)
    reward = load_reward("clip", model=str(hf_clip_dir), scale=2.5)
    assert len(reward.backbone.tokenizer) > 2
    out = reward.score(x, PROMPTS)["clip"]
    assert (ref_cos > 0).any(), "fixture should give some positive similarities"
    torch.testing.assert_close(out, 2.5 * ref_cos.clamp(min=0), atol=2.5 * COS_ATOL, rtol=0)


def test_open_clip_without_weights_is_refused():
    with pytest.raises(ValueError, match="no weights given"):
        load_open_clip("ViT-B-32")


# ---------------------------------------------------------------------------------- PickScore


def test_pickscore_matches_reference_and_separate_processor(hf_clip_dir, tmp_path):
    x, pils = _uint8_images()
    ref_cos, scale = _hf_reference(hf_clip_dir, pils, PROMPTS)
    reward = load_reward("pickscore", model=hf_clip_dir)
    out = reward.score(x, PROMPTS)["pickscore"]
    torch.testing.assert_close(out, scale * ref_cos, atol=scale * COS_ATOL, rtol=0)
    # The model folder alone (as PickScore_v1 ships) + tokenizer/processor from another folder.
    bare = write_hf_clip_dir(tmp_path / "bare", with_processor=False)
    split = load_reward("pickscore", model=bare, processor=hf_clip_dir).score(x, PROMPTS)["pickscore"]
    torch.testing.assert_close(split, out)


def test_pickscore_folder_without_processor_explains(tmp_path):
    bare = write_hf_clip_dir(tmp_path / "bare", with_processor=False)
    with pytest.raises(ValueError, match="processor="):
        load_reward("pickscore", model=bare)


def test_pickscore_is_deterministic_batch_invariant_and_averages_frames(hf_clip_dir):
    x, _ = _uint8_images()
    a = load_reward("pickscore", model=hf_clip_dir, batch_size=1).score(x, PROMPTS)["pickscore"]
    b = load_reward("pickscore", model=hf_clip_dir, batch_size=4).score(x, PROMPTS)["pickscore"]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    reward = load_reward("pickscore", model=hf_clip_dir)
    video = x[None].expand(2, -1, -1, -1, -1)  # [2, T=4, 3, H, W]: each clip = the 4 images
    clip_scores = reward.score(video, ["a red circle", "two green triangles"])["pickscore"]
    per_frame = reward.score(x, ["a red circle"] * 4)["pickscore"]
    torch.testing.assert_close(clip_scores[0], per_frame.mean(), atol=1e-5, rtol=0)


def test_pickscore_gradient_matches_finite_difference(hf_clip_dir):
    reward = load_reward("pickscore", model=hf_clip_dir)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 0.8 + 0.1
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    xg = x.clone().requires_grad_(True)
    reward.score(xg, PROMPTS[:1], differentiable=True)["pickscore"].sum().backward()
    eps = 1e-2
    plus = reward.score(x + eps * direction, PROMPTS[:1])["pickscore"]
    minus = reward.score(x - eps * direction, PROMPTS[:1])["pickscore"]
    numeric = float((plus - minus) / (2 * eps))
    analytic = float((xg.grad * direction).sum())
    assert abs(numeric - analytic) <= 0.05 * abs(analytic) + 1e-3, (numeric, analytic)


def test_bfloat16_scores_are_float32_and_close(hf_clip_dir):
    x, _ = _uint8_images()
    full = load_reward("pickscore", model=hf_clip_dir).score(x, PROMPTS)["pickscore"]
    half = load_reward("pickscore", model=hf_clip_dir, dtype=torch.bfloat16).score(x, PROMPTS)["pickscore"]
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, atol=0.3, rtol=0.05)


# ---------------------------------------------------------------------------------- HPSv2


def _hps_reference(model, x, prompts):
    """hpsv2.score(): ToTensor -> ResizeMaxSize -> Normalize, model(image, text), diag of img @ txt.T."""
    import open_clip
    from test_preprocess import _hps_reference as hps_transform

    tokenizer = open_clip.get_tokenizer("ViT-H-14")
    scores = []
    with torch.no_grad():
        for img, prompt in zip(x, prompts, strict=True):
            out = model(hps_transform(img, side=32)[None], tokenizer([prompt]))
            scores.append((out["image_features"] @ out["text_features"].T).diagonal()[0])
    return torch.stack(scores)


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    """An architecture folder (config only) and HPS-format checkpoints of other weights."""
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("hps")
    arch = write_open_clip_dir(root / "arch", seed=0, with_weights=False)
    torch.manual_seed(7)
    trained = open_clip.create_model(f"local-dir:{arch}", output_dict=True).eval()
    state = trained.state_dict()
    torch.save({"state_dict": state, "epoch": 3}, root / "hps.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, root / "hps_ddp.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "hps.safetensors"))
    return arch, root, trained


def test_hpsv2_checkpoint_matches_reference(hps_files):
    arch, root, trained = hps_files
    x = torch.rand(3, 3, 40, 56, generator=torch.Generator().manual_seed(2))
    prompts = PROMPTS[:3]
    reward = load_reward("hpsv2.1", model=f"local-dir:{arch}", checkpoint=root / "hps.pt")
    assert reward.dimensions == ("hpsv2.1",) and reward.backbone.preprocess.resize_mode == "longest_pad"
    torch.testing.assert_close(
        reward.score(x, prompts)["hpsv2.1"], _hps_reference(trained, x, prompts), atol=1e-5, rtol=0
    )
    for name in ("hps_ddp.pt", "hps.safetensors"):
        other = load_reward("hpsv2", model=f"local-dir:{arch}", checkpoint=root / name, scale=100.0)
        torch.testing.assert_close(
            other.score(x, prompts)["hpsv2"], 100 * reward.score(x, prompts)["hpsv2.1"]
        )


def test_hpsv2_rejects_wrong_or_unsafe_checkpoints(hps_files, tmp_path):
    arch, root, trained = hps_files
    state = load_state_dict_file(root / "hps.pt")
    bad = {k: v for k, v in state.items() if not k.startswith("visual.transformer.resblocks.1")}
    torch.save({"state_dict": bad}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"partial\.pt.*missing"):
        load_reward("hpsv2", model=f"local-dir:{arch}", checkpoint=tmp_path / "partial.pt")
    torch.save({"state_dict": state, "extra": np.dtype("float64").type}, tmp_path / "pickle.pt")
    with pytest.raises(ValueError, match=r"pickle\.pt.*weights-only"):
        load_reward("hpsv2", model=f"local-dir:{arch}", checkpoint=tmp_path / "pickle.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_reward("hpsv2", model=f"local-dir:{arch}", checkpoint=tmp_path / "nope.pt")


# ---------------------------------------------------------------------------------- aesthetic


def test_aesthetic_published_head_matches_reference(open_clip_dir, tmp_path):
    torch.manual_seed(3)
    head = AestheticMLP(32).eval()
    torch.save(head.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")  # published: bare state dict
    assert sorted(head.state_dict()) == sorted(
        f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")
    )
    x, pils = _uint8_images()
    reward = load_reward(
        "aesthetic", model=f"local-dir:{open_clip_dir}", head=tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    )
    assert not reward.needs_prompts
    ours = reward.score(x)["aesthetic"]
    _, model = _open_clip_reference(open_clip_dir, pils, PROMPTS)
    import open_clip

    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{open_clip_dir}")
    with torch.no_grad():
        emb = model.encode_image(torch.stack([preprocess(p) for p in pils])).numpy()
        emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)  # the reference's numpy normalisation
        ref = head(torch.from_numpy(emb).float())
    torch.testing.assert_close(ours, ref, atol=5e-3, rtol=0)
    assert ours.std() > 0


def test_aesthetic_head_with_other_layout_is_refused(open_clip_dir, tmp_path):
    relu_head = {  # the "relu" variant indexes its Linear layers differently
        "layers.0.weight": torch.zeros(1024, 32),
        "layers.0.bias": torch.zeros(1024),
        "layers.3.weight": torch.zeros(128, 1024),
        "layers.3.bias": torch.zeros(128),
    }
    torch.save(relu_head, tmp_path / "relu.pth")
    with pytest.raises(ValueError, match=r"relu\.pth.*missing.*unexpected"):
        load_reward("aesthetic", model=f"local-dir:{open_clip_dir}", head=tmp_path / "relu.pth")
    with pytest.raises(FileNotFoundError, match="improved-aesthetic-predictor"):
        load_reward("aesthetic", model=f"local-dir:{open_clip_dir}", head=tmp_path / "absent.pth")


def test_aesthetic_head_width_must_match_backbone(open_clip_dir, tmp_path):
    torch.save(AestheticMLP(48).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(ValueError, match="48-d embeddings but the backbone gives 32-d"):
        load_reward("aesthetic", model=f"local-dir:{open_clip_dir}", head=tmp_path / "wide.pth")


def test_similarity_kind_is_validated(open_clip_dir):
    backbone = load_open_clip(f"local-dir:{open_clip_dir}")
    with pytest.raises(ValueError, match="similarity"):
        ClipSimilarityReward(backbone, name="x", similarity="dot")
    cfg = json.loads((open_clip_dir / "open_clip_config.json").read_text())
    assert backbone.embed_dim == cfg["model_cfg"]["embed_dim"]


def test_local_dir_without_weights_is_refused_unless_a_checkpoint_comes(hps_files):
    arch, root, _ = hps_files
    with pytest.raises(ValueError, match="no weights given"):
        load_reward("clip", model=f"local-dir:{arch}")
    assert load_open_clip(f"local-dir:{arch}", checkpoint=root / "hps.safetensors").embed_dim == 32
