"""Detail metrics (flowalign.tokenizers.spectrum): radial power spectrum, spectral distance, HF ratio."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flowalign.tokenizers.spectrum import high_frequency_ratio, radial_power_spectrum, spectral_distance


def _radius_counts(size: int) -> torch.Tensor:
    k = torch.fft.fftfreq(size, d=1.0 / size, dtype=torch.float64)
    radius = torch.sqrt(k[None] ** 2 + k[:, None] ** 2).round().long().flatten()
    return torch.bincount(radius, minlength=size)[1 : size // 2 + 1].double()


@pytest.mark.parametrize("cycles", [1, 5, 12])
def test_a_cosine_puts_its_energy_in_its_own_radius(cycles):
    size = 32
    x = torch.arange(size, dtype=torch.float64)
    wave = torch.cos(2 * math.pi * cycles * x / size).expand(size, size)  # varies along the width only
    frames = torch.stack([wave, 2 * wave, 0 * wave])[None] + 0.5  # [1, 3, S, S], offsets removed by the mean
    power = radial_power_spectrum(frames)[0]
    # orthonormal FFT: sum |X|^2 = sum (x - mean)^2 = S^2 / 2 per unit amplitude; channels 1, 4, 0 -> mean 5/3
    expected = torch.zeros(size // 2, dtype=torch.float64)
    expected[cycles - 1] = (5 / 3) * size**2 / 2 / _radius_counts(size)[cycles - 1]
    assert torch.allclose(power, expected, atol=1e-9 * size**2)


def test_identical_media_score_zero_and_one():
    clips = torch.rand(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(spectral_distance(clips, clips), torch.zeros(2))
    assert torch.allclose(high_frequency_ratio(clips, clips), torch.ones(2), atol=1e-6)


def test_blurring_loses_high_frequencies():
    clips = torch.rand(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    blurred = F.avg_pool2d(clips.flatten(0, 1), 3, 1, 1, count_include_pad=False).view_as(clips)
    assert (high_frequency_ratio(blurred, clips) < 0.5).all()
    assert (spectral_distance(blurred, clips) > 0.1).all()
    # a scaled copy is off by log10(scale^2) decades at every radius
    assert torch.allclose(
        spectral_distance(0.5 * clips, clips), torch.full((2,), 2 * math.log10(2)), atol=1e-4
    )


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="shapes differ"):
        spectral_distance(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 16))
    with pytest.raises(ValueError, match="square"):
        radial_power_spectrum(torch.zeros(1, 3, 8, 16))
    with pytest.raises(ValueError, match="media must be"):
        high_frequency_ratio(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))
