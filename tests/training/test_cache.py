"""Per-item tensor cache: identical read-back, reuse, rebuild on a new fingerprint, damage detection."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from flowalign.training.cache import (
    CachedDataset,
    CacheError,
    StaleCacheError,
    build_cache,
    cache_is_valid,
    ensure_cache,
    fingerprint_module,
)


class Items(Dataset):
    def __init__(self, n: int = 7) -> None:
        g = torch.Generator().manual_seed(0)
        self.pixels = torch.rand(n, 3, 4, 4, generator=g)

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> dict:
        return {"pixels": self.pixels[i], "prompt": f"prompt {i}"}


class CountingEncoder:
    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.net = nn.Conv2d(3, 2, 2, stride=2)
        self.calls = 0

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        self.calls += 1
        return {"latents": self.net(batch["pixels"]), "mean": batch["pixels"].mean(dim=(1, 2, 3))}


def test_cached_items_equal_direct_encoding_across_shards(tmp_path):
    data, enc = Items(7), CountingEncoder()
    fp = fingerprint_module(enc.net, extra="4px")
    cached = ensure_cache(
        data, enc, tmp_path / "c", fingerprint=fp, batch_size=3, shard_size=2, keep_keys=["prompt"]
    )
    assert (
        len(cached) == 7 and enc.calls == 3 and len(list((tmp_path / "c").glob("shard-*.safetensors"))) == 4
    )
    for i in range(7):
        item = cached[i]
        with torch.no_grad():
            direct = enc({"pixels": data.pixels[i : i + 1]})
        assert item["index"] == i and item["prompt"] == f"prompt {i}"
        torch.testing.assert_close(item["latents"], direct["latents"][0], rtol=0, atol=1e-6)
        torch.testing.assert_close(item["mean"], direct["mean"][0], rtol=0, atol=1e-6)
    # a DataLoader worker gets a picklable copy that reopens the shards itself
    copy = pickle.loads(pickle.dumps(cached))
    assert torch.equal(copy[5]["latents"], cached[5]["latents"])
    with pytest.raises(IndexError):
        cached[7]


def test_reuse_and_rebuild_on_a_new_fingerprint(tmp_path):
    data, enc = Items(4), CountingEncoder()
    fp = fingerprint_module(enc.net)
    ensure_cache(data, enc, tmp_path, fingerprint=fp)
    ensure_cache(data, enc, tmp_path, fingerprint=fp)
    assert enc.calls == 1  # second call reused the cache
    changed = CountingEncoder(seed=1)
    fp2 = fingerprint_module(changed.net)
    assert fp2 != fp and fingerprint_module(enc.net) == fp
    assert fingerprint_module(enc.net, extra="8px") != fp
    with pytest.raises(StaleCacheError, match="fingerprint"):
        CachedDataset(tmp_path, fingerprint=fp2)
    rebuilt = ensure_cache(data, changed, tmp_path, fingerprint=fp2)
    assert changed.calls == 1
    with torch.no_grad():
        torch.testing.assert_close(rebuilt[0]["latents"], changed.net(data.pixels[:1])[0], rtol=0, atol=1e-6)
    assert not cache_is_valid(tmp_path, fingerprint=fp2, num_items=5)  # dataset grew: rebuild


def test_damaged_or_missing_cache_files_are_named(tmp_path):
    build_cache(Items(4), CountingEncoder(), tmp_path, fingerprint="x", shard_size=2, dtype=torch.bfloat16)
    assert CachedDataset(tmp_path)[0]["latents"].dtype == torch.bfloat16
    shard = tmp_path / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors: sha256"):
        CachedDataset(tmp_path, verify=True)
    shard.write_bytes(bytes(data[:-5]))
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors: size .*truncated"):
        CachedDataset(tmp_path)
    assert not cache_is_valid(tmp_path, fingerprint="x")
    with pytest.raises(CacheError, match=r"index\.json: missing"):
        CachedDataset(tmp_path / "nowhere")


def test_bad_encoder_output_is_refused_and_leaves_no_cache(tmp_path):
    with pytest.raises(CacheError, match=r"'latents' must be a Tensor \[B=3, \.\.\.\]"):
        build_cache(
            Items(3), lambda b: {"latents": torch.zeros(2)}, tmp_path / "c", fingerprint="x", batch_size=3
        )
    assert not (tmp_path / "c").exists() and not list(tmp_path.iterdir())
    with pytest.raises(CacheError, match=r"item 0 has no key 'caption'"):
        build_cache(Items(3), CountingEncoder(), tmp_path / "c", fingerprint="x", keep_keys=["caption"])
