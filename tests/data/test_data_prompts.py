"""Tests for flowalign.data.prompts: every format and every bad input, with file/line in the message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowalign.data.errors import DataError
from flowalign.data.prompts import load_prompt_records, load_prompts

PROMPTS = ["a red circle", "two blue squares, moving left", "#nofilter sunset"]


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# ----------------------------------------------------------------------------- formats


def test_txt_strips_and_keeps_hash_prompts(tmp_path: Path) -> None:
    p = _write(
        tmp_path, "vbench.txt", "  a red circle \ntwo blue squares, moving left\n#nofilter sunset\n\n\n"
    )
    assert load_prompts(p) == PROMPTS


def test_txt_comment_prefix_is_opt_in(tmp_path: Path) -> None:
    p = _write(tmp_path, "c.txt", "# header\na red circle\n  # indented comment\nb\n")
    assert load_prompts(p, comment="#") == ["a red circle", "b"]
    assert load_prompts(p)[0] == "# header"


def test_txt_with_bom_and_crlf(tmp_path: Path) -> None:
    p = tmp_path / "w.txt"
    p.write_bytes("\ufeffone\r\ntwo\r\n".encode())
    assert load_prompts(p) == ["one", "two"]


def test_geneval_jsonl_keeps_metadata(tmp_path: Path) -> None:
    lines = [
        {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
        {"tag": "two_object", "include": [], "prompt": "a photo of a cat and a dog"},
    ]
    p = _write(tmp_path, "evaluation_metadata.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
    records = load_prompt_records(p)
    assert [r["prompt"] for r in records] == ["a photo of a bench", "a photo of a cat and a dog"]
    assert [r["tag"] for r in records] == ["single_object", "two_object"]
    assert records[0]["include"] == [{"class": "bench", "count": 1}]


def test_hpdv2_json_list(tmp_path: Path) -> None:
    p = _write(tmp_path, "anime.json", json.dumps(PROMPTS))
    assert load_prompts(p) == PROMPTS


def test_vbench_full_info_json_objects(tmp_path: Path) -> None:
    data = [{"prompt_en": "a dog running", "dimension": ["subject_consistency"]}]
    p = _write(tmp_path, "VBench_full_info.json", json.dumps(data))
    assert load_prompts(p) == ["a dog running"]
    assert load_prompt_records(p)[0]["dimension"] == ["subject_consistency"]


def test_parti_tsv_prompt_column(tmp_path: Path) -> None:
    p = _write(tmp_path, "PartiPrompts.tsv", "Prompt\tCategory\tChallenge\tNote\nbear\tAnimals\tBasic\t\n")
    records = load_prompt_records(p)
    assert records == [
        {"Prompt": "bear", "Category": "Animals", "Challenge": "Basic", "Note": "", "prompt": "bear"}
    ]


def test_csv_caption_column_and_quoted_fields(tmp_path: Path) -> None:
    p = _write(tmp_path, "c.csv", 'id,caption\n1,"a cat, sitting"\n2,"line one\nline two"\n')
    assert load_prompts(p) == ["a cat, sitting", "line one\nline two"]


def test_prompt_key_preferred_over_caption(tmp_path: Path) -> None:
    p = _write(tmp_path, "c.csv", "caption,prompt\nfrom caption,from prompt\n")
    assert load_prompts(p) == ["from prompt"]
    assert load_prompts(p, key="caption") == ["from caption"]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", ["e.txt", "e.jsonl", "e.json", "e.csv", "e.tsv"])
def test_empty_file_names_the_file(tmp_path: Path, name: str) -> None:
    p = _write(tmp_path, name, "\n  \n")
    with pytest.raises(DataError, match="empty") as exc:
        load_prompts(p)
    assert str(p) in str(exc.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as exc:
        load_prompts(tmp_path / "nope.txt")
    assert "nope.txt" in str(exc.value)


def test_unsupported_extension(tmp_path: Path) -> None:
    p = _write(tmp_path, "p.yaml", "- a\n")
    with pytest.raises(DataError, match="unsupported prompt file extension"):
        load_prompts(p)


def test_txt_empty_line_names_line_number(tmp_path: Path) -> None:
    p = _write(tmp_path, "p.txt", "one\ntwo\n   \nfour\n")
    with pytest.raises(DataError, match=r"p\.txt: line 3: empty line"):
        load_prompts(p)


def test_txt_only_comments_has_no_prompts(tmp_path: Path) -> None:
    p = _write(tmp_path, "p.txt", "# a\n# b\n")
    with pytest.raises(DataError, match="no prompts"):
        load_prompts(p, comment="#")


def test_jsonl_invalid_json_names_line(tmp_path: Path) -> None:
    p = _write(tmp_path, "p.jsonl", '{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"p\.jsonl: line 2: invalid JSON"):
        load_prompts(p)


def test_jsonl_missing_key_names_line(tmp_path: Path) -> None:
    p = _write(tmp_path, "p.jsonl", '{"prompt": "a"}\n{"tag": "x"}\n')
    with pytest.raises(DataError, match=r"line 2: no prompt key"):
        load_prompts(p)


def test_jsonl_empty_prompt_names_line(tmp_path: Path) -> None:
    p = _write(tmp_path, "p.jsonl", '{"prompt": "a"}\n{"prompt": "  "}\n')
    with pytest.raises(DataError, match=r"line 2: empty prompt 'prompt'"):
        load_prompts(p)


def test_jsonl_non_string_prompt(tmp_path: Path) -> None:
    p = _write(tmp_path, "p.jsonl", '{"prompt": 3}\n')
    with pytest.raises(DataError, match=r"line 1: prompt 'prompt' must be a string, got int"):
        load_prompts(p)


def test_jsonl_blank_line_in_middle(tmp_path: Path) -> None:
    p = _write(tmp_path, "p.jsonl", '{"prompt": "a"}\n\n{"prompt": "b"}\n')
    with pytest.raises(DataError, match=r"line 2: empty line"):
        load_prompts(p)


def test_json_not_a_list(tmp_path: Path) -> None:
    p = _write(tmp_path, "p.json", '{"prompt": "a"}')
    with pytest.raises(DataError, match="expected a JSON list"):
        load_prompts(p)


def test_json_bad_item_names_index(tmp_path: Path) -> None:
    p = _write(tmp_path, "p.json", '["a", ""]')
    with pytest.raises(DataError, match=r"item 1: empty prompt"):
        load_prompts(p)


def test_csv_missing_column_names_header(tmp_path: Path) -> None:
    p = _write(tmp_path, "p.csv", "id,text2\n1,a\n")
    with pytest.raises(DataError, match=r"header \(line 1\): no prompt key"):
        load_prompts(p)
    with pytest.raises(DataError, match="missing prompt key 'Prompt'"):
        load_prompts(p, key="Prompt")


def test_csv_empty_cell_names_line(tmp_path: Path) -> None:
    p = _write(tmp_path, "p.csv", "id,prompt\n1,a\n2,\n")
    with pytest.raises(DataError, match=r"p\.csv: line 3: empty prompt"):
        load_prompts(p)


def test_csv_wrong_field_count_names_line(tmp_path: Path) -> None:
    p = _write(tmp_path, "p.csv", "id,prompt\n1,a,extra\n")
    with pytest.raises(DataError, match=r"line 2: expected 2 fields"):
        load_prompts(p)


def test_csv_blank_line_in_middle(tmp_path: Path) -> None:
    p = _write(tmp_path, "p.csv", "prompt\na\n\nb\n")
    with pytest.raises(DataError, match=r"line 3: empty line"):
        load_prompts(p)


def test_invalid_utf8(tmp_path: Path) -> None:
    p = tmp_path / "p.txt"
    p.write_bytes(b"caf\xe9\n")
    with pytest.raises(DataError, match="not valid UTF-8"):
        load_prompts(p)


def test_comment_only_for_txt(tmp_path: Path) -> None:
    p = _write(tmp_path, "p.csv", "prompt\na\n")
    with pytest.raises(ValueError, match="comment= applies to .txt"):
        load_prompts(p, comment="#")
