"""Typed batches (flowalign.data.batches): collate, coerce, device moves and the latents they give."""

from __future__ import annotations

import pytest
import torch

from flowalign.data.batches import MediaBatch, PairBatch, PromptBatch


def _media_items(n: int = 3, key: str = "pixels") -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            key: torch.rand(3, 4, 4, generator=g),
            "prompt": f"p{i}",
            "index": 10 + i,
            "weight": torch.tensor(0.5 * i),
        }
        for i in range(n)
    ]


def test_media_batch_collates_what_default_collate_gives():
    items = _media_items()
    batch = MediaBatch.collate(items)
    reference = torch.utils.data.default_collate(items)
    assert batch.prompt == reference["prompt"] == ["p0", "p1", "p2"] and len(batch) == 3
    assert batch.index.dtype == torch.long and batch.index.tolist() == [10, 11, 12]
    assert torch.equal(batch.pixels, reference["pixels"]) and torch.equal(batch.weight, reference["weight"])
    assert batch.latents is None
    # a plain mapping (default_collate's dict) reads into the same batch, extra keys ignored
    same = MediaBatch.coerce({**reference, "extra": 1})
    assert torch.equal(same.pixels, batch.pixels) and same.prompt == batch.prompt
    assert MediaBatch.coerce(batch) is batch


def test_clean_latents_read_the_cache_or_encode_without_a_graph():
    cached = MediaBatch.collate(_media_items(key="latents"))
    assert cached.clean_latents(lambda x: pytest.fail("encoded a cached batch")) is cached.latents
    pixels = MediaBatch.collate(_media_items())
    w = torch.ones((), requires_grad=True)
    x0 = pixels.clean_latents(lambda x: 2 * w * x)
    assert torch.equal(x0, 2 * pixels.pixels) and not x0.requires_grad


def test_pair_batch_lays_out_chosen_then_rejected():
    g = torch.Generator().manual_seed(1)
    items = [
        {
            "media_w": torch.rand(3, 2, 2, generator=g),
            "media_l": torch.rand(3, 2, 2, generator=g),
            "prompt": "a",
            "index": i,
        }
        for i in range(2)
    ]
    batch = PairBatch.collate(items)
    x0 = batch.pair_latents(lambda x: x + 1)
    expected = torch.cat(
        [torch.stack([i["media_w"] for i in items]), torch.stack([i["media_l"] for i in items])]
    )
    assert torch.equal(x0, expected + 1)
    cached = PairBatch(
        prompt=["a"], index=torch.tensor([0]), latents_w=torch.zeros(1, 2), latents_l=torch.ones(1, 2)
    )
    assert torch.equal(
        cached.pair_latents(lambda x: pytest.fail("encoded")), torch.tensor([[0.0, 0], [1, 1]])
    )


def test_to_moves_every_tensor_and_keeps_the_prompts():
    batch = MediaBatch.collate(_media_items()).to(torch.device("meta"))
    assert batch.pixels.device.type == batch.index.device.type == batch.weight.device.type == "meta"
    assert batch.prompt == ["p0", "p1", "p2"]


def test_bad_batches_name_what_is_missing():
    with pytest.raises(ValueError, match="got no items"):
        PromptBatch.collate([])
    with pytest.raises(ValueError, match=r"item 1 has no \['pixels', 'weight'\]"):
        MediaBatch.collate([_media_items()[0], {"prompt": "x", "index": 1}])
    with pytest.raises(ValueError, match="needs 'pixels' or 'latents'"):
        MediaBatch.collate([{"prompt": "x", "index": 0}])
    with pytest.raises(ValueError, match="media_w has shape"):
        PairBatch.collate(
            [{"media_w": torch.zeros(3, 2, 2), "media_l": torch.zeros(3, 4, 4), "prompt": "x", "index": 0}]
        )
    with pytest.raises(ValueError, match=r"has no \['index'\]"):
        PairBatch.coerce({"prompt": ["x"], "media_w": torch.zeros(1, 3), "media_l": torch.zeros(1, 3)})
    with pytest.raises(TypeError, match="expected a PairBatch or a mapping"):
        PairBatch.coerce([1, 2])


def _labelled_pairs(names=("VQ", "TA")) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    return [
        {
            "latents_w": torch.rand(2, 3, generator=g),
            "latents_l": torch.rand(2, 3, generator=g),
            "prompt": f"p{i}",
            "index": i,
            "labels": {n: [1, -1, 0, -2][(i + k) % 4] for k, n in enumerate(names)},
        }
        for i in range(3)
    ]


def test_pair_batch_stacks_labels_per_name_and_moves_them():
    batch = PairBatch.collate(_labelled_pairs())
    assert list(batch.labels) == ["VQ", "TA"]
    assert batch.labels["VQ"].tolist() == [1, -1, 0] and batch.labels["TA"].tolist() == [-1, 0, -2]
    assert batch.labels["VQ"].dtype == torch.long and batch.media_w is None
    moved = batch.to(torch.device("meta"))
    assert moved.labels["TA"].device.type == moved.latents_w.device.type == "meta"
    assert batch.labels["TA"].device.type == "cpu"  # a copy: the batch itself stays
    unlabelled = PairBatch.collate(
        [{k: v for k, v in it.items() if k != "labels"} for it in _labelled_pairs()]
    )
    assert unlabelled.labels is None
    mixed = _labelled_pairs()
    mixed[2]["labels"] = {"VQ": 1}
    with pytest.raises(ValueError, match=r"item 2 has labels \['VQ'\], item 0 has \['VQ', 'TA'\]"):
        PairBatch.collate(mixed)


def test_items_of_different_shapes_are_named():
    items = _media_items()
    items[2]["pixels"] = torch.zeros(3, 8, 8)
    with pytest.raises(ValueError, match=r"item 2 pixels has shape \(3, 8, 8\) but item 0 has \(3, 4, 4\)"):
        MediaBatch.collate(items)


def test_unconditional_media_get_empty_prompts():
    items = [{"pixels": torch.full((3, 2, 2), float(i)), "index": i} for i in range(2)]
    with pytest.raises(ValueError, match=r"item 0 has no \['prompt'\]"):
        MediaBatch.collate(items)
    batch = MediaBatch.collate(items, unconditional=True)
    assert batch.prompt == ["", ""] and batch.pixels[:, 0, 0, 0].tolist() == [0.0, 1.0]
    captioned = MediaBatch.collate([{**items[0], "prompt": "a"}, items[1]], unconditional=True)
    assert captioned.prompt == ["a", ""]
    coerced = MediaBatch.coerce({"pixels": batch.pixels, "index": batch.index}, unconditional=True)
    assert coerced.prompt == ["", ""] and torch.equal(coerced.pixels, batch.pixels)
