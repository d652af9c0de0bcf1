"""``flowalign plan CONFIG_OR_PRESET``: the predicted peak memory per GPU of a recipe, as a table.

    flowalign plan sd35m-lora-dpo --gpu-memory 24
    flowalign plan all                                   # every preset, fits at 24 / 40 / 80 GB
    flowalign plan configs/sd35m_dpo.yaml --height 1024 --width 1024 --num-gpus 8 --strategy fsdp

A preset names a recipe of :data:`PRESETS`; a YAML file is read for ``model`` (a hub id or a folder
whose ``transformer/config.json`` matches a known architecture), ``train.batch_size``,
``train.gradient_checkpointing``, ``train.ema.use``, ``lora.rank`` (no ``lora`` section: full
fine-tune), ``drop_t5``, ``cache_prompts`` (false: text encoders on the device) and ``cache_latents``
(true: the VAE off the device); the method is the file's ``dpo`` / ``sft`` / ``fdistill`` section.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flowalign.planning.architectures import ARCHITECTURES
from flowalign.planning.architectures_video import VIDEO_HUB_IDS
from flowalign.planning.memory import GIB, STRATEGIES, Plan, Recipe, plan, suggest
from flowalign.validation import check_number, load_yaml_bounded, short_repr

_WAN_33 = {"height": 480, "width": 832, "frames": 33}
_WAN_81 = {"height": 480, "width": 832, "frames": 81}
PRESETS: dict[str, Recipe] = {
    "sd35m-lora-dpo": Recipe("sd35m"),
    "sd35l-lora-dpo": Recipe("sd35l"),
    "flux-dev-lora-dpo": Recipe("flux-dev"),
    "flux-dev-lora-dpo-8bit": Recipe("flux-dev", base_dtype="int8"),
    "wan-1.3b-lora-dpo": Recipe("wan-1.3b", **_WAN_33),
    "wan-14b-lora-dpo": Recipe("wan-14b", **_WAN_81),
    "sd35m-fdistill": Recipe("sd35m", method="fdistill", lora_rank=None),
    "sd35m-full-dpo": Recipe("sd35m", lora_rank=None),
    "flux-dev-full-dpo-fsdp8": Recipe("flux-dev", lora_rank=None, num_gpus=8, strategy="fsdp"),
    "wan-14b-lora-dpo-fsdp8": Recipe("wan-14b", num_gpus=8, strategy="fsdp", **_WAN_81),
}
"""The recipes of the README table: one pair per GPU, bf16 autocast, gradient checkpointing, cached text
embeddings, the VAE on the device; LoRA rank 16 on the attention projections unless full."""

_HUB_IDS = {
    "stabilityai/stable-diffusion-3.5-medium": "sd35m",
    "stabilityai/stable-diffusion-3.5-large": "sd35l",
    "black-forest-labs/FLUX.1-dev": "flux-dev",
    "black-forest-labs/FLUX.1-schnell": "flux-schnell",
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": "wan-1.3b",
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": "wan-14b",
    "black-forest-labs/FLUX.2-dev": "flux2-dev",
    "black-forest-labs/FLUX.2-klein-4B": "flux2-klein-4b",
    "black-forest-labs/FLUX.2-klein-base-4B": "flux2-klein-4b",
    "black-forest-labs/FLUX.2-klein-9B": "flux2-klein-9b",
    "black-forest-labs/FLUX.2-klein-base-9B": "flux2-klein-9b",
    "Qwen/Qwen-Image": "qwen-image",
    "Qwen/Qwen-Image-Edit": "qwen-image-edit",
    "Qwen/Qwen-Image-Edit-2509": "qwen-image-edit-plus",
    "Tongyi-MAI/Z-Image": "z-image",
    "Tongyi-MAI/Z-Image-Turbo": "z-image",
    **VIDEO_HUB_IDS,
}
_COMPARE = ("num_layers", "num_attention_heads", "attention_head_dim", "num_single_layers", "ffn_dim")


def _architecture_of(model: str, source: str) -> str:
    """The architecture name of a hub id or a local diffusers folder."""
    if model in _HUB_IDS:
        return _HUB_IDS[model]
    cfg_path = Path(model) / "transformer" / "config.json"
    if not cfg_path.is_file():
        raise ValueError(
            f"{source}: model {model!r} is neither a known hub id nor a folder with {cfg_path.name}"
        )
    cfg = json.loads(cfg_path.read_text())
    for name, arch in ARCHITECTURES.items():
        if all(cfg.get(k) == arch.transformer.get(k) for k in _COMPARE):
            return name
    raise ValueError(f"{source}: {cfg_path} matches no known architecture ({', '.join(ARCHITECTURES)})")


def recipe_from_yaml(path: Path) -> Recipe:
    """A recipe from a training config file (see the module docstring for the keys read)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read the config: {err}") from None
    data = load_yaml_bounded(text, str(path)) or {}
    if not isinstance(data, dict) or "model" not in data:
        raise ValueError(f"{path}: no 'model' key")
    train = data.get("train") or {}
    if not isinstance(train, dict):
        raise ValueError(f"{path}: 'train' must be a mapping, got {short_repr(train)}")
    method = next((m for m in ("dpo", "fdistill", "sft") if m in data), "dpo")
    lora = data.get("lora")
    batch = check_number(train.get("batch_size", 1), f"{path}: train.batch_size", lo=1, integer=True)
    rank = lora.get("rank", 16) if isinstance(lora, dict) else None
    if rank is not None:
        check_number(rank, f"{path}: lora.rank", lo=1, integer=True)
    ema = train.get("ema") or {}
    cached = _flag(data.get("cache_prompts", True), f"{path}: cache_prompts")
    return Recipe(
        _architecture_of(str(data["model"]), str(path)),
        method=method,
        batch=int(batch),
        gradient_checkpointing=bool(train.get("gradient_checkpointing", False)),
        ema=bool(ema.get("use", False)) if isinstance(ema, dict) else False,
        lora_rank=int(rank) if rank is not None else None,
        drop_t5=_flag(data.get("drop_t5", False), f"{path}: drop_t5"),
        text_encoders="cached" if cached else "device",
        vae="cached" if _flag(data.get("cache_latents", False), f"{path}: cache_latents") else "device",
    )


def _flag(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false, got {short_repr(value)}")
    return value


def _row(name: str, p: Plan, sizes: list[float]) -> str:
    r = p.recipe
    gpus = f"{r.num_gpus}x {r.strategy}" if r.num_gpus > 1 else "1"
    mode = f"LoRA r{r.lora_rank}" if r.lora_rank and r.method != "fdistill" else "full"
    fits = "  ".join(("yes" if p.fits(s) else "no ").ljust(5) for s in sizes)
    base = r.base_dtype if r.lora_rank else "-"
    staged = "yes" if r.staged else "no"
    return (
        f"{name:<26} {r.method:<8} {mode:<8} {base:<5} {gpus:<8} {staged:<6} {p.load_peak / GIB:5.1f}"
        f" {p.step_peak / GIB:5.1f} {p.peak / GIB:7.1f}   {fits}"
    )


def _breakdown(p: Plan) -> list[str]:
    lines = [f"  {k:<46} {v / GIB:7.2f}" for k, v in p.resident.items()]
    lines.append(f"  training phase: {p.training_phase}")
    lines += [f"  {k:<46} {v / GIB:7.2f}" for k, v in p.phases[p.training_phase].items()]
    lines.append(f"  {p.load_phase}")
    lines += [f"  {k:<46} {v / GIB:7.2f}" for k, v in p.load.items()]
    lines.append(f"  peak phase: {p.peak_phase}")
    return lines


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flowalign plan", description="Predicted peak memory per GPU.")
    ap.add_argument("target", help=f"a preset ({', '.join(PRESETS)}), 'all', or a YAML config")
    ap.add_argument("--gpu-memory", type=float, action="append", help="GiB per GPU (repeatable)")
    ap.add_argument("--num-gpus", type=int)
    ap.add_argument("--strategy", choices=STRATEGIES)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--frames", type=int)
    ap.add_argument("--batch", type=int, help="pairs (DPO) or samples per GPU and micro-step")
    ap.add_argument("--lora-rank", type=int)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--breakdown", action="store_true", help="print every item of each plan")
    return ap


def _overrides(args: argparse.Namespace) -> dict:
    keys = {"num_gpus": "num_gpus", "strategy": "strategy", "height": "height", "width": "width"}
    keys |= {"frames": "frames", "batch": "batch", "lora_rank": "lora_rank"}
    out = {field: getattr(args, arg) for arg, field in keys.items() if getattr(args, arg) is not None}
    if args.no_checkpointing:
        out["gradient_checkpointing"] = False
    return out


def recipes_for(target: str) -> dict[str, Recipe]:
    """The recipes a ``plan`` target names: a preset, ``all`` (every preset) or a training YAML file."""
    if target == "all":
        return dict(PRESETS)
    if target in PRESETS:
        return {target: PRESETS[target]}
    if Path(target).suffix in (".yaml", ".yml"):
        return {Path(target).stem: recipe_from_yaml(Path(target))}
    raise ValueError(f"{short_repr(target)} is neither a preset ({', '.join(PRESETS)}) nor a .yaml file")


def plan_report(plans: dict[str, Plan], sizes: list[float], *, breakdown: bool = False) -> list[str]:
    """The table (one row per plan, fits or not at each GPU size) and the switches that make each fit."""
    fit_head = "  ".join(f"{s:g}GB".ljust(5) for s in sizes)
    head = f"{'recipe':<26} {'method':<8} {'train':<8} {'base':<5} {'GPUs':<8} {'staged':<6} {'load':>5}"
    lines = [f"{head} {'step':>5} {'GiB/GPU':>7}   {fit_head}"]
    for name, p in plans.items():
        lines.append(_row(name, p, sizes))
        if breakdown:
            lines += _breakdown(p)
    for name, p in plans.items():
        for size in sizes:
            if p.fits(size):
                continue
            switches, after = suggest(p.recipe, size)
            if after.fits(size):
                lines.append(
                    f"{name} at {size:g} GB: fits with {', '.join(switches)} -> {after.peak / GIB:.1f} GiB"
                )
            elif after.load_peak > after.step_peak:
                lines.append(
                    f"{name} at {size:g} GB: does not fit with every switch: loading alone needs "
                    f"{after.load_peak / GIB:.1f} GiB ({after.load_phase})"
                )
            else:
                lines.append(
                    f"{name} at {size:g} GB: does not fit with every switch ({after.peak / GIB:.1f} GiB); "
                    "shard over more GPUs or lower the resolution or frame count"
                )
    return lines


def plan_main(argv: list[str] | None = None) -> int:
    """Print the plan table; returns the exit code (2 with one ``error:`` line on bad input)."""
    args = _parser().parse_args(argv)
    sizes = args.gpu_memory or [24.0, 40.0, 80.0]
    try:
        recipes = recipes_for(args.target)
        plans = {name: plan(r.replace(**_overrides(args))) for name, r in recipes.items()}
    except ValueError as err:
        print(f"error: {err}")
        return 2
    print("\n".join(plan_report(plans, sizes, breakdown=args.breakdown)))
    return 0
