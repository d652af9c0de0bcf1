"""Tests for flowalign.data.media: round trips, dispatch, atomic writes and every bad input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowalign.data import images, videos
from flowalign.data.media import (
    MediaError,
    atomic_write,
    decode_image_bytes,
    load_image,
    load_media,
    load_video,
    save_image,
    save_media,
    save_video,
)


def _uint8_image(seed: int, h: int = 8, w: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g).float() / 255.0  # [3, H, W]


def _palette_video(t: int = 3, h: int = 8, w: int = 8, colours: int = 16) -> torch.Tensor:
    """Frames drawn from a few colours, so a GIF palette can hold them exactly."""
    g = torch.Generator().manual_seed(1)
    palette = torch.randint(0, 256, (colours, 3), generator=g)
    idx = torch.randint(0, colours, (t, h, w), generator=g)
    return palette[idx].permute(0, 3, 1, 2).float() / 255.0  # [T, 3, H, W]


def _smooth_video(t: int = 4, h: int = 32, w: int = 32) -> torch.Tensor:
    """Slowly moving gradients: what a lossy codec reproduces well."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    frames = [torch.stack([xx, yy, (0.5 + 0.4 * torch.sin(6 * xx + 0.3 * k)) * 0.9]) for k in range(t)]
    return torch.stack(frames).clamp(0, 1)  # [T, 3, H, W]


def _assert_names(exc: pytest.ExceptionInfo, path: Path | str) -> None:
    assert str(path) in str(exc.value)


# ----------------------------------------------------------------------------- images


def test_png_round_trip_is_exact_at_uint8(tmp_path: Path) -> None:
    x = _uint8_image(0, 8, 12)
    save_image(x, tmp_path / "a.png")
    y = load_image(tmp_path / "a.png")
    assert y.dtype == torch.float32 and y.shape == (3, 8, 12)
    assert torch.equal(y, x)


def test_save_image_rounds_to_nearest_uint8(tmp_path: Path) -> None:
    x = torch.full((3, 2, 2), 100.4 / 255.0)
    save_image(x, tmp_path / "r.png")
    assert torch.equal(load_image(tmp_path / "r.png"), torch.full((3, 2, 2), 100 / 255.0))


def test_grayscale_and_rgba_become_rgb(tmp_path: Path) -> None:
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    g = load_image(tmp_path / "g.png")
    assert g.shape == (3, 8, 8)
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    assert torch.equal(g[0], torch.from_numpy(gray).float() / 255.0)

    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent red: alpha is dropped, not composited
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "t.png")
    t = load_image(tmp_path / "t.png")
    assert t.shape == (3, 4, 4)
    assert torch.allclose(t[0], torch.full((4, 4), 200 / 255.0))


def test_16bit_grayscale_uses_full_range(tmp_path: Path) -> None:
    arr = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "d.png")
    y = load_image(tmp_path / "d.png")
    assert torch.allclose(y[0], torch.from_numpy(arr.astype(np.float32) / 65535.0))


def test_jpeg_round_trip_close(tmp_path: Path) -> None:
    x = _smooth_video(1, 16, 16)[0]
    save_image(x, tmp_path / "a.jpg")
    assert (load_image(tmp_path / "a.jpg") - x).abs().mean() < 0.02


def test_decode_image_bytes_matches_file(tmp_path: Path) -> None:
    x = _uint8_image(3)
    save_image(x, tmp_path / "b.png")
    assert torch.equal(decode_image_bytes((tmp_path / "b.png").read_bytes(), source="cell"), x)


# ----------------------------------------------------------------------------- videos


def test_gif_round_trip_exact_with_few_colours(tmp_path: Path) -> None:
    v = _palette_video()
    save_video(v, tmp_path / "a.gif", fps=8)
    y = load_video(tmp_path / "a.gif")
    assert y.shape == v.shape
    assert torch.equal(y, v)


def test_mp4_round_trip_lossy_within_tolerance(tmp_path: Path) -> None:
    v = _smooth_video(4, 32, 32)
    save_video(v, tmp_path / "a.mp4", fps=8)
    y = load_video(tmp_path / "a.mp4")
    assert y.shape == v.shape  # right frame count and never resized
    assert y.dtype == torch.float32 and 0.0 <= float(y.min()) and float(y.max()) <= 1.0
    assert (y - v).abs().mean() < 0.02


@pytest.mark.parametrize("hw", [(32, 40), (30, 26), (15, 17)])
def test_mp4_keeps_exact_size(tmp_path: Path, hw: tuple[int, int]) -> None:
    v = _smooth_video(2, *hw)
    save_video(v, tmp_path / "s.mp4")
    y = load_video(tmp_path / "s.mp4")
    assert y.shape == v.shape
    assert (y - v).abs().mean() < 0.03


def test_npy_layouts(tmp_path: Path) -> None:
    v = _palette_video(3, 5, 7)
    thwc = (v * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [T, H, W, 3]
    np.save(tmp_path / "u.npy", thwc)
    np.save(tmp_path / "f.npy", v.numpy().astype(np.float64))  # [T, 3, H, W]
    assert torch.equal(load_video(tmp_path / "u.npy"), v)
    assert torch.equal(load_video(tmp_path / "f.npy"), v)
    save_video(v, tmp_path / "w.npy")
    assert torch.equal(load_video(tmp_path / "w.npy"), v)


@pytest.mark.parametrize("name", ["a.gif", "a.npy", "a.mp4"])
def test_max_frames_keeps_the_first_frames(tmp_path: Path, name: str) -> None:
    v = _palette_video(4, 8, 8) if not name.endswith(".mp4") else _smooth_video(4, 16, 16)
    save_video(v, tmp_path / name)
    full = load_video(tmp_path / name)
    two = load_video(tmp_path / name, max_frames=2)
    assert two.shape[0] == 2
    assert torch.equal(two, full[:2])


def test_max_frames_must_be_positive(tmp_path: Path) -> None:
    save_video(_palette_video(), tmp_path / "a.npy")
    with pytest.raises(ValueError, match="max_frames"):
        load_video(tmp_path / "a.npy", max_frames=0)


def test_load_media_and_save_media_dispatch(tmp_path: Path) -> None:
    img, vid = _uint8_image(5), _palette_video()
    save_media(img, tmp_path / "i.png")
    save_media(vid, tmp_path / "v.gif")
    assert torch.equal(load_media(tmp_path / "i.png"), img)
    assert torch.equal(load_media(tmp_path / "v.gif"), vid)
    assert load_media(tmp_path / "v.gif", max_frames=1).shape == (1, 3, 8, 8)
    with pytest.raises(MediaError, match="shape"):
        save_media(img[0], tmp_path / "x.png")


def test_pyav_and_ffmpeg_backends_agree(tmp_path: Path) -> None:
    pytest.importorskip("av", reason="PyAV is optional (the [video] extra); the ffmpeg backend is tested")
    v = _smooth_video(3, 16, 16)
    save_video(v, tmp_path / "a.mp4")
    a = videos._read_pyav(tmp_path / "a.mp4", None)
    b = videos._read_ffmpeg(tmp_path / "a.mp4", None)
    assert len(a) == len(b) == 3
    for fa, fb in zip(a, b, strict=True):
        assert np.abs(fa.astype(int) - fb.astype(int)).mean() < 2.0


# ----------------------------------------------------------------------------- atomic writes


def test_atomic_write_keeps_old_file_on_error(tmp_path: Path) -> None:
    dest = tmp_path / "keep.png"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_write(dest) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("boom")
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.png"]


def test_saves_leave_no_temporary_files_and_create_parents(tmp_path: Path) -> None:
    save_image(_uint8_image(1), tmp_path / "sub" / "a.png")
    save_video(_smooth_video(2, 16, 16), tmp_path / "sub" / "b.mp4")
    save_video(_palette_video(), tmp_path / "sub" / "c.gif")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["a.png", "b.mp4", "c.gif"]


def test_failed_save_keeps_existing_file(tmp_path: Path) -> None:
    dest = tmp_path / "a.png"
    save_image(_uint8_image(1), dest)
    before = dest.read_bytes()
    with pytest.raises(MediaError):
        save_image(torch.full((3, 8, 8), 2.0), dest)
    assert dest.read_bytes() == before


# ----------------------------------------------------------------------------- bad input: reading


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.png"
    with pytest.raises(MediaError, match="does not exist") as exc:
        load_image(p)
    _assert_names(exc, p)


def test_zero_size_image(tmp_path: Path) -> None:
    p = tmp_path / "empty.png"
    p.touch()
    with pytest.raises(MediaError, match="empty") as exc:
        load_image(p)
    _assert_names(exc, p)


def test_zero_size_video(tmp_path: Path) -> None:
    p = tmp_path / "empty.mp4"
    p.touch()
    with pytest.raises(MediaError, match="empty") as exc:
        load_video(p)
    _assert_names(exc, p)


def test_truncated_png(tmp_path: Path) -> None:
    src = tmp_path / "full.png"
    save_image(_uint8_image(2, 32, 32), src)
    p = tmp_path / "trunc.png"
    p.write_bytes(src.read_bytes()[:200])
    with pytest.raises(MediaError, match="truncated or corrupt") as exc:
        load_image(p)
    _assert_names(exc, p)


def test_unreadable_bytes(tmp_path: Path) -> None:
    p = tmp_path / "junk.png"
    p.write_bytes(b"this is not an image at all")
    with pytest.raises(MediaError, match="cannot decode") as exc:
        load_image(p)
    _assert_names(exc, p)


def test_unsupported_extension(tmp_path: Path) -> None:
    p = tmp_path / "a.txt"
    p.write_text("hello")
    with pytest.raises(MediaError, match="unsupported image extension") as exc:
        load_image(p)
    _assert_names(exc, p)
    with pytest.raises(MediaError, match="unsupported extension") as exc:
        load_media(p)
    _assert_names(exc, p)


def test_content_not_matching_extension(tmp_path: Path) -> None:
    p = tmp_path / "really_jpeg.png"
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="JPEG")
    p.write_bytes(buf.getvalue())
    with pytest.raises(MediaError, match="content is JPEG") as exc:
        load_image(p)
    _assert_names(exc, p)


def test_decompression_bomb_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "big.png"
    save_image(_uint8_image(0, 16, 16), p)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(MediaError, match="MAX_IMAGE_PIXELS") as exc:
        load_image(p)
    _assert_names(exc, p)


def test_image_bytes_empty_and_junk() -> None:
    with pytest.raises(MediaError, match="row 3: image bytes are empty"):
        decode_image_bytes(b"", source="row 3")
    with pytest.raises(MediaError, match="row 4: cannot decode"):
        decode_image_bytes(b"junk", source="row 4")


def test_truncated_gif(tmp_path: Path) -> None:
    src = tmp_path / "full.gif"
    save_video(_palette_video(3, 16, 16), src)
    p = tmp_path / "trunc.gif"
    p.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(MediaError, match="truncated or corrupt") as exc:
        load_video(p)
    _assert_names(exc, p)


def test_garbage_mp4(tmp_path: Path) -> None:
    p = tmp_path / "junk.mp4"
    p.write_bytes(b"\x00\x01 not a video" * 20)
    with pytest.raises(MediaError, match="cannot decode video") as exc:
        load_video(p)
    _assert_names(exc, p)


def test_npy_zero_frames(tmp_path: Path) -> None:
    p = tmp_path / "zero.npy"
    np.save(p, np.zeros((0, 4, 4, 3), dtype=np.uint8))
    with pytest.raises(MediaError, match="zero frames") as exc:
        load_video(p)
    _assert_names(exc, p)


def test_npy_wrong_rank(tmp_path: Path) -> None:
    p = tmp_path / "rank3.npy"
    np.save(p, np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(MediaError, match="4-D array") as exc:
        load_video(p)
    _assert_names(exc, p)


def test_npy_uint8_wrong_layout(tmp_path: Path) -> None:
    p = tmp_path / "chw.npy"
    np.save(p, np.zeros((2, 3, 4, 4), dtype=np.uint8))
    with pytest.raises(MediaError, match=r"uint8 arrays must be \[T,H,W,3\]") as exc:
        load_video(p)
    _assert_names(exc, p)


def test_npy_float_out_of_range(tmp_path: Path) -> None:
    p = tmp_path / "range.npy"
    np.save(p, np.full((2, 3, 4, 4), 1.5, dtype=np.float32))
    with pytest.raises(MediaError, match=r"\[0, 1\]") as exc:
        load_video(p)
    _assert_names(exc, p)


def test_npy_bad_dtype(tmp_path: Path) -> None:
    p = tmp_path / "int.npy"
    np.save(p, np.zeros((2, 4, 4, 3), dtype=np.int32))
    with pytest.raises(MediaError, match="unsupported dtype") as exc:
        load_video(p)
    _assert_names(exc, p)


def test_npy_pickled_object_refused(tmp_path: Path) -> None:
    p = tmp_path / "obj.npy"
    np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(MediaError, match="cannot read .npy") as exc:
        load_video(p)
    _assert_names(exc, p)


# ----------------------------------------------------------------------------- bad input: writing


def test_save_image_rejects_bad_tensors(tmp_path: Path) -> None:
    p = tmp_path / "x.png"
    with pytest.raises(MediaError, match=r"\[3, H, W\]") as exc:
        save_image(torch.zeros(4, 8, 8), p)
    _assert_names(exc, p)
    with pytest.raises(MediaError, match=r"\[0, 1\]"):
        save_image(torch.full((3, 4, 4), -0.1), p)
    with pytest.raises(MediaError, match="NaN"):
        save_image(torch.full((3, 4, 4), float("nan")), p)
    with pytest.raises(MediaError, match="float tensor"):
        save_image(torch.zeros(3, 4, 4, dtype=torch.uint8), p)
    assert not p.exists()


def test_save_rejects_unsupported_extensions(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="cannot save an image"):
        save_image(_uint8_image(0), tmp_path / "a.gif")
    with pytest.raises(MediaError, match="cannot save a video"):
        save_video(_palette_video(), tmp_path / "a.avi")
    with pytest.raises(MediaError, match=r"\[T, 3, H, W\]"):
        save_video(torch.zeros(0, 3, 4, 4), tmp_path / "a.mp4")
