"""score_files: manifest / folder / list inputs, incremental resumable output, parquet, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flowalign.data.media import MediaError, load_media, save_image, save_video
from flowalign.rewards import load_reward
from flowalign.rewards.scoring import read_score_rows, resolve_media, score_files
from flowalign.toy.render import render_images, render_videos
from flowalign.toy.world import sample_scenes


def _write_images(folder: Path, num: int, *, size: int = 32, seed: int = 0) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    scenes = sample_scenes(num, seed=seed, split="train", kind="image")
    rows = []
    for i, (scene, image) in enumerate(zip(scenes, render_images(scenes, size=size), strict=True)):
        name = f"img_{seed}_{i:03d}.png"
        save_image(image, folder / name)
        rows.append({"id": f"s{seed}-{i}", "prompt": scene.caption, "file": name, "seed": i})
    return rows


def _manifest(folder: Path, rows: list[dict]) -> Path:
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def toy_set(tmp_path) -> tuple[Path, list[dict]]:
    rows = _write_images(tmp_path / "media", 5)
    return _manifest(tmp_path / "media", rows), rows


def _direct(rows: list[dict], folder: Path) -> dict[str, torch.Tensor]:
    media = torch.stack([load_media(folder / r["file"]) for r in rows])
    return load_reward("toy").score(media, [r["prompt"] for r in rows])


def test_manifest_scores_match_direct_scoring(toy_set, tmp_path):
    manifest, rows = toy_set
    out = tmp_path / "scores.jsonl"
    result = score_files(["toy"], manifest, out=out, batch_size=2, progress=False)
    assert (result.num_scored, result.num_skipped) == (5, 0)
    written = read_score_rows(out)
    assert [r["id"] for r in written] == [r["id"] for r in rows]
    assert all(
        r["rewards"] == ["toy"] and r["prompt"] == m["prompt"] for r, m in zip(written, rows, strict=True)
    )
    direct = _direct(rows, manifest.parent)
    for key in ("vq", "ta", "vq_norm", "overall"):
        expected = direct[key.removesuffix("_norm")] if key != "overall" else direct["vq"] + direct["ta"]
        torch.testing.assert_close(torch.tensor([r[key] for r in written]), expected)
    assert result.means()["ta"] == pytest.approx(float(direct["ta"].mean()))


def test_rerun_skips_and_interrupted_run_resumes(toy_set, tmp_path):
    manifest, rows = toy_set
    out = tmp_path / "scores.jsonl"
    score_files(["toy"], manifest, out=out, progress=False)
    lines = out.read_text().splitlines()
    again = score_files(["toy"], manifest, out=out, progress=False)
    assert (again.num_scored, again.num_skipped) == (0, 5) and out.read_text().splitlines() == lines
    # Simulate a crash after two rows and half of the third.
    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])
    resumed = score_files(["toy"], manifest, out=out, progress=False)
    assert (resumed.num_scored, resumed.num_skipped) == (3, 2)
    assert out.read_text().splitlines() == lines


def test_folder_with_prompt_list_and_mixed_sizes(tmp_path):
    rows = _write_images(tmp_path / "m", 3, size=32, seed=0) + _write_images(
        tmp_path / "m", 2, size=48, seed=1
    )
    prompts = [r["prompt"] for r in sorted(rows, key=lambda r: r["file"])]
    result = score_files(
        ["toy"], tmp_path / "m", prompts, out=tmp_path / "s.jsonl", batch_size=4, progress=False
    )
    assert [r["id"] for r in result.rows] == sorted(r["file"] for r in rows)
    for row in result.rows:  # each batch held one image size; scores equal per-item scoring
        single = load_reward("toy").score(load_media(row["file"])[None], [row["prompt"]])
        assert row["ta"] == pytest.approx(float(single["ta"][0])) and row["vq"] == pytest.approx(
            float(single["vq"][0])
        )


def test_prompt_count_mismatch_names_both_counts(tmp_path):
    _write_images(tmp_path / "m", 3)
    with pytest.raises(ValueError, match="got 2 prompts for 3 media files"):
        score_files(["toy"], tmp_path / "m", ["a", "b"], out=tmp_path / "s.jsonl", progress=False)
    with pytest.raises(ValueError, match="prompts come from the manifest"):
        resolve_media(_manifest(tmp_path / "m", [{"id": "1", "prompt": "p", "file": "x.png"}]), ["p"])


def test_unknown_reward_and_unknown_weight_are_refused(toy_set, tmp_path):
    manifest, _ = toy_set
    with pytest.raises(
        ValueError, match=r"unknown reward\(s\) \['no_such_reward'\]; available rewards: .*pickscore"
    ):
        score_files(["no_such_reward"], manifest, out=tmp_path / "s.jsonl", progress=False)
    with pytest.raises(ValueError, match=r"\['mq2'\].*available dimensions: vq, mq, ta"):
        score_files(["toy"], manifest, weights={"mq2": 1.0}, out=tmp_path / "s.jsonl", progress=False)
    assert not (tmp_path / "s.jsonl").exists()


def test_missing_and_corrupt_media_name_the_file_and_keep_written_rows(toy_set, tmp_path):
    manifest, rows = toy_set
    missing = _manifest(
        manifest.parent, [*rows, {"id": "x", "prompt": rows[0]["prompt"], "file": "gone.png"}]
    )
    with pytest.raises(MediaError, match="gone.png"):
        score_files(["toy"], missing, out=tmp_path / "a.jsonl", progress=False)
    (manifest.parent / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    broken = _manifest(
        manifest.parent, [*rows[:3], {"id": "b", "prompt": rows[0]["prompt"], "file": "broken.png"}]
    )
    out = tmp_path / "b.jsonl"
    with pytest.raises(MediaError, match="broken.png"):
        score_files(["toy"], broken, out=out, batch_size=1, progress=False)
    assert [r["id"] for r in read_score_rows(out)] == [r["id"] for r in rows[:3]]


def test_manifest_errors_name_the_line(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"id": "a", "prompt": "p", "file": "a.png"}\n{"id": "b", "file": "b.png"}\n')
    with pytest.raises(ValueError, match=r"manifest.jsonl: line 2 lacks key\(s\) \['prompt'\]"):
        resolve_media(path)
    path.write_text(
        '{"id": "a", "prompt": "p", "file": "a.png"}\n{"id": "a", "prompt": "q", "file": "b.png"}\n'
    )
    with pytest.raises(ValueError, match="line 2: id 'a' appears twice"):
        resolve_media(path)


def test_corrupt_scores_file_and_other_rewards_are_refused(toy_set, tmp_path):
    manifest, _ = toy_set
    out = tmp_path / "s.jsonl"
    out.write_text('{"id": "s0-0", "vq": 1}\nnot json\n{"id": "s0-1"}\n')
    with pytest.raises(ValueError, match=r"s.jsonl: line 2 is not valid JSON"):
        score_files(["toy"], manifest, out=out, progress=False)
    out.write_text('{"id": "s0-0", "rewards": ["pickscore"], "pickscore": 20.0}\n')
    with pytest.raises(ValueError, match=r"scored with rewards \['pickscore'\], not \['toy'\]"):
        score_files(["toy"], manifest, out=out, progress=False)


def test_parquet_output_equals_jsonl_and_resumes(toy_set, tmp_path):
    import pyarrow.parquet as pq

    manifest, _ = toy_set
    as_jsonl = score_files(["toy"], manifest, out=tmp_path / "s.jsonl", progress=False).rows
    out = tmp_path / "s.parquet"
    result = score_files(["toy"], manifest, out=out, progress=False)
    assert pq.read_table(out).to_pylist() == as_jsonl == result.rows
    assert not (tmp_path / "s.parquet.partial.jsonl").exists()
    again = score_files(["toy"], manifest, out=out, progress=False)
    assert again.num_skipped == 5 and again.rows == as_jsonl


def test_videos_and_two_rewards_with_weights(tmp_path, open_clip_dir):
    folder = tmp_path / "v"
    folder.mkdir()
    scenes = sample_scenes(3, seed=4, split="train", kind="video")
    rows = []
    for i, (scene, video) in enumerate(zip(scenes, render_videos(scenes, num_frames=5), strict=True)):
        save_video(video, folder / f"{i}.npy")  # exact uint8 frames
        rows.append({"id": str(i), "prompt": scene.caption, "file": f"{i}.npy"})
    result = score_files(
        ["toy", "clip"],
        _manifest(folder, rows),
        weights={"mq": 2.0, "clip": 0.5},
        normalisation={"clip": (10.0, 5.0)},
        reward_kwargs={"clip": {"model": f"local-dir:{open_clip_dir}"}},
        out=tmp_path / "s.jsonl",
        progress=False,
    )
    videos = torch.stack([load_media(folder / r["file"]) for r in rows])
    prompts = [r["prompt"] for r in rows]
    clip = load_reward("clip", model=f"local-dir:{open_clip_dir}").score(videos, prompts)["clip"]
    mq = load_reward("toy").score(videos, prompts)["mq"]
    got = {k: torch.tensor([r[k] for r in result.rows]) for k in ("mq", "clip", "clip_norm", "overall")}
    torch.testing.assert_close(got["mq"], mq)
    torch.testing.assert_close(got["clip_norm"], (clip - 10.0) / 5.0)
    torch.testing.assert_close(got["overall"], 2 * mq + 0.5 * (clip - 10.0) / 5.0)
    assert result.dimensions == ("vq", "mq", "ta", "clip")
