"""Fuzzed media files: truncated, zero-size, bit-flipped, mislabelled, random, and decompression bombs.

Every file either decodes to a float tensor in [0, 1] of the documented layout, or raises one
``MediaError`` (a ``DataError``) whose message starts with the path. Nothing else escapes (no PIL,
PyAV, numpy or torch error) and nothing hangs: each case must finish within a few seconds.
"""

from __future__ import annotations

import io
import struct
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import rel_summary
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowalign.data.media import (
    MAX_IMAGE_PIXELS,
    MediaError,
    decode_image_bytes,
    load_media,
    save_image,
    save_video,
)

CI = settings.get_profile("flowalign-ci")
SLOW = settings.get_profile("flowalign-slow")
CASE_SECONDS = 20.0


def _samples() -> dict[str, bytes]:
    """One small valid file of every supported kind, as bytes keyed by extension."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 12, 10, generator=g)
    video = torch.rand(3, 3, 8, 8, generator=g)
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for ext in (".png", ".jpg", ".webp", ".bmp"):
            save_image(image, Path(d) / f"x{ext}")
            out[ext] = (Path(d) / f"x{ext}").read_bytes()
        for ext in (".gif", ".npy", ".mp4"):
            save_video(video, Path(d) / f"x{ext}")
            out[ext] = (Path(d) / f"x{ext}").read_bytes()
    float_npy = io.BytesIO()
    np.save(float_npy, np.random.default_rng(0).random((2, 3, 4, 4), dtype=np.float32))
    out[".npy-float"] = float_npy.getvalue()
    return out


SAMPLES = _samples()
EXTENSIONS = [
    ".png",
    ".jpg",
    ".jpeg",
    ".webp",
    ".bmp",
    ".gif",
    ".npy",
    ".mp4",
    ".webm",
    ".mov",
    ".mkv",
    ".txt",
    "",
]


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb's signature) with one tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _bmp_header(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 16, 0, 0, 54) + info + b"\x00" * 16


def _gif_header(width: int, height: int) -> bytes:
    return (
        b"GIF89a"
        + struct.pack("<HHBBB", width, height, 0, 0, 0)
        + b",\x00\x00\x00\x00"
        + struct.pack("<HH", width, height)
        + b"\x00\x02\x02D\x01\x00;"
    )


def _npy_header(shape: tuple[int, ...], dtype: str = "|u1") -> bytes:
    header = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\x00" * 64


@st.composite
def media_files(draw) -> tuple[bytes, str, str]:
    """(content, extension, how it was made)."""
    how = draw(st.sampled_from(["valid", "truncated", "flipped", "empty", "renamed", "random", "bomb"]))
    source = draw(st.sampled_from(sorted(SAMPLES)))
    data = SAMPLES[source]
    ext = ".npy" if source == ".npy-float" else source
    if how == "truncated":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif how == "flipped":
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] ^= draw(st.integers(1, 255))
        data = bytes(data)
    elif how == "empty":
        data = b""
    elif how == "renamed":  # content of one kind under another kind's (or no) extension
        ext = draw(st.sampled_from(EXTENSIONS))
    elif how == "random":
        data, ext = draw(st.binary(min_size=1, max_size=256)), draw(st.sampled_from(EXTENSIONS))
    elif how == "bomb":
        side = draw(st.sampled_from([8193, 30_000, 65_535, 2**31 - 1]))
        kind = draw(st.sampled_from(["png", "bmp", "gif", "npy", "npy-float"]))
        if kind == "png":
            data, ext = _png_header(side, side), ".png"
        elif kind == "bmp":
            data, ext = _bmp_header(side, side), ".bmp"
        elif kind == "gif":
            data, ext = _gif_header(min(side, 65_535), min(side, 65_535)), ".gif"
        else:
            shape = (1000, side, side, 3) if kind == "npy" else (1000, 3, side, side)
            data, ext = _npy_header(shape, "|u1" if kind == "npy" else "<f4"), ".npy"
    return data, ext, how


def _run_media_case(data: bytes, ext: str, how: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"m{ext}"
        path.write_bytes(data)
        start = time.monotonic()
        try:
            media = load_media(path, max_frames=8)
        except MediaError as err:
            assert str(err).startswith(str(path)), str(err)[:300]
            outcome = "refused"
        else:
            assert media.dtype == torch.float32 and media.ndim in (3, 4) and media.shape[-3] == 3
            assert torch.isfinite(media).all() and 0 <= float(media.min()) and float(media.max()) <= 1
            assert media.shape[-1] * media.shape[-2] <= MAX_IMAGE_PIXELS
            outcome = "decoded"
        assert time.monotonic() - start < CASE_SECONDS, "decoding took too long (a hang or a bomb)"
    rel_summary.count("fuzz", "media files (image/video)")
    rel_summary.count("fuzz", f"media files (image/video): {outcome}")
    if how == "bomb":
        assert outcome == "refused"
        rel_summary.count("fuzz", "media files (image/video): decompression bombs refused")
    return outcome


@pytest.mark.timeout(300)
@given(case=media_files())
@settings(CI, max_examples=50)
def test_media_files_decode_or_name_the_file(case):
    _run_media_case(*case)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@given(case=media_files())
@settings(SLOW)
def test_media_files_many(case):
    _run_media_case(*case)


@pytest.mark.parametrize("ext", [".png", ".bmp", ".gif"])
def test_decompression_bombs_are_refused_from_the_header(tmp_path, ext):
    side = 100_000
    maker = {".png": _png_header, ".bmp": _bmp_header, ".gif": _gif_header}[ext]
    path = tmp_path / f"bomb{ext}"
    path.write_bytes(maker(min(side, 65_535), min(side, 65_535)))
    start = time.monotonic()
    with pytest.raises(MediaError, match=r"bomb"):
        load_media(path)
    assert time.monotonic() - start < 5
    rel_summary.count("loading", "decompression-bomb headers refused before decoding")


@given(
    data=st.one_of(
        st.binary(max_size=128),
        st.sampled_from(
            [SAMPLES[".png"], SAMPLES[".jpg"], SAMPLES[".gif"], _png_header(70_000, 70_000)]
        ).flatmap(lambda b: st.integers(0, len(b)).map(lambda n: b[:n])),
    )
)
@settings(CI, max_examples=40)
def test_image_bytes_decode_or_name_the_source(data):
    """Parquet cells (Pick-a-Pic's jpg_0/jpg_1) are decoded from bytes: same contract, named by source."""
    try:
        image = decode_image_bytes(data, source="pairs.parquet row 3 jpg_0")
    except MediaError as err:
        assert str(err).startswith("pairs.parquet row 3 jpg_0: ")
    else:
        assert image.ndim == 3 and image.shape[0] == 3 and 0 <= float(image.min()) <= float(image.max()) <= 1
    rel_summary.count("fuzz", "encoded image bytes (parquet cells)")
