"""Prompt sets: built-in toy sets, benchmark files on disk, @N subsets, errors naming the file."""

from __future__ import annotations

import json

import pytest

from flowalign.data.errors import DataError
from flowalign.evals.prompt_sets import PromptSet, builtin_prompt_sets, load_prompt_set, spread_indices
from flowalign.toy.world import parse_caption, toy_prompts


def test_builtin_toy_sets_are_the_toy_splits():
    train, heldout = load_prompt_set("toy-train"), load_prompt_set("toy-heldout")
    assert list(heldout.prompts) == toy_prompts("heldout", "image")
    assert set(train.prompts).isdisjoint(heldout.prompts)
    assert train.is_toy and heldout.kind == "image"
    video = load_prompt_set("toy-video-heldout")
    assert video.kind == "video" and all(parse_caption(p).motion is not None for p in video.prompts)
    assert builtin_prompt_sets() == ["toy-heldout", "toy-train", "toy-video-heldout", "toy-video-train"]


def test_at_n_keeps_prompts_spread_over_the_set():
    full = load_prompt_set("toy-heldout")
    sub = load_prompt_set("toy-heldout@8")
    assert len(sub.prompts) == 8 and sub.source == "toy-heldout@8"
    assert list(sub.prompts) == [full.prompts[i] for i in spread_indices(len(full.prompts), 8)]
    assert len({parse_caption(p).shape for p in sub.prompts}) > 1  # not just the first shape
    assert load_prompt_set("toy-heldout", limit=5).prompts == full.take(5).prompts
    with pytest.raises(ValueError, match="cannot take 0 prompts"):
        load_prompt_set("toy-heldout@0")


def test_parti_tsv_with_categories(tmp_path):
    path = tmp_path / "PartiPrompts.tsv"
    path.write_text(
        "Prompt\tCategory\tChallenge\tNote\na red apple\tProduce\tBasic\t\na cat on a mat\tAnimals\tBasic\t\n"
    )
    pset = load_prompt_set(f"parti:{path}")
    assert pset.name == "parti" and pset.prompts == ("a red apple", "a cat on a mat")
    assert pset.groups == ("Produce", "Animals") and not pset.is_toy


def test_hpdv2_folder_groups_by_style(tmp_path):
    (tmp_path / "anime.json").write_text(json.dumps(["a girl", "a robot"]))
    (tmp_path / "photo.json").write_text(json.dumps(["a street"]))
    pset = load_prompt_set(f"hpdv2:{tmp_path}")
    assert pset.prompts == ("a girl", "a robot", "a street")
    assert pset.groups == ("anime", "anime", "photo")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="anime.json"):
        load_prompt_set(f"hpdv2:{empty}")


def test_vbench_full_info_and_txt_folder(tmp_path):
    info = tmp_path / "VBench_full_info.json"
    info.write_text(json.dumps([
        {"prompt_en": "a dog running", "dimension": ["subject_consistency", "motion_smoothness"]},
        {"prompt_en": "a boat", "dimension": ["scene"]},
    ]))  # fmt: skip
    pset = load_prompt_set(f"vbench:{info}")
    assert pset.prompts == ("a dog running", "a boat") and pset.groups == ("subject_consistency", "scene")
    assert pset.kind == "video"
    folder = tmp_path / "per_dim"
    folder.mkdir()
    (folder / "scene.txt").write_text("a beach\na forest\n")
    assert load_prompt_set(f"vbench:{folder}").groups == ("scene", "scene")


def test_geneval_metadata_tags(tmp_path):
    path = tmp_path / "evaluation_metadata.jsonl"
    rows = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
            {"tag": "counting", "include": [{"class": "dog", "count": 2}], "prompt": "a photo of two dogs"}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pset = load_prompt_set(f"geneval:{path}")
    assert pset.groups == ("single_object", "counting") and pset.prompts[1] == "a photo of two dogs"


def test_plain_prompt_files_and_toy_detection(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("a small red circle in the center\na large blue square in the top left\n")
    pset = load_prompt_set(path)
    assert pset.name == "mine" and pset.is_toy and len(pset.prompts) == 2
    assert not PromptSet.from_prompts("x", ["a cat"]).is_toy


def test_errors_name_the_file_or_list_the_choices(tmp_path):
    with pytest.raises(DataError, match="missing.txt: prompt set file does not exist"):
        load_prompt_set(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="nope.tsv"):
        load_prompt_set(f"parti:{tmp_path / 'nope.tsv'}")
    with pytest.raises(ValueError, match="toy-heldout.*benchmark in"):
        load_prompt_set("not-a-set")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": 3}\n')
    with pytest.raises(DataError, match="bad.jsonl: line 2"):
        load_prompt_set(tmp_path / "bad.jsonl")
