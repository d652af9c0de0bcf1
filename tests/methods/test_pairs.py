"""Building preference pairs from a model and a reward."""

from __future__ import annotations

import pytest
import torch

from flowalign.data.pairs import PairsConfig, build_pairs, choose_pairs
from flowalign.data.preference import load_preference_dataset
from flowalign.models import load_flow_model


def test_choose_best_worst_and_ties():
    overall = torch.tensor([0.1, 0.9, 0.5, 0.4, 0.4, 0.4])
    pairs, ties = choose_pairs(overall, 3, mode="best_worst")
    assert pairs == [(1, 0)] and ties == 1


def test_choose_all_over_margin():
    overall = torch.tensor([0.1, 0.9, 0.5])
    pairs, ties = choose_pairs(overall, 3, mode="all", margin=0.3)
    assert sorted(pairs) == [(1, 0), (1, 2), (2, 0)] and ties == 0
    pairs, ties = choose_pairs(overall, 3, mode="all", margin=0.45)
    assert pairs == [(1, 0)] and ties == 2


def test_config_validation():
    with pytest.raises(ValueError, match="num_candidates"):
        PairsConfig(num_candidates=1)
    with pytest.raises(ValueError, match="mode"):
        PairsConfig(mode="random")


def test_build_pairs_writes_a_loadable_dataset(toy_model, tmp_path):
    def score_fn(media, prompts):  # brighter is better: a deterministic stand-in reward
        bright = media.flatten(1).mean(1)
        return {"bright": bright, "overall": bright}

    cfg = PairsConfig(num_candidates=3, num_inference_steps=2, batch_size=4)
    prompts = ["a small red circle in the center", "a large blue square in the top left"]
    cand, chosen = build_pairs(toy_model, prompts, score_fn, tmp_path / "pairs", cfg, progress=False)
    assert cand.media.shape == (6, 3, 32, 32) and len(chosen) == 2
    data = load_preference_dataset(tmp_path / "pairs" / "pairs.jsonl")
    assert len(data) == 2
    pair = data[0]
    assert pair.prompt == prompts[0]
    assert pair.media_w.mean() > pair.media_l.mean()  # the winner is the brighter one
    assert (tmp_path / "pairs" / "candidates.jsonl").read_text().count("\n") == 6


def test_video_ext_is_validated():
    with pytest.raises(ValueError, match="video_ext"):
        PairsConfig(video_ext=".avi")


def _bright(media, prompts):
    bright = media.flatten(1).mean(1)
    return {"bright": bright, "overall": bright}


@pytest.fixture(scope="module")
def tiny_video_model(tmp_path_factory):
    from flowalign.models.toy import build_toy_pipeline

    folder = tmp_path_factory.mktemp("toy-video-pairs")
    pipe = build_toy_pipeline("video", width=32, num_layers=1, text_width=32, seed=3, num_frames=4)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return load_flow_model(folder)


def test_npy_video_pairs_read_back_the_pixels_that_were_scored(tiny_video_model, tmp_path):
    """Candidates lie on the 8-bit grid, so .npy files, the scores and the returned media all agree."""
    from flowalign.toy.alignment import load_toy_pairs

    cfg = PairsConfig(num_candidates=2, num_inference_steps=2, batch_size=4, video_ext=".npy")
    prompts = ["a small red circle in the center moving right", "a large blue square in the top left"]
    cand, chosen = build_pairs(tiny_video_model, prompts, _bright, tmp_path, cfg, progress=False)
    assert torch.equal(cand.media, (cand.media * 255).round() / 255)
    back = load_toy_pairs(tmp_path)
    assert torch.equal(back.candidates.media, cand.media)
    assert back.chosen == chosen
    assert torch.equal(_bright(back.candidates.media, None)["overall"], cand.scores["overall"])
    pair = load_preference_dataset(tmp_path / "pairs.jsonl")[0]
    w, l_ = chosen[0]
    assert torch.equal(pair.media_w, cand.media[w]) and torch.equal(pair.media_l, cand.media[l_])


def test_mp4_video_pairs_are_the_default(tiny_video_model, tmp_path):
    cfg = PairsConfig(num_candidates=2, num_inference_steps=2, batch_size=4)
    build_pairs(
        tiny_video_model, ["a small red circle in the center"], _bright, tmp_path, cfg, progress=False
    )
    assert sorted(p.suffix for p in (tmp_path / "candidates").iterdir()) == [".mp4", ".mp4"]
