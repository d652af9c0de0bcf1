"""FID, KID, PSNR and SSIM agree with the libraries papers use (clean-fid, torchmetrics) on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flowalign.evals.fid import fid_from_features, load_fid_extractor
from flowalign.evals.kid import kernel_distance, polynomial_mmd2
from flowalign.tokenizers.metrics import psnr, ssim


def _feature_sets(n: int = 500, d: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two non-negative, correlated, low-rank-plus-noise feature sets, like Inception pool features."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(64, d, generator=gen, dtype=torch.float64)
    a = torch.relu(torch.randn(n, 64, generator=gen, dtype=torch.float64) @ basis / 8) + 0.05 * torch.rand(
        n, d, generator=gen, dtype=torch.float64
    )
    b = torch.relu(
        (torch.randn(n, 64, generator=gen, dtype=torch.float64) + 0.3) @ basis / 8
    ) + 0.05 * torch.rand(n, d, generator=gen, dtype=torch.float64)
    return a, b


@pytest.mark.parametrize("dim", [pytest.param(2048, marks=pytest.mark.slow), 256])
def test_fid_equals_clean_fid_and_torchmetrics_on_two_500_feature_sets(dim):
    fid_lib = pytest.importorskip("cleanfid.fid")
    tm_fid = pytest.importorskip("torchmetrics.image.fid")
    a, b = _feature_sets(d=dim)
    ours = fid_from_features(a, b)
    theirs = fid_lib.fid_from_feats(a.numpy(), b.numpy())
    # The bar is 1e-3 absolute; the two square-root routes (eigh here, scipy's sqrtm there) agree
    # to ~1e-9 relative in float64 on this rank-deficient (N < D) case, far inside it.
    assert ours == pytest.approx(theirs, abs=1e-3)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    tm = float(tm_fid._compute_fid(mu_a, cov_a, mu_b, cov_b))
    assert ours == pytest.approx(tm, abs=1e-3)
    assert ours > 1.0  # the two sets differ (a shifted latent), so the check is not 0 == 0


def test_kid_equals_clean_fid_and_torchmetrics_on_whole_sets():
    fid_lib = pytest.importorskip("cleanfid.fid")
    tm_kid = pytest.importorskip("torchmetrics.image.kid")
    a, b = _feature_sets(n=300, d=256, seed=1)
    # One subset of the whole sets: every library's estimate is then the same deterministic MMD^2_u.
    ours = kernel_distance(a, b, subsets=1, subset_size=10_000)
    assert ours.subset_size == 300 and ours.se == 0.0
    theirs = fid_lib.kernel_distance(a.numpy(), b.numpy(), num_subsets=1, max_subset_size=10_000)
    tm = float(tm_kid.poly_mmd(a, b))
    scale = max(abs(theirs), 1e-12)
    # float64 sums of 9e4 kernel terms of size ~1: rounding ~1e-16 * 9e4 relative to the terms, not to KID.
    assert ours.kid == pytest.approx(theirs, rel=1e-9, abs=1e-9 * scale)
    assert ours.kid == pytest.approx(tm, rel=1e-9, abs=1e-9 * scale)
    assert ours.kid > 0


def test_kid_subsets_are_reproducible_and_unbiased_for_equal_distributions():
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(400, 16, generator=gen), torch.randn(400, 16, generator=gen)
    first = kernel_distance(x, y, subsets=20, subset_size=100, seed=7)
    again = kernel_distance(x, y, subsets=20, subset_size=100, seed=7)
    assert first == again
    assert (
        first.se > 0 and abs(first.kid) < 4 * first.se + 1e-12
    )  # same distribution: KID is 0 in expectation
    shifted = kernel_distance(x, y + 1.0, subsets=20, subset_size=100, seed=7)
    assert shifted.kid > 10 * shifted.se
    with pytest.raises(ValueError, match="m >= 2"):
        polynomial_mmd2(x[:1], y[:1])


def test_psnr_and_ssim_equal_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.image")
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 32, 40, generator=gen, dtype=torch.float64)
    b = (a + 0.1 * torch.randn(a.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    ours_psnr = psnr(a, b)
    theirs_psnr = torch.stack(
        [tm.peak_signal_noise_ratio(a[i : i + 1], b[i : i + 1], data_range=1.0) for i in range(3)]
    )
    # ours returns float32: half an ulp of ~20 dB is ~1e-6
    torch.testing.assert_close(ours_psnr.double(), theirs_psnr, rtol=0, atol=1e-5)
    # torchmetrics averages the SSIM map over every pixel of a reflect-padded image; ours (as Wang et al.'s
    # reference code) over the valid windows only. Its full map cropped to the valid windows is ours.
    _, full_map = tm.structural_similarity_index_measure(
        a, b, data_range=1.0, kernel_size=11, sigma=1.5, reduction="none", return_full_image=True
    )
    theirs_ssim = full_map[..., 5:-5, 5:-5].flatten(1).mean(1)
    # float64 throughout, ours rounded to float32 at the end: half an ulp of a value <= 1 is 6e-8
    torch.testing.assert_close(ssim(a, b).double(), theirs_ssim, rtol=0, atol=1e-7)


class _FakeLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 5, stride=4)
        self.pool = nn.AdaptiveAvgPool2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.tanh(self.conv(x))).flatten(1)  # [B, 8 * 256 = 2048]


class _FakeInception(nn.Module):
    """Has what clean-fid reads of the standard file: a ``layers`` module giving 2048 features."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _FakeLayers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


def test_clean_inception_features_equal_clean_fid(tmp_path):
    pytest.importorskip("cleanfid")
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    torch.manual_seed(0)
    torch.jit.script(_FakeInception()).save(str(tmp_path / "inception-2015-12-05.pt"))
    extractor, info = load_fid_extractor(tmp_path / "inception-2015-12-05.pt")
    assert info["comparable_with_papers"] and info["weights"] == "inception-2015-12-05.pt"
    assert len(info["sha256"]) == 64
    gen = torch.Generator().manual_seed(1)
    images = (torch.randint(0, 256, (2, 3, 37, 53), generator=gen) / 255.0).float()
    ours = extractor(images)
    reference_net = InceptionV3W(str(tmp_path), download=False)
    resize = build_resizer("clean")
    arrays = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    batch = torch.from_numpy(np.stack([resize(x) for x in arrays])).permute(0, 3, 1, 2)
    theirs = reference_net(batch)
    # same float32 arithmetic; only the memory layout of the resized batch may differ (contiguous here),
    # which can reorder a conv's 75-term sums: a few float32 ulps of values of size ~1.
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_fid_extractor_refuses_a_non_inception_file(tmp_path):
    bad = tmp_path / "weights.pt"
    torch.save({"x": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a torchvision inception_v3"):
        load_fid_extractor(bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_fid_extractor(tmp_path / "folder-without-it")
