"""Building preference pairs from a model and a reward."""

from __future__ import annotations

import pytest
import torch

from flowalign.data.pairs import PairsConfig, build_pairs, choose_pairs
from flowalign.data.preference import load_preference_dataset


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
