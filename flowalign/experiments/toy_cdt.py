"""CDT vs the KL-VAE baseline on toy videos: same encoder, same decoder size, same loss and budget.

The paper's central claim is that a conditioned diffusion decoder reconstructs better than a
deterministic KL-VAE decoder. This trains both on the toy world's moving shapes (CPU, minutes) and
scores one-step reconstructions of held-out clips (attribute combinations never seen in training)
with PSNR, SSIM and LPIPS::

    python -m flowalign.experiments.toy_cdt --out runs/cdt-toy [--steps 200] [--seed 0]

Both runs use :class:`~flowalign.training.methods.cdt.CDTTraining` with the same seed, data order,
optimiser, steps and loss weights; only ``decoder_type`` differs. Without torchvision's ImageNet
AlexNet weights on disk, the training LPIPS term and the reported LPIPS use randomly initialised
AlexNet backbones (different seeds for training and evaluation), labelled as such in the results:
such numbers rank the two models but are not comparable with published LPIPS.

Measured on 2 shared CPU cores (toy preset, 2.7 M vs 2.65 M parameters, 4 clips of 9 frames at
32 x 32 per step, 32 held-out clips; 2.5-6 min per model for 200 steps depending on machine load)::

    run                     decoder                PSNR dB   SSIM    LPIPS (random backbone)
    seed 0, 200 steps       CDT p=1, 1 step         19.75    0.558   0.0124
    (the defaults)          CDT p=3, 1 step         20.87    0.723   0.0094
                            CDT p=3, 4 DDIM steps   21.04    0.761   0.0090
                            KL-VAE                  21.71    0.764   0.0088
    seed 1, 200 steps       CDT p=3, 1 step         20.29    0.694   0.0090
                            CDT p=3, 4 DDIM steps   20.06    0.711   0.0091
                            KL-VAE                  21.78    0.767   0.0076
    seed 0, 300 steps       CDT p=3, 1 step         19.29    0.560   0.0118
                            CDT p=3, 4 DDIM steps   18.05    0.610   0.0135
                            KL-VAE                  22.10    0.786   0.0081
    painting each clip its mean colour              18.4-18.6

At this scale the KL-VAE baseline wins on every metric: the paper's claim is not reproduced here.
Flat-coloured shapes leave little for a generative decoder to add over the regression mean, and
one-step decoding only uses the few training draws near t = 1 (p = 3 helps by drawing more of them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flowalign.config import OptimConfig, TrainConfig
from flowalign.tokenizers.cdt import CDTConfig, ConditionedDiffusionTokenizer, decode_video, encode_video
from flowalign.tokenizers.metrics import LpipsUnavailable, load_lpips, video_metrics

__all__ = ["ToyComparisonConfig", "evaluate_tokenizer", "run_toy_comparison"]


@dataclass(kw_only=True)
class ToyComparisonConfig:
    """Budget and sizes of the comparison (the defaults take about 4 minutes per model on 2 CPU cores)."""

    model: CDTConfig = field(default_factory=CDTConfig.toy)
    """Architecture shared by both runs (``decoder_type`` is set per run)."""
    max_steps: int = 200
    """Optimizer steps per model."""
    batch_size: int = 4
    """Clips per step."""
    lr: float = 1e-3
    """Peak AdamW learning rate (20 warm-up steps, cosine decay to 0)."""
    time_power: float = 3.0
    """CDT's time-index draw i = floor(T u^(1/p)); the paper's choice is unknown. p = 3 (E[i/T] = 0.75)
    gave the better one-step CDT on the toy world (held-out PSNR 20.9 vs 19.8 dB with p = 1; seed 0, 200 steps)."""
    lpips_weight: float = 0.1
    """LPIPS loss weight (both runs)."""
    num_frames: int = 9
    """Frames per clip (1 + 4k)."""
    size: int = 32
    """Frame side."""
    num_train: int = 4096
    """Training clips (the toy stream's first ones)."""
    num_eval: int = 32
    """Held-out clips scored."""
    eval_steps: tuple[int, ...] = (1,)
    """DDIM steps to score CDT with (1 = the released default)."""
    seed: int = 0
    """Seed of weights, data order and noise (the same for both runs)."""


def _lpips(*, seed: int) -> tuple[torch.nn.Module, str]:
    try:
        return load_lpips("alex"), "alex (ImageNet backbone)"
    except LpipsUnavailable:
        return load_lpips(
            "alex", random_backbone=True, seed=seed
        ), f"alex with a random backbone (seed {seed})"


@torch.no_grad()
def evaluate_tokenizer(
    model: ConditionedDiffusionTokenizer,
    clips: torch.Tensor,
    *,
    lpips_fn: torch.nn.Module | None,
    num_inference_steps: int = 1,
    seed: int = 0,
    batch_size: int = 8,
) -> dict[str, float]:
    """Mean PSNR / SSIM / LPIPS of reconstructions of ``clips`` [N, T, 3, H, W] in [0, 1]."""
    model.eval()
    scores: dict[str, list[torch.Tensor]] = {}
    for start in range(0, clips.shape[0], batch_size):
        ref = clips[start : start + batch_size]
        z = encode_video(model, ref)
        rec = decode_video(
            model,
            z,
            num_inference_steps=num_inference_steps,
            generator=torch.Generator().manual_seed(seed + start),
        )
        for key, value in video_metrics(rec, ref, lpips_fn=lpips_fn).items():
            scores.setdefault(key, []).append(value)
    return {key: float(torch.cat(values).mean()) for key, values in scores.items()}


def _mean_colour_psnr(clips: torch.Tensor) -> float:
    """PSNR of the trivial reconstruction that paints every pixel with the clip's mean colour."""
    mean = clips.mean(dim=(1, 3, 4), keepdim=True).expand_as(clips)
    mse = (mean - clips).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse)).mean())


def run_toy_comparison(
    out_dir: str | os.PathLike,
    cfg: ToyComparisonConfig | None = None,
    *,
    decoders: tuple[str, ...] = ("diffusion", "vae"),
    progress: bool = False,
) -> dict:
    """Train each decoder kind with the same budget, score held-out clips, write ``results.json``.

    Returns:
        {"config", "lpips_eval", "mean_colour_psnr", "runs": {decoder: {"params", "train_seconds",
        "final_loss", "eval": {"steps=S": {"psnr", "ssim", "lpips"}}}}}.
    """
    from flowalign.toy.data import ToyDataset
    from flowalign.training.methods.cdt import CDTDataConfig, CDTLossConfig, CDTRunConfig, train_cdt

    cfg = cfg or ToyComparisonConfig()
    out_dir = Path(out_dir)
    held_out = ToyDataset(
        "heldout", kind="video", num=cfg.num_eval, seed=cfg.seed, size=cfg.size, num_frames=cfg.num_frames
    )
    clips = torch.stack([held_out[i]["pixels"] for i in range(len(held_out))])  # [N, T, 3, H, W]
    lpips_eval, lpips_name = _lpips(seed=cfg.seed + 1)
    shared = dataclasses.asdict(cfg)
    shared["model"].pop("decoder_type")  # set per run
    results: dict = {
        "config": _jsonable(shared),
        "lpips_eval": lpips_name,
        "mean_colour_psnr": _mean_colour_psnr(clips),
        "runs": {},
    }
    for decoder in decoders:
        run = CDTRunConfig(
            model=dataclasses.replace(cfg.model, decoder_type=decoder),
            loss=CDTLossConfig(lpips_weight=cfg.lpips_weight, time_power=cfg.time_power),
            data=CDTDataConfig(num_frames=cfg.num_frames, size=cfg.size, num=cfg.num_train, seed=cfg.seed),
            lpips="alex" if lpips_name.startswith("alex (") else "alex-random",
            train=TrainConfig(
                output_dir=out_dir / decoder,
                seed=cfg.seed,
                max_steps=cfg.max_steps,
                batch_size=cfg.batch_size,
                trackers=[],
                cpu=True,
                log_every=10,
                checkpoint=dataclasses.replace(TrainConfig().checkpoint, every=0, keep_last=1),
                optim=OptimConfig(
                    lr=cfg.lr, warmup_steps=min(20, cfg.max_steps // 10), schedule="cosine", weight_decay=0.0
                ),
            ),
        )
        start = time.perf_counter()
        result = train_cdt(run, progress=progress)
        seconds = time.perf_counter() - start
        model = ConditionedDiffusionTokenizer.from_pretrained(result.export_dir / "tokenizer")
        steps = cfg.eval_steps if decoder == "diffusion" else (1,)
        results["runs"][decoder] = {
            "params": sum(p.numel() for p in model.parameters()),
            "train_seconds": round(seconds, 1),
            "final_loss": result.metrics.get("loss"),
            "eval": {
                f"steps={s}": evaluate_tokenizer(
                    model, clips, lpips_fn=lpips_eval, num_inference_steps=s, seed=cfg.seed
                )
                for s in steps
            },
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj if not isinstance(obj, float) or math.isfinite(obj) else str(obj)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m flowalign.experiments.toy_cdt --out DIR [--steps N] ...``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=ToyComparisonConfig.max_steps)
    parser.add_argument("--batch-size", type=int, default=ToyComparisonConfig.batch_size)
    parser.add_argument("--lr", type=float, default=ToyComparisonConfig.lr)
    parser.add_argument("--time-power", type=float, default=ToyComparisonConfig.time_power)
    parser.add_argument("--eval-steps", type=int, nargs="+", default=list(ToyComparisonConfig.eval_steps))
    parser.add_argument("--decoders", nargs="+", default=["diffusion", "vae"], choices=["diffusion", "vae"])
    parser.add_argument("--seed", type=int, default=ToyComparisonConfig.seed)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = ToyComparisonConfig(
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        time_power=args.time_power,
        eval_steps=tuple(args.eval_steps),
        seed=args.seed,
    )
    results = run_toy_comparison(args.out, cfg, decoders=tuple(args.decoders), progress=True)
    print(f"LPIPS: {results['lpips_eval']}; mean-colour PSNR {results['mean_colour_psnr']:.2f} dB")
    for decoder, run in results["runs"].items():
        for steps, m in run["eval"].items():
            print(
                f"{decoder:>9} {steps:>8}  PSNR {m['psnr']:.2f}  SSIM {m['ssim']:.4f}  LPIPS {m['lpips']:.4f}  "
                f"({run['params']:,} params, {run['train_seconds']:.0f} s)"
            )


if __name__ == "__main__":
    main()
