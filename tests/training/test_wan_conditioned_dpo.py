"""Wan image-to-video and Wan 2.2 A14B under `train dpo`: condition images, expert targeting, LoRA export."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from flowalign.config import LoraConfig, OptimConfig, TrainConfig
from flowalign.data.errors import DataError
from flowalign.data.preference import load_preference_dataset
from flowalign.models import load_flow_model
from flowalign.models.tiny_conditioned import save_tiny_conditioned
from flowalign.models.wan_experts import LORA_WEIGHT_NAMES
from flowalign.pipelines import FlowPipeline
from flowalign.training.loop import train
from flowalign.training.runs import DPORun, prepare_dpo

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4  # fp32: peft's adapted layers here and diffusers' loaded adapters compute the same sums
GEN = dict(num_inference_steps=4, guidance_scale=5.0, height=32, width=32, num_frames=5)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    made: dict[str, object] = {}

    def get(name: str):
        if name not in made:
            made[name] = save_tiny_conditioned(name, tmp_path_factory.mktemp(f"tiny-{name}"))
        return made[name]

    return get


def _png(path, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(path)


def write_pairs(folder, *, condition_b_seed=None, condition=True) -> tuple:
    """pairs.jsonl of two 5-frame 32x32 video pairs; each row names its condition image, per member
    when ``condition_b_seed`` is given (then row 2's B member names a different image)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(2):
        for side in "AB":
            np.save(folder / f"{i}{side}.npy", rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8))
        _png(folder / f"cond{i}.png", i)
        row = {"prompt": f"a moving shape {i}", "path_A": f"{i}A.npy", "path_B": f"{i}B.npy", "label": "A"}
        if not condition:
            pass
        elif condition_b_seed is None:
            row["image"] = f"cond{i}.png"
        else:
            other = f"cond{i}.png"
            if i == 1:
                _png(folder / "other.png", condition_b_seed)
                other = "other.png"
            row.update(image_A=f"cond{i}.png", image_B=other)
        rows.append(row)
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "pairs.jsonl", PIL.Image.open(folder / "cond0.png")


def test_pair_with_different_condition_images_is_refused(tmp_path):
    path, _ = write_pairs(tmp_path, condition_b_seed=5)
    data = load_preference_dataset(path)
    assert data[0].condition.shape == (3, 32, 32)  # row 1: both members name one image
    with pytest.raises(DataError, match=r"line 2.*different condition images"):
        data[1]


def _dpo(model_dir, data, out, **extra) -> DPORun:
    cfg = TrainConfig(
        output_dir=out,
        max_steps=2,
        batch_size=2,
        cpu=True,
        trackers=[],
        log_every=1,
        optim=OptimConfig(lr=1e-2),
    )
    return DPORun(model=str(model_dir), data=str(data), train=cfg, lora=LoraConfig(rank=4), **extra)


def _generate(model, image):
    return FlowPipeline(model)(
        ["a moving shape 0"], image=image, generator=torch.Generator().manual_seed(3), **GEN
    )


def _diffusers(pipe, image):
    return pipe(
        prompt=["a moving shape 0"],
        image=image,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
        max_sequence_length=16,
        **GEN,
    ).frames


@pytest.mark.parametrize("expert", ["high", "low", "both"])
def test_dpo_on_experts_leaves_the_others_and_loads_into_diffusers(tiny_dir, tmp_path, expert):
    data, image = write_pairs(tmp_path / "data")
    run = _dpo(tiny_dir("wan22-i2v"), data, tmp_path / "run", train_expert=expert)
    run.lora.export_merged = False
    method, dataset = prepare_dpo(run)
    model = method.model
    model.max_sequence_length = 16
    experts = {"high": model.pipe.transformer, "low": model.pipe.transformer_2}
    trained = ["high", "low"] if expert == "both" else [expert]
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in experts.items()}
    result = train(method, dataset, run.train, progress=False, run_config=run)
    assert result.step == 2 and np.isfinite(result.metrics["loss"])

    for name, module in experts.items():
        if name not in trained:  # untouched: no adapter, every weight as loaded
            assert not any("lora_" in n for n, _ in module.named_parameters())
            after = module.state_dict()
            assert all(torch.equal(before[name][k], after[k]) for k in before[name])
    lora_dir = result.export_dir / "lora"
    assert sorted(p.name for p in lora_dir.iterdir()) == sorted(LORA_WEIGHT_NAMES[n] for n in trained)

    model.eval()
    ours = _generate(model, image).media
    base = load_flow_model(tiny_dir("wan22-i2v"))
    plain = _generate(base, image).media
    assert (ours - plain).abs().max() > 10 * TOL  # the trained LoRA changes the video
    pipe = base.pipe
    if "high" in trained:
        pipe.load_lora_weights(lora_dir)
    if "low" in trained:
        pipe.load_lora_weights(lora_dir, weight_name=LORA_WEIGHT_NAMES["low"], load_into_transformer_2=True)
    assert (_diffusers(pipe, image) - ours).abs().max() <= TOL


def test_dpo_wan21_i2v_both_lora_loads_into_diffusers(tiny_dir, tmp_path):
    data, image = write_pairs(tmp_path / "data")
    run = _dpo(tiny_dir("wan-i2v"), data, tmp_path / "run")
    run.lora.export_merged = False
    method, dataset = prepare_dpo(run)
    method.model.max_sequence_length = 16
    result = train(method, dataset, run.train, progress=False, run_config=run)
    method.model.eval()
    ours = _generate(method.model, image).media
    base = load_flow_model(tiny_dir("wan-i2v"))
    base.pipe.load_lora_weights(result.export_dir / "lora")
    assert (_diffusers(base.pipe, image) - ours).abs().max() <= TOL


def test_dpo_ti2v_5b_image_to_video_lora_loads_into_diffusers(tiny_dir, tmp_path):
    from diffusers import WanImageToVideoPipeline

    data, image = write_pairs(tmp_path / "data")
    run = _dpo(tiny_dir("wan22-ti2v"), data, tmp_path / "run")
    run.lora.export_merged = False
    method, dataset = prepare_dpo(run)
    method.model.max_sequence_length = 16
    result = train(method, dataset, run.train, progress=False, run_config=run)
    assert result.step == 2 and np.isfinite(result.metrics["loss"])
    method.model.eval()
    ours = _generate(method.model, image)
    # the first latent frame is the condition's: pinned by the sampler, as diffusers overwrites it
    z = method.model.encode_images([image], 32, 32, 5)["image_latents"]
    assert (ours.latents[:, :, :1] - z).abs().max() <= TOL
    base = load_flow_model(tiny_dir("wan22-ti2v"))
    base.pipe.load_lora_weights(result.export_dir / "lora")
    i2v = WanImageToVideoPipeline(**base.pipe.components, expand_timesteps=True)
    i2v.set_progress_bar_config(disable=True)
    assert (_diffusers(i2v, image) - ours.media).abs().max() <= TOL


def test_dpo_wan22_a14b_text_to_video_trains_the_high_expert(tiny_dir, tmp_path):
    data, _ = write_pairs(tmp_path / "data", condition=False)
    run = _dpo(tiny_dir("wan22"), data, tmp_path / "run", train_expert="high")
    run.lora.export_merged = False
    method, dataset = prepare_dpo(run)
    model = method.model
    assert model.training_t_span == (0.875, 1.0)
    model.max_sequence_length = 16
    result = train(method, dataset, run.train, progress=False, run_config=run)
    assert result.step == 2 and np.isfinite(result.metrics["loss"])
    model.eval()
    kwargs = dict(generator=torch.Generator().manual_seed(3), **GEN)
    ours = FlowPipeline(model)(["a moving shape 0"], **kwargs).media
    base = load_flow_model(tiny_dir("wan22"))
    base.pipe.load_lora_weights(result.export_dir / "lora")
    theirs = base.pipe(
        prompt=["a moving shape 0"],
        output_type="pt",
        max_sequence_length=16,
        **{**kwargs, "generator": torch.Generator().manual_seed(3)},
    ).frames
    assert (theirs - ours).abs().max() <= TOL


def test_expert_loras_convert_to_comfyui_one_file_each(tmp_path):
    from flowalign.models.lora import add_lora, save_lora
    from flowalign.models.tiny_conditioned import tiny_wan22_i2v_pipeline
    from flowalign.models.wan_i2v import WanI2VModel
    from flowalign.training.lora_comfyui import convert_wan_lora_to_comfyui

    model = WanI2VModel(tiny_wan22_i2v_pipeline())
    model.set_train_expert("low")
    add_lora(model.transformer, LoraConfig(rank=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    save_lora(model.transformer, tmp_path / "lora")
    assert [p.name for p in (tmp_path / "lora").iterdir()] == [LORA_WEIGHT_NAMES["low"]]
    with pytest.raises(FileNotFoundError, match="low-noise expert"):
        convert_wan_lora_to_comfyui(tmp_path / "lora", tmp_path / "low.safetensors")
    out = convert_wan_lora_to_comfyui(
        tmp_path / "lora" / LORA_WEIGHT_NAMES["low"], tmp_path / "low.safetensors"
    )
    from safetensors.torch import load_file

    keys = load_file(str(out))
    assert len(keys) == 2 * 4 * 2 * 2  # 2 blocks x 4 projections x 2 attentions x (down, up)
    assert all(k.startswith("diffusion_model.blocks.") for k in keys)
