"""Diversity (LPIPS, pixel, attribute entropy) and feature extractors for FID (Inception from a file, toy)."""

from __future__ import annotations

import functools

import pytest
import torch

from flowalign.evals import diversity as evals_diversity
from flowalign.evals import fid as evals_fid
from flowalign.evals.fid import InceptionFeatures, toy_features, toy_reference_media
from flowalign.tokenizers.metrics import LpipsUnavailable
from flowalign.toy.world import COLOURS, SHAPES, toy_prompts


def test_lpips_needs_weights_or_an_explicit_random_backbone(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # no cached torchvision weights
    with pytest.raises(LpipsUnavailable, match="backbone_weights"):
        evals_diversity.load_lpips()


def test_lpips_random_backbone_is_zero_on_identical_images_and_positive_otherwise():
    model = evals_diversity.load_lpips(random_backbone=True)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 3, 32, 32, generator=g), torch.rand(3, 3, 32, 32, generator=g)
    assert torch.allclose(evals_diversity.lpips_distance(model, x, x), torch.zeros(3), atol=1e-6)
    assert (evals_diversity.lpips_distance(model, x, y) > 0).all()
    clips = torch.rand(2, 4, 3, 32, 32, generator=g)
    assert evals_diversity.lpips_distance(model, clips, clips.flip(0)).shape == (2,)


def test_lpips_loads_torchvision_alexnet_weights_from_a_local_file(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import alexnet

    torch.manual_seed(0)
    net = alexnet(weights=None)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "alexnet.safetensors")
    model = evals_diversity.load_lpips(backbone_weights=tmp_path / "alexnet.safetensors")
    assert torch.equal(model.net.slice1[0].weight, net.features[0].weight)
    assert torch.equal(getattr(model.net.slice5, "10").bias, net.features[10].bias)
    save_file({"classifier.1.weight": torch.zeros(2, 2)}, tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match=r"wrong\.safetensors.*features\.0\.weight"):
        evals_diversity.load_lpips(backbone_weights=tmp_path / "wrong.safetensors")


def test_within_group_diversity_separates_collapsed_from_varied_samples():
    g = torch.Generator().manual_seed(0)
    collapsed = [torch.rand(1, 3, 8, 8, generator=g).expand(4, -1, -1, -1) for _ in range(5)]
    varied = [torch.rand(4, 3, 8, 8, generator=g) for _ in range(5)]
    single = [torch.rand(1, 3, 8, 8, generator=g)]
    out_c = evals_diversity.within_group_diversity(
        iter(collapsed), {"pixel": evals_diversity.pixel_distance}, num_resamples=100
    )
    out_v = evals_diversity.within_group_diversity(
        iter(varied), {"pixel": evals_diversity.pixel_distance}, num_resamples=100
    )
    assert out_c["pixel"]["mean"] == 0.0 and out_c["pixel"]["num_groups"] == 5
    assert out_v["pixel"]["ci_low"] > 0.2  # uniform noise: RMS distance ~ 1/sqrt(6) = 0.41
    assert (
        evals_diversity.within_group_diversity(single, {"pixel": evals_diversity.pixel_distance})["pixel"][
            "num_groups"
        ]
        == 0
    )


def test_attribute_entropy_uniform_and_collapsed():
    uniform = [{"present": True, "shape": s, "colour": c} for s in SHAPES for c in COLOURS]
    collapsed = [{"present": True, "shape": "circle", "colour": "red"} for _ in uniform]
    vocab = {"shape": SHAPES, "colour": COLOURS}
    u = evals_diversity.attribute_entropy(uniform, vocab, reference=uniform)
    c = evals_diversity.attribute_entropy(collapsed + [{"present": False, "shape": None, "colour": None}], vocab,
                                  reference=uniform)  # fmt: skip
    assert u["attributes"]["colour"]["entropy_bits"] == pytest.approx(3.0)
    assert u["attributes"]["shape"]["normalised"] == pytest.approx(1.0)
    assert c["attributes"]["colour"]["entropy_bits"] == 0.0
    assert c["attributes"]["colour"]["reference_bits"] == pytest.approx(3.0)
    assert c["present"] == pytest.approx(len(collapsed) / (len(collapsed) + 1))
    assert c["attributes"]["shape"]["histogram"]["circle"] == len(collapsed)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    from safetensors.torch import save_file
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    reference = inception_v3(weights=None, aux_logits=True, init_weights=False).eval()
    path = tmp_path_factory.mktemp("inception") / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
    return path, reference


def test_inception_weights_load_from_a_local_file(inception_file, tmp_path):
    path, reference = inception_file
    extractor = evals_fid.load_inception_features(path)
    assert isinstance(extractor, InceptionFeatures)
    ours = dict(extractor.net.named_parameters())
    for name, param in reference.named_parameters():
        if not name.startswith(("AuxLogits.", "fc.")):
            assert torch.equal(ours[name], param), name
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth: not a torchvision inception_v3"):
        evals_fid.load_inception_features(tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError):
        evals_fid.load_inception_features(tmp_path / "absent.pth")


@pytest.mark.slow
def test_inception_features_equal_torchvision_pool_features(inception_file):
    path, reference = inception_file
    extractor = evals_fid.load_inception_features(path)
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = extractor(images)
        x = torch.nn.functional.interpolate(images, size=(299, 299), mode="bilinear", antialias=True) * 2 - 1
        reference.fc = torch.nn.Identity()
        expected = reference(x)
    assert feats.shape == (2, 2048)
    assert torch.allclose(feats, expected, atol=1e-5)


def test_toy_fid_ranks_renders_above_noise_and_blur():
    prompts = toy_prompts("heldout")[::2]  # 40 captions
    renders = toy_reference_media(prompts, seed=5)
    reference = toy_features(toy_reference_media(prompts, seed=0))
    noise = torch.rand(renders.shape, generator=torch.Generator().manual_seed(0))
    blurred = torch.nn.functional.avg_pool2d(renders, 5, stride=1, padding=2, count_include_pad=False)
    fid = functools.partial(evals_fid.fid_from_features, features_b=reference)
    f_render, f_blur, f_noise = (
        fid(toy_features(renders)),
        fid(toy_features(blurred)),
        fid(toy_features(noise)),
    )
    assert f_render < f_blur < f_noise
    assert toy_features(renders).shape == (40, 28)
    clips = toy_reference_media(toy_prompts("heldout", "video")[:3], num_frames=4)
    assert clips.shape == (3, 4, 3, 32, 32) and toy_features(clips).shape == (3, 34)
