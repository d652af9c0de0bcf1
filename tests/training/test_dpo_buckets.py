"""A DPO run on preference pairs of mixed sizes trains through aspect-ratio buckets."""

from __future__ import annotations

import json
import math

import torch

from flowalign.config import LoraConfig, TrainConfig
from flowalign.data.buckets import BucketConfig
from flowalign.data.media import save_image
from flowalign.training.methods.dpo import FlowDPO
from flowalign.training.runs import DPORun, run_dpo


def _pairs(tmp_path) -> str:
    g = torch.Generator().manual_seed(0)
    rows = []
    for k, (h, w) in enumerate([(32, 32), (40, 40), (32, 56), (36, 64), (30, 30)]):
        for side in "AB":
            save_image(torch.rand(3, h, w, generator=g), tmp_path / f"{k}{side}.png")
        label = "tie" if k == 4 else "A"
        rows.append({"prompt": f"shape {k}", "path_A": f"{k}A.png", "path_B": f"{k}B.png", "label": label})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_mixed_size_pairs_train_through_buckets(tiny_model_dir, tmp_path, monkeypatch):
    run = DPORun(
        model=str(tiny_model_dir("sd3")),
        data=_pairs(tmp_path),
        train=TrainConfig(
            output_dir=tmp_path / "run", max_steps=2, batch_size=2, cpu=True, trackers=[], log_every=1
        ),
        lora=LoraConfig(rank=4, export_merged=False),
        buckets=BucketConfig(resolution=32, aspect_ratios=[1.0, 16 / 9], multiple=16),
    )
    seen = []
    original = FlowDPO.pair_latents

    def spy(self, batch):
        seen.append(tuple(batch.media_w.shape))
        assert batch.media_w.shape == batch.media_l.shape
        return original(self, batch)

    monkeypatch.setattr(FlowDPO, "pair_latents", spy)
    result = run_dpo(run, progress=False)
    assert result.step == 2 and math.isfinite(result.metrics["loss"])
    # 4 pairs (the tie is dropped) in two buckets of two: each step is one bucket, the two differ
    assert sorted(seen) == [(2, 3, 32, 32), (2, 3, 32, 48)]
    assert (tmp_path / "run" / "final" / "lora").is_dir()
    assert not (tmp_path / "run" / "final" / "model_index.json").exists()
