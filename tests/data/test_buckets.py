"""Resolution buckets for preference pairs: sizes, resize/crop, frame sampling, one bucket per batch,
and the documented behaviour for pairs of two sizes, ties, 1x1 images and short clips."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from flowalign.data.buckets import (
    BucketBatchSampler,
    BucketConfig,
    BucketedPairs,
    bucket_batches,
    bucket_sizes,
    frame_indices,
    media_info,
    nearest_bucket,
    resize_center_crop,
)
from flowalign.data.errors import DataError
from flowalign.data.media import save_image, save_video
from flowalign.data.preference import load_preference_dataset
from flowalign.training.batches import DataCursor
from flowalign.training.runs import PairDataset


def colour_image(seed: int, h: int, w: int) -> torch.Tensor:
    """Random image with values k / 255 (exact through PNG)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g).float() / 255.0


def colour_video(seed: int, t: int, h: int, w: int) -> torch.Tensor:
    """Random clip with values k / 255 (exact through .npy)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (t, 3, h, w), generator=g).float() / 255.0


def _write_pairs(tmp_path: Path, rows: list[tuple[str, str, str]], labels: list[str] | None = None) -> Path:
    lines = []
    for k, (prompt, a, b) in enumerate(rows):
        label = labels[k] if labels else "A"
        lines.append(json.dumps({"prompt": prompt, "path_A": a, "path_B": b, "label": label}))
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _image(tmp_path: Path, name: str, seed: int, h: int, w: int) -> str:
    save_image(colour_image(seed, h, w), tmp_path / name)
    return name


def test_bucket_sizes_area_ratio_and_multiple() -> None:
    sizes = bucket_sizes(1024, aspect_ratios=(1.0, 16 / 9, 9 / 16), multiple=16)
    assert sizes[0] == (1024, 1024)
    for (h, w), r in zip(sizes, (1.0, 16 / 9, 9 / 16), strict=True):
        assert h % 16 == 0 and w % 16 == 0
        # rounding each side to a multiple of 16 moves it by at most 8 px
        assert abs(h - math.sqrt(1024**2 / r)) <= 8 and abs(w - math.sqrt(1024**2 * r)) <= 8
    assert sizes[1] == (768, 1360) and sizes[2] == (1360, 768)
    assert nearest_bucket(1.7, sizes) == (768, 1360) and nearest_bucket(0.9, sizes) == (1024, 1024)


def test_resize_center_crop_exact_cases() -> None:
    img = torch.rand(3, 8, 12)
    # same height, wider: no resampling, the center 8 columns are kept exactly
    assert torch.equal(resize_center_crop(img, 8, 8), img[:, :, 2:10])
    # 2x upscale of a constant image stays that constant; clips keep their frames
    clip = torch.full((2, 3, 4, 4), 0.25)
    out = resize_center_crop(clip, 8, 8)
    assert out.shape == (2, 3, 8, 8) and torch.allclose(out, torch.full_like(out, 0.25), atol=1e-6)


def test_frame_indices_rate_and_short_clip() -> None:
    assert frame_indices(10, 4) == [0, 1, 2, 3]
    assert frame_indices(10, 4, source_fps=24, fps=8) == [0, 3, 6, 9]  # every third frame
    assert frame_indices(9, 4, source_fps=24, fps=8) is None  # frame 9 does not exist
    assert frame_indices(3, 4) is None


def test_bucket_batches_one_bucket_each_and_seeded() -> None:
    keys = ["a"] * 5 + ["b"] * 4 + ["c"]
    batches = bucket_batches(keys, 2, seed=3, epoch=0)
    assert len(batches) == 2 + 2  # a: 5 // 2, b: 4 // 2, c: none
    for b in batches:
        assert len(b) == 2 and len({keys[i] for i in b}) == 1
    assert batches == bucket_batches(keys, 2, seed=3, epoch=0)
    assert batches != bucket_batches(keys, 2, seed=3, epoch=1) or batches != bucket_batches(
        keys, 2, seed=4, epoch=0
    )
    sampler = BucketBatchSampler(keys, 2, seed=3)
    assert len(sampler) == 4 and list(sampler) == batches


def test_mixed_sizes_pair_goes_into_one_bucket(tmp_path: Path) -> None:
    rows = [
        (
            "wide pair of two sizes",
            _image(tmp_path, "w0.png", 0, 64, 112),
            _image(tmp_path, "w1.png", 1, 72, 128),
        ),
        ("square", _image(tmp_path, "s0.png", 2, 64, 64), _image(tmp_path, "s1.png", 3, 80, 80)),
        ("tall", _image(tmp_path, "t0.png", 4, 112, 64), _image(tmp_path, "t1.png", 5, 112, 64)),
    ]
    cfg = BucketConfig(resolution=64, aspect_ratios=[1.0, 16 / 9, 9 / 16], multiple=16)
    data = BucketedPairs(load_preference_dataset(_write_pairs(tmp_path, rows)), cfg)
    assert data.buckets == [(48, 80), (64, 64), (80, 48)]
    for j, (h, w) in enumerate(data.buckets):
        pair = data[j]
        assert pair.media_w.shape == pair.media_l.shape == (3, h, w)
        assert 0.0 <= float(pair.media_w.min()) and float(pair.media_w.max()) <= 1.0


def test_pair_of_two_sizes_without_buckets_names_the_row(tmp_path: Path) -> None:
    rows = [
        ("ok", _image(tmp_path, "a.png", 0, 8, 8), _image(tmp_path, "b.png", 1, 8, 8)),
        ("two sizes", _image(tmp_path, "c.png", 2, 8, 8), _image(tmp_path, "d.png", 3, 8, 16)),
    ]
    data = PairDataset(_write_pairs(tmp_path, rows))
    assert data[0]["media_w"].shape == (3, 8, 8)
    with pytest.raises(DataError, match=r"pairs\.jsonl line 2: the two media of the pair differ in size"):
        data[1]


def test_ties_dropped_by_default_with_count_and_kept_on_request(tmp_path: Path, caplog) -> None:
    rows = [
        (f"p{k}", _image(tmp_path, f"a{k}.png", 2 * k, 8, 8), _image(tmp_path, f"b{k}.png", 2 * k + 1, 8, 8))
        for k in range(3)
    ]
    path = _write_pairs(tmp_path, rows, labels=["A", "tie", "B"])
    with caplog.at_level(logging.WARNING):
        dropped = PairDataset(path, keep_ties=False)
    assert len(dropped) == 2 and dropped.prompts() == ["p0", "p2"]
    assert dropped.pairs.ties_dropped == 1 and "dropped 1 tie rows of 3" in caplog.text
    assert PairDataset(path, keep_ties=True).prompts() == ["p0", "p1", "p2"]


def test_one_by_one_image_is_skipped_and_counted(tmp_path: Path, caplog) -> None:
    rows = [
        ("fine", _image(tmp_path, "a.png", 0, 40, 40), _image(tmp_path, "b.png", 1, 40, 40)),
        ("tiny", _image(tmp_path, "c.png", 2, 1, 1), _image(tmp_path, "d.png", 3, 40, 40)),
    ]
    with caplog.at_level(logging.WARNING):
        data = BucketedPairs(
            load_preference_dataset(_write_pairs(tmp_path, rows)),
            BucketConfig(resolution=32, aspect_ratios=[1.0], min_side=32),
        )
    assert len(data) == 1 and data.prompt(0) == "fine"
    assert sum(data.skipped.values()) == 1 and "skipped 1 of 2 rows" in caplog.text


def _clip(tmp_path: Path, name: str, seed: int, t: int) -> str:
    save_video(colour_video(seed, t, 32, 48), tmp_path / name)
    return name


def test_clips_cut_to_num_frames_and_short_clip_skipped(tmp_path: Path) -> None:
    rows = [
        ("long", _clip(tmp_path, "a.npy", 0, 6), _clip(tmp_path, "b.npy", 1, 5)),
        ("short", _clip(tmp_path, "c.npy", 2, 3), _clip(tmp_path, "d.npy", 3, 6)),
    ]
    assert media_info(tmp_path / "a.npy").frames == 6
    data = BucketedPairs(
        load_preference_dataset(_write_pairs(tmp_path, rows)),
        BucketConfig(resolution=40, aspect_ratios=[1.0, 3 / 2], multiple=8, num_frames=4),
    )
    assert len(data) == 1 and "num_frames=4" in next(iter(data.skipped))
    pair = data[0]
    assert data.buckets == [(4, 32, 48)] and pair.media_w.shape == pair.media_l.shape == (4, 3, 32, 48)
    # same size as the bucket: the first 4 frames, untouched
    assert torch.equal(pair.media_w, colour_video(0, 6, 32, 48)[:4])


def test_short_clip_with_unknown_length_fails_on_load_naming_the_row(tmp_path: Path) -> None:
    rows = [("short", _clip(tmp_path, "a.npy", 0, 3), _clip(tmp_path, "b.npy", 1, 3))]
    data = BucketedPairs(
        load_preference_dataset(_write_pairs(tmp_path, rows)),
        BucketConfig(resolution=32, aspect_ratios=[3 / 2], num_frames=2),
    )
    data.slots[0] = type(data.slots[0])(0, 32, 48, ((0, 1, 2, 3), (0, 1)))  # as if the header had no count
    with pytest.raises(DataError, match=r"line 1: media_w: the clip has 3 frames, fewer than num_frames"):
        data[0]


def test_data_cursor_takes_each_global_batch_from_one_bucket(tmp_path: Path) -> None:
    rows = []
    for k in range(6):
        h, w = (64, 112) if k % 2 else (64, 64)
        rows.append(
            (
                f"p{k}",
                _image(tmp_path, f"a{k}.png", 2 * k, h, w),
                _image(tmp_path, f"b{k}.png", 2 * k + 1, h, w),
            )
        )
    data = PairDataset(
        _write_pairs(tmp_path, rows), buckets=BucketConfig(resolution=64, aspect_ratios=[1.0, 16 / 9])
    )
    cursor = DataCursor(
        data, lambda items: torch.stack([i["media_w"] for i in items]), seed=0, micro_batch=1, accum=3
    )
    shapes = set()
    for _ in range(4):  # two epochs of two global batches
        micro = cursor.next_step()
        assert len({tuple(m.shape) for m in micro}) == 1
        shapes.add(tuple(micro[0].shape))
    assert shapes == {(1, 3, 64, 64), (1, 3, 48, 80)}


def test_hub_id_loader_reads_a_local_datasets_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="the HF datasets package is the data extra")
    folder = tmp_path / "repo"
    (folder / "data").mkdir(parents=True)
    images = [colour_image(k, 8, 8) for k in range(4)]
    for k, img in enumerate(images):
        save_image(img, tmp_path / f"i{k}.png")
    ds = datasets.Dataset.from_dict(
        {
            "caption": ["a", "b"],
            "jpg_0": [(tmp_path / "i0.png").read_bytes(), (tmp_path / "i2.png").read_bytes()],
            "jpg_1": [(tmp_path / "i1.png").read_bytes(), (tmp_path / "i3.png").read_bytes()],
            "label_0": [0.0, 0.5],
            "label_1": [1.0, 0.5],
        }
    )
    ds.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    pairs = load_preference_dataset(f"hf:{folder}", keep_ties=False)
    assert len(pairs) == 1 and torch.equal(pairs[0].media_w, images[1])
    assert pairs.ties_dropped == 1 and pairs[0].source.endswith("row 0")


def test_hub_id_without_datasets_names_the_extra(tmp_path: Path, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"hf:owner/name: .*pip install 'flowalign\[data\]'"):
        load_preference_dataset("hf:owner/name")


def test_media_info_reads_headers_without_decoding(tmp_path: Path) -> None:
    save_image(colour_image(0, 5, 7), tmp_path / "x.png")
    info = media_info(tmp_path / "x.png")
    assert (info.height, info.width, info.is_video) == (5, 7, False)
    np.save(tmp_path / "v.npy", np.zeros((3, 4, 6, 3), dtype=np.uint8))
    info = media_info(tmp_path / "v.npy")
    assert (info.frames, info.height, info.width) == (3, 4, 6)


def test_dpo_pairs_of_multi_dimensional_labels_follow_overall(tmp_path: Path) -> None:
    a, b = _image(tmp_path, "a.png", 0, 8, 8), _image(tmp_path, "b.png", 1, 8, 8)
    c, d = _image(tmp_path, "c.png", 2, 8, 8), _image(tmp_path, "d.png", 3, 8, 8)
    csv = tmp_path / "align.csv"
    csv.write_text(f"prompt,path_A,path_B,VQ,MQ,Overall\np0,{a},{b},A,B,B\np1,{c},{d},A,A,same\n")
    data = PairDataset(csv)
    assert len(data) == 1 and data.pairs.ties_dropped == 1
    assert torch.equal(data[0]["media_w"], colour_image(1, 8, 8))  # Overall = B: B is the chosen one
    csv.write_text(f"prompt,path_A,path_B,VQ,MQ\np0,{a},{b},A,B\n")
    with pytest.raises(DataError, match=r"align\.csv: DPO needs one preference per pair"):
        PairDataset(csv)


def test_clip_sampled_at_a_target_fps_from_its_own_rate(tmp_path: Path) -> None:
    pytest.importorskip("av", reason="mp4 frame counts come from PyAV (the video extra)")
    # 12 frames at 24 fps, frame k a flat grey of level k / 11; at 8 fps every third frame is taken
    levels = torch.linspace(0, 1, 12)
    clip = levels.view(12, 1, 1, 1).expand(12, 3, 32, 48).contiguous()
    save_video(clip, tmp_path / "a.mp4", fps=24)
    save_video(clip.flip(0), tmp_path / "b.mp4", fps=24)
    save_video(clip[:8], tmp_path / "c.mp4", fps=24)
    save_video(clip[:8].flip(0), tmp_path / "d.mp4", fps=24)
    info = media_info(tmp_path / "a.mp4")
    assert (info.height, info.width) == (32, 48) and info.fps == pytest.approx(24)
    rows = [("kept", "a.mp4", "b.mp4"), ("too short at 8 fps", "c.mp4", "d.mp4")]
    cfg = BucketConfig(resolution=40, aspect_ratios=[3 / 2], multiple=8, num_frames=4, fps=8)
    data = BucketedPairs(load_preference_dataset(_write_pairs(tmp_path, rows)), cfg)
    assert len(data) == 1 and sum(data.skipped.values()) == 1
    got = data[0].media_w.mean(dim=(1, 2, 3))
    # each frame is identified by its nearest grey level (levels are 1/11 apart, far above the
    # lossy codec's error on a flat frame): frames 0, 3, 6, 9
    assert (got[:, None] - levels[None]).abs().argmin(dim=1).tolist() == [0, 3, 6, 9]
