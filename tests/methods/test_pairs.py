"""Building preference pairs from a model and a reward."""

from __future__ import annotations

import json

import pytest
import torch

from flowalign.data.preference import load_preference_dataset
from flowalign.models import load_flow_model
from flowalign.workflows.pairs import PairsConfig, build_pairs, choose_pairs


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


def _bright(media, prompts):  # brighter is better: a deterministic stand-in reward
    bright = media.flatten(1).mean(1)
    return {"bright": bright, "overall": bright}


def test_build_pairs_writes_a_loadable_dataset(toy_model, tmp_path):
    cfg = PairsConfig(num_candidates=3, num_inference_steps=2, batch_size=4)
    prompts = ["a small red circle in the center", "a large blue square in the top left"]
    cand, chosen = build_pairs(toy_model, prompts, _bright, tmp_path / "pairs", cfg, progress=False)
    assert cand.media.shape == (6, 3, 32, 32) and len(chosen) == 2
    data = load_preference_dataset(tmp_path / "pairs" / "pairs.jsonl")
    assert len(data) == 2
    pair = data[0]
    assert pair.prompt == prompts[0]
    assert pair.media_w.mean() > pair.media_l.mean()  # the winner is the brighter one
    assert (tmp_path / "pairs" / "candidates.jsonl").read_text().count("\n") == 6
    rows = [json.loads(line) for line in (tmp_path / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert all(r["path_A"].startswith("candidates/") for r in rows)  # no second copy of the media
    assert not (tmp_path / "pairs" / "media").exists()


def test_video_ext_is_validated():
    with pytest.raises(ValueError, match="video_ext"):
        PairsConfig(video_ext=".avi")


@pytest.fixture(scope="module")
def tiny_video_model(tmp_path_factory):
    from flowalign.models.toy import build_toy_pipeline

    folder = tmp_path_factory.mktemp("toy-video-pairs")
    pipe = build_toy_pipeline("video", width=32, num_layers=1, text_width=32, seed=3, num_frames=4)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return load_flow_model(folder)


def test_npy_video_pairs_read_back_the_pixels_that_were_scored(tiny_video_model, tmp_path):
    """Candidates lie on the 8-bit grid, so .npy files, the scores and the returned media all agree."""
    from flowalign.experiments.toy_alignment import load_toy_pairs

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


def _bright_and_dark(media, prompts):
    bright = media.flatten(1).mean(1)
    return {"bright": bright, "dark": 1 - bright, "overall": bright}


@pytest.fixture()
def scored_folder(toy_model, tmp_path):
    cfg = PairsConfig(num_candidates=3, num_inference_steps=2, batch_size=6)
    prompts = ["a small red circle in the center", "a large blue square in the top left"]
    cand, chosen = build_pairs(toy_model, prompts, _bright_and_dark, tmp_path, cfg, progress=False)
    return tmp_path, cand, chosen


def test_rechoose_ranks_the_stored_scores_again_without_copying_media(scored_folder):
    from flowalign.experiments.toy_alignment import load_toy_pairs
    from flowalign.workflows.pairs import rechoose_pairs

    folder, cand, chosen = scored_folder
    before = (folder / "pairs.jsonl").read_text()
    path, dark = rechoose_pairs(folder, {"dark": 1.0}, filename="pairs_dark.jsonl")
    assert dark == [(l_, w) for w, l_ in chosen]  # best and worst swap places
    assert (folder / "pairs.jsonl").read_text() == before
    data = load_preference_dataset(path)
    w, l_ = dark[0]
    assert torch.equal(data[0].media_w, cand.media[w]) and torch.equal(data[0].media_l, cand.media[l_])
    assert json.loads(path.read_text().splitlines()[0])["path_A"].startswith("candidates/")
    assert json.loads((folder / "pairs_dark_choice.json").read_text())["weights"] == {"dark": 1.0}
    assert load_toy_pairs(folder, "pairs_dark.jsonl").chosen == dark


def test_rechoose_all_pairs_over_a_margin_matches_choose_pairs(scored_folder):
    from flowalign.workflows.pairs import rechoose_pairs

    folder, cand, _ = scored_folder
    _, pairs = rechoose_pairs(folder, {"bright": 2.0}, filename="all.jsonl", mode="all", margin=0.001)
    assert pairs == choose_pairs(2.0 * cand.scores["bright"].double(), 3, mode="all", margin=0.001)[0]


def test_rechoose_errors_name_the_problem(scored_folder, tmp_path_factory):
    from flowalign.data.errors import DataError
    from flowalign.workflows.pairs import rechoose_pairs

    folder, _, _ = scored_folder
    with pytest.raises(DataError, match=r"candidates.jsonl: line 1: no score 'ta'.*bright"):
        rechoose_pairs(folder, {"ta": 1.0}, filename="ta.jsonl")
    with pytest.raises(FileExistsError, match="pairs.jsonl exists"):
        rechoose_pairs(folder, {"dark": 1.0}, filename="pairs.jsonl")
    with pytest.raises(DataError, match="pairs_config.json: not found"):
        rechoose_pairs(tmp_path_factory.mktemp("empty"), {"dark": 1.0}, filename="x.jsonl")
    for bad in ("../x.jsonl", "candidates.jsonl", "x.csv"):
        with pytest.raises(ValueError, match="plain name ending in .jsonl"):
            rechoose_pairs(folder, {"dark": 1.0}, filename=bad, overwrite=True)
    path, _ = rechoose_pairs(folder, {"dark": 1.0}, filename="pairs.jsonl", overwrite=True)
    assert json.loads((folder / "pairs_config.json").read_text())["num_candidates"] == 3  # kept
    lines = (folder / "candidates.jsonl").read_text().splitlines()
    (folder / "candidates.jsonl").write_text("\n".join([lines[0], "{broken", *lines[2:]]) + "\n")
    with pytest.raises(DataError, match="candidates.jsonl: line 2: not JSON"):
        rechoose_pairs(folder, {"dark": 1.0}, filename="x.jsonl")
