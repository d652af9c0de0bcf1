"""Tensor preprocessing equals the reference PIL/processor pipelines on the same images.

Tolerances (normalised units, i.e. after dividing by the CLIP std ~0.27): the references resize a
uint8 image and round to uint8, our path stays in float. Measured on these images: max abs
difference 0.0158 (about 1.1 uint8 levels), mean 0.0040, for open_clip and both
transformers backends alike. We assert max <= 1.5/255/min(std) (0.023)
and mean <= 0.006. Against HPSv2's float-tensor transform the match is exact to 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from flowalign.rewards.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImagePreprocess,
    preprocess_from_hf_image_processor,
    preprocess_from_open_clip,
    preprocess_images,
    resized_shortest_side,
)

MAX_TOL = 1.5 / 255 / min(OPENAI_CLIP_STD)
MEAN_TOL = 0.006

# Odd margins after the shortest-side resize (225x301 -> 224x299) make the two crop rules differ.
SIZES = [(300, 400), (225, 301), (301, 225), (100, 150), (224, 224), (512, 512)]


def _image(height: int, width: int, seed: int) -> tuple[torch.Tensor, Image.Image]:
    """A uint8-quantised test image (smooth gradients + sharp blocks + noise), as tensor and PIL."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    img = torch.stack([0.5 + 0.5 * torch.sin(9 * xx + 4 * yy), yy, xx * yy], dim=0)
    img[:, height // 4 : height // 2, width // 3 : width // 2] = torch.tensor([0.9, 0.1, 0.2])[:, None, None]
    img[:, height // 2 :, : width // 4] = torch.rand(3, height - height // 2, width // 4, generator=g)
    u8 = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return u8.float() / 255, Image.fromarray(u8.permute(1, 2, 0).numpy())


def _diff(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    d = (ours - ref).abs()
    return float(d.max()), float(d.mean())


@pytest.fixture(scope="module")
def open_clip_transform():
    import open_clip

    return open_clip.image_transform(224, is_train=False)


@pytest.mark.parametrize("size", SIZES)
def test_matches_open_clip_pil_transform(size, open_clip_transform):
    x, pil = _image(*size, seed=0)
    ref = open_clip_transform(pil)
    spec = preprocess_from_open_clip({"size": (224, 224), "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD})
    ours = preprocess_images(x[None], spec)[0]
    assert ours.shape == ref.shape == (3, 224, 224)
    max_d, mean_d = _diff(ours, ref)
    assert max_d <= MAX_TOL and mean_d <= MEAN_TOL, (size, max_d, mean_d)


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
@pytest.mark.parametrize("size", SIZES)
def test_matches_transformers_clip_image_processor(size, backend):
    from transformers import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessor() if backend == "torchvision" else CLIPImageProcessorPil()
    x, pil = _image(*size, seed=1)
    ref = torch.as_tensor(np.asarray(processor(images=pil, return_tensors="pt")["pixel_values"][0]))
    ours = preprocess_images(x[None], preprocess_from_hf_image_processor(processor))[0]
    assert ours.shape == ref.shape == (3, 224, 224)
    max_d, mean_d = _diff(ours, ref)
    assert max_d <= MAX_TOL and mean_d <= MEAN_TOL, (size, max_d, mean_d)


def test_crop_rounding_is_what_separates_open_clip_from_transformers():
    # 225x301 -> 224x299: margin 75; torchvision crops at round(37.5) = 38, transformers at 37.
    x, _ = _image(225, 301, seed=2)
    base = dict(resize_size=224, crop_size=(224, 224))
    rounded = preprocess_images(x[None], ImagePreprocess(**base, crop_rounding="round"))
    floored = preprocess_images(x[None], ImagePreprocess(**base, crop_rounding="floor"))
    assert not torch.allclose(rounded, floored)
    torch.testing.assert_close(rounded[..., :-1], floored[..., 1:])  # one-pixel shift along the width


def _hps_reference(x: torch.Tensor, side: int = 224) -> torch.Tensor:
    """HPSv2's evaluation transform rebuilt from torchvision ops (ToTensor -> ResizeMaxSize -> Normalize)."""
    height, width = x.shape[-2:]
    scale = side / float(max(height, width))
    new = [round(height * scale), round(width * scale)]
    out = TF.resize(x, new, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    pad_h, pad_w = side - new[0], side - new[1]
    out = TF.pad(out, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return TF.normalize(out, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


@pytest.mark.parametrize("size", [(300, 400), (401, 257), (100, 150), (512, 512)])
def test_longest_pad_matches_hpsv2_transform(size):
    from flowalign.rewards.clip import hps_preprocess

    x, _ = _image(*size, seed=3)
    spec = hps_preprocess({"size": (224, 224), "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD})
    torch.testing.assert_close(preprocess_images(x[None], spec)[0], _hps_reference(x), atol=1e-5, rtol=0)


def test_batch_equals_per_image_and_is_differentiable():
    x = torch.stack([_image(120, 90, seed=s)[0] for s in range(3)])
    spec = ImagePreprocess(resize_size=64, crop_size=(64, 64))
    batched = preprocess_images(x, spec)
    singles = torch.cat([preprocess_images(x[i : i + 1], spec) for i in range(3)])
    torch.testing.assert_close(batched, singles)
    xg = x.clone().requires_grad_(True)
    preprocess_images(xg, spec).square().sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_shortest_side_rule_truncates_like_torchvision():
    for h, w in [(225, 301), (301, 225), (333, 500), (224, 224)]:
        pil = Image.new("RGB", (w, h))
        ref = TF.resize(pil, 224).size[::-1]  # (H, W)
        assert resized_shortest_side(h, w, 224) == tuple(ref)


def test_spec_validation_names_the_field():
    with pytest.raises(ValueError, match="resize_mode"):
        ImagePreprocess(resize_size=32, crop_size=(32, 32), resize_mode="longest")
    with pytest.raises(ValueError, match="crop_size"):
        ImagePreprocess(resize_size=32, crop_size=(40, 40))
    with pytest.raises(ValueError, match="std"):
        ImagePreprocess(resize_size=32, crop_size=(32, 32), std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="resample"):
        preprocess_from_hf_image_processor({"size": {"shortest_edge": 32}, "resample": 1})
    with pytest.raises(ValueError, match="do_normalize"):
        preprocess_from_hf_image_processor({"size": {"shortest_edge": 32}, "do_normalize": False})
    with pytest.raises(ValueError, match="resize_mode"):
        preprocess_from_open_clip({"size": 224, "resize_mode": "longest"})
