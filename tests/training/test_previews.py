"""Sample previews during training: files and tensorboard images, the trained (LoRA) model, and a
training run that stays bit-identical (with or without previews, straight or resumed)."""

from __future__ import annotations

import json

import pytest
import torch
from stand_ins import random_image_pairs
from training_toy import ToyFlowMatching, VectorDataset

from flowalign.config import CheckpointConfig, LoraConfig, OptimConfig, TrainConfig, ValidationConfig
from flowalign.data.media import load_image
from flowalign.models.lora import adapters_disabled
from flowalign.training.loop import train
from flowalign.training.methods.sft import FlowMatchingSFT, SFTConfig
from flowalign.training.previews import Previews, preview_folder
from flowalign.training.runs import DPORun, load_model_spec, prepare_dpo


class _Pixels(torch.utils.data.Dataset):
    def __init__(self, n: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.pixels = torch.rand(n, 3, 32, 32, generator=g)

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> dict:
        return {"pixels": self.pixels[i], "prompt": f"a red circle {i % 3}", "index": i}


def _toy_run(out, *, steps: int, previews: bool, trackers=()):
    torch.manual_seed(0)
    model = load_model_spec("toy:image", device="cpu")
    cfg = TrainConfig(
        output_dir=out, max_steps=steps, batch_size=2, cpu=True, trackers=list(trackers), log_every=1,
        checkpoint=CheckpointConfig(every=2), optim=OptimConfig(lr=1e-3),
    )  # fmt: skip
    if previews:
        cfg.validation = ValidationConfig(prompts=["a red circle", "a blue square"], every=2, steps=2, seed=3)
    return model, FlowMatchingSFT(model, SFTConfig()), cfg


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.transformer.state_dict().items()}


def test_previews_leave_training_and_resume_bit_identical(tmp_path) -> None:
    model, method, cfg = _toy_run(tmp_path / "plain", steps=4, previews=False)
    train(method, _Pixels(), cfg, progress=False)
    plain = _weights(model)

    model, method, cfg = _toy_run(tmp_path / "prev", steps=4, previews=True, trackers=["tensorboard"])
    train(method, _Pixels(), cfg, progress=False)
    assert all(torch.equal(plain[k], v) for k, v in _weights(model).items())  # previews changed nothing
    for step in (2, 4):
        folder = preview_folder(tmp_path / "prev", step)
        record = json.loads((folder / "samples.json").read_text())
        assert record["files"] == ["00.png", "01.png"] and record["step"] == step
        assert load_image(folder / "00.png").shape == (3, 32, 32)
    assert not preview_folder(tmp_path / "prev", 3).exists()
    events = list((tmp_path / "prev" / "logs").rglob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = EventAccumulator(str(events[0].parent)).Reload().Tags()["images"]
    assert any(tag.startswith("samples") for tag in images)

    model, method, cfg = _toy_run(tmp_path / "resumed", steps=2, previews=True)
    train(method, _Pixels(), cfg, progress=False)
    model, method, cfg = _toy_run(tmp_path / "resumed", steps=4, previews=True)
    train(method, _Pixels(), cfg, resume=True, progress=False)
    assert all(torch.equal(plain[k], v) for k, v in _weights(model).items())
    for step in (2, 4):  # the same seed gives the same pictures, resumed or not
        for name in ("00.png", "01.png", "samples.json"):
            a = (preview_folder(tmp_path / "prev", step) / name).read_bytes()
            assert a == (preview_folder(tmp_path / "resumed", step) / name).read_bytes()
    metrics = [(tmp_path / run / "metrics.jsonl").read_text() for run in ("plain", "prev", "resumed")]
    assert metrics[0] == metrics[1] == metrics[2]


def test_sd3_previews_sample_the_lora_model_with_cached_prompts(tiny_model_dir, tmp_path) -> None:
    run = DPORun(
        model=str(tiny_model_dir("sd3")),
        data=str(random_image_pairs(tmp_path, [(32, 32)] * 2)),
        train=TrainConfig(
            output_dir=tmp_path / "run", max_steps=2, batch_size=2, cpu=True, trackers=[],
            optim=OptimConfig(lr=5e-2),
            validation=ValidationConfig(prompts=["a cat"], every=2, steps=2, guidance_scale=2.0, height=32, width=32),
        ),
        lora=LoraConfig(rank=4, export_merged=False),
    )  # fmt: skip
    method, data = prepare_dpo(run)  # prompts cached: the text encoders leave the step
    assert method.prompt_cache is not None
    train(method, data, run.train, progress=False, run_config=run)
    written = load_image(preview_folder(tmp_path / "run", 2) / "00.png")

    class _Acc:
        is_main_process, trackers = True, []

    previews = Previews(method, run.train, _Acc(), sharded=False)
    method.model.transformer.train()  # as during training (the export left it in eval mode)
    assert previews.maybe_write(3) is None and previews.maybe_write(2) is not None
    assert method.model.transformer.training  # back in train mode after the preview
    lora_on = previews.sample()[0]
    with adapters_disabled(method.model.transformer):
        lora_off = previews.sample()[0]
    # the file is the trained model's sample (8-bit rounding: half a step), not the base model's
    assert (written - lora_on).abs().max().item() <= 0.5 / 255 + 1e-6
    assert (lora_on - lora_off).abs().max().item() > 2 / 255


def test_previews_need_a_flow_model_and_a_valid_size(tmp_path) -> None:
    cfg = TrainConfig(output_dir=tmp_path / "a", max_steps=1, batch_size=2, cpu=True, trackers=[])
    cfg.validation = ValidationConfig(prompts=["x"])
    with pytest.raises(ValueError, match="train.validation: ToyFlowMatching trains no flow model"):
        train(ToyFlowMatching(), VectorDataset(), cfg, progress=False)
    model, method, cfg = _toy_run(tmp_path / "b", steps=1, previews=True)
    cfg.validation.height = 33
    with pytest.raises(ValueError, match="train.validation: height must be"):
        train(method, _Pixels(), cfg, progress=False)


class _Clips(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> dict:
        clip = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(i))
        return {"pixels": clip, "prompt": "a red circle moves left", "index": i}


def test_clip_previews_write_gifs_and_tensorboard_frames(tmp_path) -> None:
    from flowalign.data.media import load_video

    torch.manual_seed(0)
    model = load_model_spec("toy:video", device="cpu")
    cfg = TrainConfig(output_dir=tmp_path, max_steps=1, batch_size=2, cpu=True, trackers=["tensorboard"])
    cfg.validation = ValidationConfig(prompts=["a blue square"], every=1, steps=1, num_frames=4, fps=4)
    train(FlowMatchingSFT(model, SFTConfig()), _Clips(), cfg, progress=False)
    folder = preview_folder(tmp_path, 1)
    assert json.loads((folder / "samples.json").read_text())["files"] == ["00.gif"]
    assert load_video(folder / "00.gif").shape == (4, 3, 32, 32)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = next((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert "samples/00" in EventAccumulator(str(events.parent)).Reload().Tags()["images"]
