"""PSNR, Gaussian-window SSIM and LPIPS loading on known cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowalign.tokenizers.metrics import (
    LpipsUnavailable,
    gaussian_window,
    load_lpips,
    psnr,
    ssim,
    video_metrics,
)

C1, C2 = 0.01**2, 0.03**2


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of one channel by explicit loops over every 11x11 window (no convolution)."""
    x = np.arange(11) - 5.0
    g = np.exp(-(x**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    vals = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * pa * pa).sum() - ma**2, (w * pb * pb).sum() - mb**2
            cov = (w * pa * pb).sum() - ma * mb
            vals.append(((2 * ma * mb + C1) * (2 * cov + C2)) / ((ma**2 + mb**2 + C1) * (va + vb + C2)))
    return float(np.mean(vals))


def test_psnr_known_values():
    a = torch.full((2, 3, 8, 8), 0.5)
    b = a.clone()
    b[1] += 0.1  # MSE 0.01 -> 20 dB
    out = psnr(b, a)
    assert out[0] == 100.0
    assert math.isclose(float(out[1]), 20.0, abs_tol=1e-4)
    assert math.isclose(float(psnr(b[1:] * 255, a[1:] * 255, data_range=255.0)[0]), 20.0, abs_tol=1e-4)


def test_gaussian_window():
    w = gaussian_window(11, 1.5)
    assert w.shape == (11, 11) and math.isclose(float(w.sum()), 1.0, abs_tol=1e-12)
    assert torch.equal(w, w.T) and torch.equal(w, w.flip(0)) and w.argmax() == 60


def test_ssim_identical_is_one():
    a = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ssim(a, a), torch.ones(3))


def test_ssim_of_constant_images_is_the_luminance_term():
    for va, vb in ((0.2, 0.7), (0.5, 0.5), (0.0, 1.0)):
        a, b = torch.full((1, 3, 12, 12), va), torch.full((1, 3, 12, 12), vb)
        expected = (2 * va * vb + C1) / (va**2 + vb**2 + C1)
        assert math.isclose(float(ssim(a, b)[0]), expected, rel_tol=1e-6)


def test_ssim_matches_explicit_window_loops():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 3, 14, 15, generator=g)
    b = (a + 0.2 * torch.randn(1, 3, 14, 15, generator=g)).clamp(0, 1)
    expected = np.mean(
        [_ssim_reference(a[0, c].double().numpy(), b[0, c].double().numpy()) for c in range(3)]
    )
    assert math.isclose(float(ssim(a, b)[0]), expected, rel_tol=1e-5)
    assert math.isclose(float(ssim(b, a)[0]), expected, rel_tol=1e-5)  # symmetric


def test_ssim_falls_with_noise():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(1, 3, 24, 24, generator=g)
    noise = torch.randn(1, 3, 24, 24, generator=g)
    scores = [float(ssim(a, a + s * noise)[0]) for s in (0.0, 0.05, 0.1, 0.3)]
    assert scores[0] == pytest.approx(1.0) and all(x > y for x, y in zip(scores, scores[1:], strict=False))


def test_ssim_and_psnr_errors():
    with pytest.raises(ValueError, match="smaller than"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        ssim(torch.zeros(3, 16, 16), torch.zeros(3, 16, 16))


@pytest.fixture(scope="module")
def random_lpips():
    return load_lpips("alex", random_backbone=True)


def test_video_metrics_average_frames(random_lpips):
    g = torch.Generator().manual_seed(3)
    ref = torch.rand(2, 3, 3, 32, 32, generator=g)  # LPIPS-Alex needs >= 31 x 31
    rec = ref.clone()
    rec[1, 2] = (rec[1, 2] + 0.1).clamp(0, 1)  # sample 1: only frame 2 differs
    out = video_metrics(rec, ref, lpips_fn=random_lpips)
    frame_psnr = psnr(rec[1], ref[1])
    assert out["psnr"][0] == 100.0 and math.isclose(
        float(out["psnr"][1]), float(frame_psnr.mean()), rel_tol=1e-6
    )
    assert out["ssim"][0] == pytest.approx(1.0) and out["ssim"][1] < 1.0
    assert out["lpips"][0] == 0.0 and out["lpips"][1] > 0.0
    images = video_metrics(rec[:, 2], ref[:, 2])
    assert set(images) == {"psnr", "ssim"} and images["psnr"][0] == 100.0
    with pytest.raises(ValueError, match="LPIPS failed on 16x16"):
        video_metrics(rec[..., :16, :16], ref[..., :16, :16], lpips_fn=random_lpips)


def test_random_lpips_is_seeded_and_frozen(random_lpips):
    again = load_lpips("alex", random_backbone=True)
    assert all(torch.equal(p, q) for p, q in zip(random_lpips.parameters(), again.parameters(), strict=True))
    assert not any(p.requires_grad for p in random_lpips.parameters()) and not random_lpips.training


def test_lpips_without_backbone_weights_refuses_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(LpipsUnavailable, match="alexnet"):
        load_lpips("alex")
    with pytest.raises(ValueError, match="net must be"):
        load_lpips("resnet")
