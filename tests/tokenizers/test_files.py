"""encode_file / decode_file / reconstruct_files: round trips, metrics.json, bad files and trimming."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cdt_testing import make_model

from flowalign.data.media import MediaError, load_image, load_video, save_image, save_video
from flowalign.tokenizers.cdt import encode_video
from flowalign.tokenizers.files import decode_file, encode_file, fit_media, read_latents, reconstruct_files
from flowalign.tokenizers.metrics import psnr


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cdt") / "model"
    make_model("small").save_pretrained(path)
    return path


def _clip(t: int, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    """A clip [T, 3, H, W] in [0, 1] holding multiples of 1/255 (so .npy files store it exactly)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (t, 3, h, w), generator=g) / 255.0).float()


def test_encode_then_decode_files(model_dir, tmp_path):
    clip = _clip(9)
    save_video(clip, tmp_path / "in.npy")
    latent_path = encode_file(model_dir, tmp_path / "in.npy", tmp_path / "in.safetensors")
    z, meta = read_latents(latent_path)
    assert z.shape == (4, 3, 2, 2)
    assert (
        meta["format"] == "flowalign.cdt.latents/1"
        and meta["num_frames"] == "9"
        and meta["trimmed"] == "false"
    )
    # the file holds the model's latents of the clip, chunked or not
    model = make_model("small")
    with torch.no_grad():
        torch.testing.assert_close(z, encode_video(model, clip[None])[0], rtol=1e-4, atol=1e-4)
    encode_file(model_dir, tmp_path / "in.npy", tmp_path / "one.safetensors", chunked=False)
    torch.testing.assert_close(read_latents(tmp_path / "one.safetensors")[0], z, rtol=1e-4, atol=1e-4)
    out = decode_file(model_dir, latent_path, tmp_path / "out.npy", seed=3)
    again = decode_file(model_dir, latent_path, tmp_path / "again.npy", seed=3)
    assert load_video(out).shape == (9, 3, 16, 16)
    assert np.array_equal(np.load(out), np.load(again))


def test_image_round_trip(model_dir, tmp_path):
    save_image(_clip(1)[0], tmp_path / "img.png")
    latent_path = encode_file(model_dir, tmp_path / "img.png", tmp_path / "img.safetensors")
    z, meta = read_latents(latent_path)
    assert z.shape == (4, 1, 2, 2) and meta["is_image"] == "true"
    assert load_image(decode_file(model_dir, latent_path, tmp_path / "rec.png")).shape == (3, 16, 16)


def test_reconstruct_files_writes_outputs_and_metrics(model_dir, tmp_path):
    save_video(_clip(5, seed=1), tmp_path / "a.npy")
    save_video(_clip(9, seed=2), tmp_path / "b.npy")
    save_image(_clip(1, seed=3)[0], tmp_path / "c.png")
    inputs = [tmp_path / "a.npy", tmp_path / "b.npy", tmp_path / "c.png"]
    result = reconstruct_files(model_dir, inputs, tmp_path / "out", lpips="none", video_ext=".npy")
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert [r["num_frames"] for r in result["files"]] == [5, 9, 1] and result["lpips_backbone"] == "none"
    for row, src in zip(result["files"], inputs, strict=True):
        rec = load_video(row["output"]) if row["output"].endswith(".npy") else load_image(row["output"])[None]
        ref = load_video(src) if src.suffix == ".npy" else load_image(src)[None]
        # metrics are computed before 8-bit quantisation; the written file is within rounding of them
        assert abs(float(psnr(rec, ref).mean()) - row["psnr"]) < 0.5
        assert -1 <= row["ssim"] <= 1
    assert result["mean"]["psnr"] == pytest.approx(np.mean([r["psnr"] for r in result["files"]]))


def test_reconstruct_files_with_lpips_module(model_dir, tmp_path):
    from flowalign.tokenizers.metrics import load_lpips

    save_video(_clip(5, 32, 32), tmp_path / "a.npy")
    result = reconstruct_files(
        model_dir,
        [tmp_path / "a.npy"],
        tmp_path / "out",
        lpips=load_lpips("alex", random_backbone=True),
        video_ext=".gif",
    )
    assert result["files"][0]["lpips"] > 0 and "lpips" in result["mean"]
    assert load_video(result["files"][0]["output"]).shape[1:] == (3, 32, 32)


@pytest.mark.parametrize(
    ("frames", "size", "match"), [(6, 16, "6 frames"), (9, 20, "size 20x20"), (4, 12, "4 frames.*12x12")]
)
def test_misfit_media_are_refused_naming_the_file(model_dir, tmp_path, frames, size, match):
    save_video(_clip(frames, size, size), tmp_path / "bad.npy")
    with pytest.raises(MediaError, match=rf"bad\.npy.*{match}"):
        encode_file(model_dir, tmp_path / "bad.npy", tmp_path / "z.safetensors")
    assert not (tmp_path / "z.safetensors").exists()
    with pytest.raises(MediaError, match=r"bad\.npy"):
        reconstruct_files(model_dir, [tmp_path / "bad.npy"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_trim_cuts_to_the_longest_fitting_clip(model_dir, tmp_path):
    clip = _clip(8, 21, 19)
    save_video(clip, tmp_path / "odd.npy")
    z, meta = read_latents(
        encode_file(model_dir, tmp_path / "odd.npy", tmp_path / "z.safetensors", trim=True)
    )
    assert z.shape == (4, 2, 2, 2) and meta["trimmed"] == "true"
    assert (meta["num_frames"], meta["height"], meta["width"]) == ("5", "16", "16")
    cut, trimmed = fit_media(clip, time_factor=4, space_factor=8, trim=True, source="x")
    assert trimmed and torch.equal(cut, clip[:5, :, 2:18, 1:17])
    with pytest.raises(MediaError, match="at least 8"):
        fit_media(_clip(5, 4, 16), time_factor=4, space_factor=8, trim=True, source="x")


def test_unreadable_and_missing_files(model_dir, tmp_path):
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all")
    with pytest.raises(MediaError, match=r"junk\.mp4"):
        encode_file(model_dir, tmp_path / "junk.mp4", tmp_path / "z.safetensors")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        encode_file(tmp_path, tmp_path / "junk.mp4", tmp_path / "z.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(MediaError, match=r"junk\.safetensors.*not a readable"):
        decode_file(model_dir, tmp_path / "junk.safetensors", tmp_path / "out.npy")
    with pytest.raises(MediaError, match="not found"):
        read_latents(tmp_path / "missing.safetensors")


def test_decode_refuses_wrong_latents_and_outputs(model_dir, tmp_path):
    from safetensors.torch import save_file

    save_file({"other": torch.zeros(4, 2, 2, 2)}, str(tmp_path / "k.safetensors"))
    with pytest.raises(MediaError, match="no 'latents'"):
        decode_file(model_dir, tmp_path / "k.safetensors", tmp_path / "o.npy")
    save_file({"latents": torch.zeros(7, 2, 2, 2)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(MediaError, match="7 channels"):
        decode_file(model_dir, tmp_path / "c.safetensors", tmp_path / "o.npy")
    save_file({"latents": torch.zeros(4, 2, 2, 2)}, str(tmp_path / "v.safetensors"))
    with pytest.raises(MediaError, match="cannot save 5 frames as an image"):
        decode_file(model_dir, tmp_path / "v.safetensors", tmp_path / "o.png")


def test_latent_files_must_be_safetensors(model_dir, tmp_path):
    save_video(_clip(5), tmp_path / "in.npy")
    with pytest.raises(ValueError, match=r"must end in \.safetensors"):
        encode_file(model_dir, tmp_path / "in.npy", tmp_path / "z.pt")
