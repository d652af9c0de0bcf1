"""parse_weights and RewardCombiner: normalisation, weighted overall, calibration, precedence, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from flowalign.rewards import (
    RewardCombiner,
    RewardModel,
    load_normalisation,
    parse_weights,
    save_normalisation,
    stats_from_scores,
)


class StatsReward(RewardModel):
    """Scores from pixel statistics: mean ("mean" dim, x a factor) and std ("spread" dim)."""

    name = "stats"
    dimensions = ("mean", "spread")
    needs_prompts = False

    def __init__(self, factor: float = 1.0, stored=None) -> None:
        super().__init__()
        self.factor = factor
        self.normalisation = stored

    def _score_images(self, images: Tensor, prompts) -> dict[str, Tensor]:
        flat = images.flatten(1)
        return {"mean": self.factor * flat.mean(1), "spread": flat.std(1)}


class MaxReward(RewardModel):
    name = "peak"
    dimensions = ("peak",)

    def _score_images(self, images: Tensor, prompts) -> dict[str, Tensor]:
        return {"peak": images.flatten(1).amax(1) + torch.tensor([len(p) for p in prompts]).to(images)}


class MotionReward(RewardModel):
    """Has a video-only dimension "mq" besides "vq"."""

    name = "motion"
    dimensions = ("vq", "mq")
    media_kind = "both"
    needs_prompts = False

    def _score_images(self, images: Tensor, prompts) -> dict[str, Tensor]:
        return {"vq": images.flatten(1).mean(1)}

    def _score_videos(self, videos: Tensor, prompts) -> dict[str, Tensor]:
        return {"vq": videos.flatten(1).mean(1), "mq": videos.diff(dim=1).abs().flatten(1).mean(1)}


def _imgs(b: int = 6, seed: int = 0) -> Tensor:
    return torch.rand(b, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------- parse_weights


def test_parse_weights_reads_names_and_numbers():
    assert parse_weights("vq=1,mq=0.5,ta=2") == {"vq": 1.0, "mq": 0.5, "ta": 2.0}
    assert parse_weights(" hpsv2.1 = -1e-1 , clip=3 ") == {"hpsv2.1": -0.1, "clip": 3.0}
    assert parse_weights("  ") == {}


@pytest.mark.parametrize(
    "spec, token",
    [
        ("vq=1,mq", "'mq'"),
        ("vq=abc", "'vq=abc'"),
        ("=2", "'=2'"),
        ("vq=1,,ta=2", "''"),
        ("vq=inf", "'vq=inf'"),
    ],
)
def test_parse_weights_errors_name_the_token(spec, token):
    with pytest.raises(ValueError, match=f"token {token}"):
        parse_weights(spec)


def test_parse_weights_rejects_duplicates():
    with pytest.raises(ValueError, match="'vq' is given twice"):
        parse_weights("vq=1,vq=2")


@given(
    st.dictionaries(st.from_regex(r"[a-z][a-z0-9_.]{0,8}", fullmatch=True), st.floats(-1e6, 1e6), max_size=5)
)
def test_parse_weights_round_trips(weights):
    spec = ",".join(f"{k}={v!r}" for k, v in weights.items())
    assert parse_weights(spec) == weights


# ---------------------------------------------------------------------------------- combiner


def test_overall_is_weighted_sum_of_normalised_dimensions():
    stats = {"mean": (0.5, 0.1), "spread": (0.3, 0.05), "peak": (1.0, 2.0)}
    combiner = RewardCombiner([StatsReward(), MaxReward()], {"mean": 2.0, "peak": -1.0}, stats)
    x = _imgs()
    prompts = ["a", "bb", "c", "dd", "e", "ff"]
    out = combiner.score(x, prompts)
    flat = x.flatten(1)
    peak = flat.amax(1) + torch.tensor([len(p) for p in prompts], dtype=torch.float32)
    torch.testing.assert_close(out["mean_norm"], (flat.mean(1) - 0.5) / 0.1)
    torch.testing.assert_close(out["peak"], peak)
    torch.testing.assert_close(out["overall"], 2 * (flat.mean(1) - 0.5) / 0.1 - (peak - 1.0) / 2.0)
    assert set(out) == {"mean", "spread", "peak", "mean_norm", "spread_norm", "peak_norm", "overall"}


def test_default_weights_are_one_for_every_dimension_and_identity_normalisation():
    combiner = RewardCombiner([StatsReward()])
    out = combiner.score(_imgs())
    torch.testing.assert_close(out["overall"], out["mean"] + out["spread"])


def test_unknown_weight_dimension_lists_available():
    with pytest.raises(
        ValueError, match=r"dimension\(s\) \['ta'\].*available dimensions: mean, spread, peak"
    ):
        RewardCombiner([StatsReward(), MaxReward()], {"mean": 1.0, "ta": 1.0})


def test_two_rewards_with_one_dimension_name_are_refused():
    with pytest.raises(ValueError, match="'mean' is provided by both 'stats' and 'stats'"):
        RewardCombiner([StatsReward(), StatsReward()])


def test_calibration_standardises_the_calibration_set():
    combiner = RewardCombiner([StatsReward(factor=7.0)])
    x = _imgs(32)
    stats = combiner.calibrate(x)
    out = combiner.score(x)
    for dim in ("mean", "spread"):
        assert abs(float(out[f"{dim}_norm"].mean())) < 1e-5
        assert abs(float(out[f"{dim}_norm"].std()) - 1) < 1e-5
    assert stats["mean"][0] == pytest.approx(7 * float(x.flatten(1).mean(1).mean()), rel=1e-5)


def test_normalisation_precedence_explicit_then_calibrated_then_stored():
    stored = {"mean": (10.0, 2.0), "spread": (1.0, 4.0)}
    reward = StatsReward(stored=stored)
    x = _imgs(8)
    assert RewardCombiner([reward]).normalisation == stored
    combiner = RewardCombiner([reward], normalisation={"spread": (0.0, 1.0)})
    calibrated = combiner.calibrate(x)
    assert combiner.normalisation == {"mean": calibrated["mean"], "spread": (0.0, 1.0)}


def test_video_only_dimension_skipped_by_default_but_required_when_weighted():
    images, videos = _imgs(3), torch.rand(3, 4, 3, 4, 4)
    default = RewardCombiner([MotionReward()])
    torch.testing.assert_close(default.score(images)["overall"], default.score(images)["vq"])
    video_out = default.score(videos)
    torch.testing.assert_close(video_out["overall"], video_out["vq"] + video_out["mq"])
    weighted = RewardCombiner([MotionReward()], {"vq": 1.0, "mq": 1.0})
    with pytest.raises(ValueError, match="'mq' has weight 1.0 but was not scored"):
        weighted.score(images)


def test_overall_is_differentiable_for_guidance():
    combiner = RewardCombiner([StatsReward()], {"mean": 1.0})
    x = _imgs(2).requires_grad_(True)
    combiner.score(x, differentiable=True)["overall"].sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 1.0 / x[0].numel()))


def test_stats_errors_name_the_dimension(tmp_path):
    with pytest.raises(ValueError, match="'spread' has zero spread"):
        stats_from_scores({"spread": torch.ones(4)})
    with pytest.raises(ValueError, match="at least 2"):
        stats_from_scores({"mean": torch.ones(1)})
    with pytest.raises(ValueError, match="'mean' needs finite mean and std > 0"):
        RewardCombiner([StatsReward()], normalisation={"mean": (0.0, 0.0)})


def test_normalisation_file_round_trip_and_errors(tmp_path):
    stats = {"vq": (0.25, 1.5), "ta": (-3.0, 0.5)}
    save_normalisation(tmp_path / "norm.json", stats)
    assert load_normalisation(tmp_path / "norm.json") == stats
    (tmp_path / "bad.json").write_text('{"vq": {"mean": 1}}')
    with pytest.raises(ValueError, match=r"bad\.json: entry 'vq'"):
        load_normalisation(tmp_path / "bad.json")
