"""CDT vs KL-VAE on the textured toy world: per-clip scores with s.e., the feature FD, a short run and the
full budget (slow)."""

from __future__ import annotations

import math

import pytest
import torch
from cdt_testing import make_model, tiny_config

from flowalign.experiments.toy_cdt import (
    ToyComparisonConfig,
    run_toy_comparison,
    score_tokenizer,
    standardised_fd,
    summarise,
)


def test_summarise_gives_mean_and_standard_error():
    out = summarise({"psnr": torch.tensor([10.0, 12.0, 14.0, 16.0])})
    # std (unbiased) of 10, 12, 14, 16 is sqrt(20 / 3); s.e. = that / 2
    assert out["psnr"] == 13.0 and out["psnr_se"] == pytest.approx(math.sqrt(20 / 3) / 2, rel=1e-12)
    assert summarise({"x": torch.tensor([3.0])}) == {"x": 3.0, "x_se": 0.0}


def test_standardised_fd_is_zero_for_the_same_set_and_scale_free():
    feats = torch.randn(200, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert standardised_fd(feats, feats) == pytest.approx(0.0, abs=1e-6)
    shifted = feats + torch.tensor([1.0, 0, 0, 0, 0, 0], dtype=torch.float64) * feats[:, 0].std()
    scale = torch.tensor([1e3, 1, 1, 1, 1, 1e-3], dtype=torch.float64)
    # a mean shift of one reference s.d. along one feature: FD = 1, whatever each feature's units
    assert standardised_fd(shifted, feats) == pytest.approx(1.0, rel=1e-6)
    assert standardised_fd(shifted * scale, feats * scale) == pytest.approx(1.0, rel=1e-6)


def test_score_tokenizer_gives_per_clip_detail_scores():
    model = make_model()
    clips = torch.rand(3, 5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    scores, recs = score_tokenizer(model, clips, lpips_fn=None, batch_size=2)
    assert set(scores) == {"psnr", "ssim", "spectral", "hf_ratio"} and recs.shape == clips.shape
    assert all(v.shape == (3,) for v in scores.values())
    assert (scores["spectral"] > 0).all() and (scores["hf_ratio"] >= 0).all()


def test_short_textured_comparison_reports_standard_errors(tmp_path):
    cfg = ToyComparisonConfig(
        model=tiny_config(),
        source="toy:video-textured",
        max_steps=1,
        batch_size=2,
        num_train=4,
        num_eval=3,
        num_frames=5,
        eval_steps=(1, 4),
    )
    results = run_toy_comparison(tmp_path, cfg)
    assert results["config"]["source"] == "toy:video-textured" and results["feature_fd_floor"] > 0
    for run in results["runs"].values():
        for m in run["eval"].values():
            for key in ("psnr", "ssim", "lpips", "spectral", "hf_ratio"):
                assert m[f"{key}_se"] > 0, key
            assert m["feature_fd"] > 0
    assert set(results["runs"]["diffusion"]["eval"]) == {"steps=1", "steps=4"}


# The measured table (docs/results.md, "CDT on textured toy video"): mean and s.e. over the 64 held-out clips.
_MEASURED = {
    "vae/steps=1": {"psnr": (16.73, 0.25), "ssim": (0.179, 0.013), "lpips": (0.0191, 0.0009)},
    "diffusion/steps=1": {"psnr": (16.33, 0.21), "ssim": (0.142, 0.010), "lpips": (0.0203, 0.0009)},
    "diffusion/steps=4": {"psnr": (15.26, 0.21), "ssim": (0.154, 0.012), "lpips": (0.0174, 0.0008)},
}


def _paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a - b).double()
    return float(d.mean()), float(d.std() / math.sqrt(d.numel()))


@pytest.mark.slow
def test_textured_comparison_full_budget(tmp_path):
    """The textured table of docs/results.md: seed 0, 400 steps per model, 64 held-out clips (about 40 min
    per model on 2 shared cores). Means are pinned to 4 s.e. of the measured ones; each verdict below is a
    paired difference that measured at least 4 s.e. from zero."""
    from flowalign.experiments.toy_cdt import _held_out, _lpips
    from flowalign.tokenizers.cdt import ConditionedDiffusionTokenizer

    cfg = ToyComparisonConfig(source="toy:video-textured", max_steps=400, num_eval=64, eval_steps=(1, 4))
    results = run_toy_comparison(tmp_path, cfg)
    print(results)
    for key, pinned in _MEASURED.items():
        decoder, steps = key.split("/")
        found = results["runs"][decoder]["eval"][steps]
        for metric, (mean, se) in pinned.items():
            assert abs(found[metric] - mean) < 4 * se, (key, metric, found[metric])
    vae_eval = results["runs"]["vae"]["eval"]["steps=1"]
    assert vae_eval["psnr"] > results["mean_colour_psnr"] + 3 * vae_eval["psnr_se"]
    cdt4 = results["runs"]["diffusion"]["eval"]["steps=4"]
    assert cdt4["feature_fd"] < vae_eval["feature_fd"] / 2  # measured 239 vs 611 (floor 108)

    clips = _held_out(cfg, seed=cfg.seed)
    lpips_fn, _ = _lpips(seed=cfg.seed + 1)
    models = {
        d: ConditionedDiffusionTokenizer.from_pretrained(tmp_path / d / "final" / "tokenizer")
        for d in ("diffusion", "vae")
    }
    vae, _ = score_tokenizer(models["vae"], clips, lpips_fn=lpips_fn, seed=cfg.seed)
    for steps in (1, 4):
        cdt, _ = score_tokenizer(
            models["diffusion"], clips, lpips_fn=lpips_fn, num_inference_steps=steps, seed=cfg.seed
        )
        for metric in ("psnr", "spectral"):  # VAE sharper on pixels; CDT's spectrum closer (both > 10 s.e.)
            mean, se = _paired(cdt[metric], vae[metric])
            assert mean < -3 * se, (steps, metric, mean, se)
        mean, se = _paired(cdt["hf_ratio"], vae["hf_ratio"])  # CDT keeps more high-frequency energy
        assert mean > 3 * se, (steps, mean, se)
    mean, se = _paired(cdt["lpips"], vae["lpips"])  # 4 steps: lower LPIPS (measured -0.0017 +- 0.0004)
    assert mean < -2 * se, (mean, se)
