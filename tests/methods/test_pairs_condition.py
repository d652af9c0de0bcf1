"""`pairs` on an image-to-video model: candidates sampled from each prompt's image, pairs naming it."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest

from flowalign.data.media import load_image
from flowalign.data.preference import load_preference_dataset
from flowalign.models import load_flow_model
from flowalign.models.tiny_conditioned import save_tiny_conditioned
from flowalign.pipelines import FlowPipeline
from flowalign.workflows.pairs import PairsConfig, build_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


def _brightness(media, prompts):
    return {"overall": media.flatten(1).float().mean(1)}


def test_pairs_carry_each_prompts_condition_image(tmp_path, monkeypatch):
    model = load_flow_model(save_tiny_conditioned("wan22-i2v", tmp_path / "model"))
    model.max_sequence_length = 16
    images = []
    for i in range(2):
        pixels = np.random.default_rng(i).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(tmp_path / f"c{i}.png")
        images.append(tmp_path / f"c{i}.png")
    seen = []
    real_call = FlowPipeline.__call__

    def spy(self, prompt, **kwargs):
        seen.extend(zip(prompt, (np.asarray(im) for im in kwargs["image"]), strict=True))
        return real_call(self, prompt, **kwargs)

    monkeypatch.setattr(FlowPipeline, "__call__", spy)
    config = PairsConfig(
        num_candidates=2, num_inference_steps=2, height=32, width=32, num_frames=5, video_ext=".npy"
    )
    prompts = ["a red ball rolls", "a blue box falls"]
    _, chosen = build_pairs(
        model, prompts, _brightness, tmp_path / "p", config, progress=False, images=images
    )
    assert len(chosen) == 2
    want = {p: np.asarray(PIL.Image.open(im).convert("RGB")) for p, im in zip(prompts, images, strict=True)}
    assert len(seen) == 4 and all(np.array_equal(pixels, want[p]) for p, pixels in seen)
    rows = [json.loads(line) for line in (tmp_path / "p" / "pairs.jsonl").read_text().splitlines()]
    assert [r["image"] for r in rows] == ["conditions/000000.png", "conditions/000001.png"]
    data = load_preference_dataset(tmp_path / "p" / "pairs.jsonl")
    for i in range(2):  # the dataset's condition is the prompt's image, losslessly
        assert (data[i].condition - load_image(images[i])).abs().max() == 0


def test_eval_samples_each_prompt_from_its_image(tmp_path, monkeypatch):
    from stand_ins import registered_mean_pixel

    from flowalign.evals import EvalOptions, run_eval
    from flowalign.pipelines.generate_files import GenerationSettings

    model_dir = save_tiny_conditioned("wan-i2v", tmp_path / "model")
    for i in range(2):
        pixels = np.random.default_rng(i).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(tmp_path / f"c{i}.png")
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,image\na red ball rolls,c0.png\na blue box falls,c1.png\n")
    seen = []
    real_call = FlowPipeline.__call__

    def spy(self, prompt, **kwargs):
        seen.extend(zip(prompt, (np.asarray(im) for im in kwargs["image"]), strict=True))
        return real_call(self, prompt, **kwargs)

    monkeypatch.setattr(FlowPipeline, "__call__", spy)
    size = dict(height=32, width=32, num_frames=5)
    options = EvalOptions(settings=GenerationSettings(num_inference_steps=2, **size), num_resamples=20)
    result = run_eval(
        {"m": model_dir},
        str(prompts),
        [registered_mean_pixel()],
        out_dir=tmp_path / "eval",
        options=options,
        render=False,
        progress=False,
    )
    assert result.failures == [] and result.report["timings"]["num_samples"] == 2
    want = {
        "a red ball rolls": np.asarray(PIL.Image.open(tmp_path / "c0.png").convert("RGB")),
        "a blue box falls": np.asarray(PIL.Image.open(tmp_path / "c1.png").convert("RGB")),
    }
    assert len(seen) == 2 and all(np.array_equal(pixels, want[p]) for p, pixels in seen)
    saved = (tmp_path / "eval" / "prompts" / "prompts.jsonl").read_text().splitlines()
    assert [json.loads(line)["image"] for line in saved] == [
        str((tmp_path / f"c{i}.png").resolve()) for i in range(2)
    ]


def test_rwr_on_conditioned_candidates_lora_loads_into_diffusers(tmp_path):
    import torch

    from flowalign.config import LoraConfig, OptimConfig, TrainConfig
    from flowalign.training.runs import RWRRun, run_rwr

    model_dir = save_tiny_conditioned("wan22-i2v", tmp_path / "model")
    model = load_flow_model(model_dir)
    model.max_sequence_length = 16
    images = []
    for i in range(2):
        pixels = np.random.default_rng(i).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(tmp_path / f"c{i}.png")
        images.append(tmp_path / f"c{i}.png")
    config = PairsConfig(
        num_candidates=2, num_inference_steps=1, height=32, width=32, num_frames=5, video_ext=".npy"
    )
    build_pairs(
        model, ["a ball", "a box"], _brightness, tmp_path / "p", config, progress=False, images=images
    )
    train_cfg = TrainConfig(
        output_dir=tmp_path / "run",
        max_steps=2,
        batch_size=2,
        cpu=True,
        trackers=[],
        optim=OptimConfig(lr=1e-2),
    )
    run = RWRRun(
        model=str(model_dir),
        data=str(tmp_path / "p" / "candidates.jsonl"),
        train=train_cfg,
        lora=LoraConfig(rank=4, export_merged=False),
        train_expert="low",
    )
    result = run_rwr(run, progress=False)
    assert result.step == 2 and np.isfinite(result.metrics["loss"])
    assert [f.name for f in (result.export_dir / "lora").iterdir()] == ["pytorch_lora_weights_2.safetensors"]
    gen = dict(num_inference_steps=2, guidance_scale=5.0, height=32, width=32, num_frames=5)
    image = PIL.Image.open(images[0]).convert("RGB")
    base = load_flow_model(model_dir)
    base.pipe.load_lora_weights(
        result.export_dir / "lora",
        weight_name="pytorch_lora_weights_2.safetensors",
        load_into_transformer_2=True,
    )
    theirs = base.pipe(
        prompt=["a ball"], image=image, generator=torch.Generator().manual_seed(3), output_type="pt",
        max_sequence_length=16, **gen,
    ).frames  # fmt: skip
    plain = FlowPipeline(model)(
        ["a ball"], image=image, generator=torch.Generator().manual_seed(3), **gen
    ).media
    assert (theirs - plain).abs().max() > 1e-3  # the exported low-noise LoRA changes the video


def test_sft_manifest_with_condition_images(tmp_path):
    from flowalign.config import TrainConfig
    from flowalign.training.runs import SFTRun, run_sft

    model_dir = save_tiny_conditioned("wan-i2v", tmp_path / "model")
    rows = []
    for i in range(2):
        frames = np.random.default_rng(i).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
        np.save(tmp_path / f"v{i}.npy", frames)
        PIL.Image.fromarray(frames[0]).save(tmp_path / f"v{i}.png")  # the clip's first frame
        rows.append({"file": f"v{i}.npy", "prompt": f"clip {i}", "image": f"v{i}.png"})
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(output_dir=tmp_path / "run", max_steps=1, batch_size=2, cpu=True, trackers=[])
    result = run_sft(SFTRun(model=str(model_dir), data=str(manifest), train=cfg), progress=False)
    assert result.step == 1 and np.isfinite(result.metrics["loss"])
    without = tmp_path / "plain.jsonl"  # an image-to-video model refuses samples without their image
    without.write_text("".join(json.dumps({k: r[k] for k in ("file", "prompt")}) + "\n" for r in rows))
    cfg.output_dir = tmp_path / "run2"
    with pytest.raises(ValueError, match="condition image"):
        run_sft(SFTRun(model=str(model_dir), data=str(without), train=cfg), progress=False)
