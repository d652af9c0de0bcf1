"""The remaining loop methods (SFT, RWR, GRPO, latent reward, reward model, CDT) for the sharded-training
tests, in this process or under ``accelerate launch`` (CPU, gloo).

usage: methods_worker.py MODEL_DIR OUTPUT_DIR MAX_STEPS method=NAME [wrap=none] [ema=off]
MODEL_DIR is a saved toy model (unused by "reward" and "cdt", which build their tiny networks from a
seed). Prints ``WORLD=<n> RANK=<r> TYPE=<type> SHARDED=<DTensor parameters>/<trainable parameters>`` on
every rank and ``DIST-DONE STEP=<n>`` on the main one; ends with the gloo exit workaround.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: gloo_worker

import torch  # noqa: E402

torch.set_num_threads(1)

from gloo_worker import end_run  # noqa: E402

PROMPTS = ["a small red circle in the center", "a large blue square in the top left"]
METHODS = ("sft", "rwr", "grpo", "latent", "reward", "cdt")


def _media(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


def _brightness(media, prompts):
    value = media.flatten(1).mean(1)
    return {"overall": value, "brightness": value}


def _sft(model_dir: str):
    from flowalign.models import load_flow_model
    from flowalign.training.methods.sft import FlowMatchingSFT, SFTConfig

    media = _media(8, (3, 32, 32), 0)
    data = [{"pixels": media[i], "prompt": PROMPTS[i % 2], "index": i} for i in range(8)]
    return FlowMatchingSFT(load_flow_model(model_dir), SFTConfig(caption_dropout=0.25)), data


def _rwr(model_dir: str):
    from flowalign.config import LoraConfig
    from flowalign.models import load_flow_model
    from flowalign.training.methods.rwr import FlowRWR, RWRConfig, WeightedSamples

    cfg = RWRConfig(temperature=0.5)
    rewards = torch.linspace(0.0, 1.0, 8)
    data = WeightedSamples(_media(8, (3, 32, 32), 0), [PROMPTS[i % 2] for i in range(8)], rewards, cfg)
    return FlowRWR(load_flow_model(model_dir), cfg, lora=LoraConfig(rank=4, init="gaussian")), data


def _grpo(model_dir: str):
    from flowalign.config import LoraConfig
    from flowalign.models import load_flow_model
    from flowalign.training.methods.grpo import FlowGRPO, GRPOConfig, PromptItems

    cfg = GRPOConfig(num_samples=2, num_inference_steps=2, guidance_scale=2.0, kl_beta=0.1)
    lora = LoraConfig(rank=4, init="gaussian")
    return FlowGRPO(load_flow_model(model_dir), _brightness, cfg, lora=lora), PromptItems(PROMPTS * 4)


def _latent(model_dir: str):
    from flowalign.config import LoraConfig
    from flowalign.models import load_flow_model
    from flowalign.training.methods.latent_reward import LatentRewardTraining, LatentRewardTrainingConfig

    model = load_flow_model(model_dir)
    size = model.transformer.config.sample_size
    lat = _media(16, (3, size, size), 0) * 2 - 1
    data = [
        {"prompt": PROMPTS[i % 2], "latents_w": lat[i], "latents_l": lat[8 + i], "index": i,
         "labels": {"VQ": 1, "TA": [1, -1, 0, -2][i % 4]}}
        for i in range(8)
    ]  # fmt: skip
    cfg = LatentRewardTrainingConfig(
        num_blocks=1, head_hidden=16, trunk_training="lora", lora=LoraConfig(rank=2, alpha=2.0)
    )
    return LatentRewardTraining(model, cfg), data


def _reward(model_dir: str):
    from flowalign.rewards.multihead import MultiHeadConfig, MultiHeadRewardModel
    from flowalign.toy.reward_pairs import build_toy_reward_pairs
    from flowalign.training.methods.reward_model import RewardModelTraining

    pairs = build_toy_reward_pairs(8, kind="image", split="train", seed=1)
    tiny = dict(
        vision={"image_size": 32, "patch_size": 8, "width": 16, "layers": 1, "head_width": 8,
                "pool_type": "avg"},
        text={"context_length": 16, "width": 16, "heads": 2, "layers": 1},
        hidden=16,
    )  # fmt: skip
    cfg = MultiHeadConfig(dimensions=["vq", "ta"], media_kind="image", **tiny)
    model = MultiHeadRewardModel.build(cfg, corpus=[pairs[i]["prompt"] for i in range(8)], seed=0)
    return RewardModelTraining(model), [{**pairs[i], "index": i} for i in range(8)]


def _cdt(model_dir: str):
    from flowalign.tokenizers.cdt import CDTConfig, ConditionedDiffusionTokenizer
    from flowalign.toy.data import ToyDataset
    from flowalign.training.methods.cdt import CDTLossConfig, CDTTraining

    cfg = CDTConfig.tiny(
        encoder_channels=(4, 8, 8, 8), unet_channels=(8, 8, 8, 8, 8), space_down=(True, True, True, False),
        pad_mode="replicate", cond_out_channels=3,
    )  # fmt: skip
    model = ConditionedDiffusionTokenizer.from_cdt_config(cfg)
    clips = ToyDataset("train", kind="video", num=8, size=32, num_frames=5)
    data = [{"pixels": clips[i]["pixels"], "index": i} for i in range(8)]
    return CDTTraining(model, lpips_fn=None, config=CDTLossConfig(lpips_weight=0.0)), data


BUILDERS = {
    "sft": _sft, "rwr": _rwr, "grpo": _grpo, "latent": _latent, "reward": _reward, "cdt": _cdt,
}  # fmt: skip


def run(
    model_dir: str,
    out: Path,
    batch_size: int,
    *,
    max_steps: int,
    method: str,
    grad_accum_steps: int = 1,
    ema: bool = True,
):
    """``method`` on its toy data (lr 1e-3, EMA decay 0.5 unless ``ema`` is False, no clipping, a
    checkpoint after each step)."""
    from flowalign.config import CheckpointConfig, EMAConfig, OptimConfig, TrainConfig
    from flowalign.training.distributed import wants_deepspeed
    from flowalign.training.loop import train

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    torch.manual_seed(0)  # LoRA and head inits: identical on every process and in the reference
    built, data = BUILDERS[method](model_dir)
    config = TrainConfig(
        output_dir=out, max_steps=max_steps, batch_size=batch_size, grad_accum_steps=grad_accum_steps,
        grad_clip=None, log_every=1, trackers=[], cpu=not wants_deepspeed(), optim=OptimConfig(lr=1e-3),
        ema=EMAConfig(use=ema, decay=0.5), checkpoint=CheckpointConfig(every=1),
    )  # fmt: skip
    return built, train(built, data, config, progress=False)


if __name__ == "__main__":
    a = sys.argv[1:]
    opts = dict(x.split("=", 1) for x in a[3:])
    if opts.get("wrap") == "none":
        os.environ["FSDP_AUTO_WRAP_POLICY"] = "NO_WRAP"
    ema = opts.get("ema", "on") != "off"
    method, result = run(a[0], Path(a[1]), 2, max_steps=int(a[2]), method=opts["method"], ema=ema)
    from accelerate.state import AcceleratorState
    from torch.distributed.tensor import DTensor

    acc = AcceleratorState()
    params = [p for m in method.trainable_modules().values() for p in m.parameters() if p.requires_grad]
    sharded = sum(isinstance(p, DTensor) for p in params)
    print(
        f"WORLD={acc.num_processes} RANK={acc.process_index} TYPE={acc.distributed_type} "
        f"SHARDED={sharded}/{len(params)}",
        flush=True,
    )
    end_run(f"DIST-DONE STEP={result.step}")
