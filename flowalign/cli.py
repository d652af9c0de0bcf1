"""The ``flowalign`` command line: each command parses arguments and calls one library function."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="flowalign",
    help="Align and distill diffusion/flow generative models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Align and distill diffusion/flow generative models."""


USER_ERRORS = (ValueError, OSError)
"""What a command reports as one ``error:`` line: bad values, files or data (flowalign's errors are
ValueErrors) and missing/unreadable/unwritable paths (OSError: not found, permission, disk full)."""


def fail(message: str, code: int = 2) -> None:
    """Print one line naming the problem and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _device_and_dtype(device: str | None, dtype: str | None):
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in dtypes:
        fail(f"--dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    return device, dtypes[dtype]


@app.command()
def generate(
    model: Annotated[str, typer.Option(help="Hub id or local folder in diffusers' layout.")],
    out: Annotated[Path, typer.Option(help="Output folder (media + manifest.jsonl).")],
    prompt: Annotated[list[str] | None, typer.Option(help="A prompt (repeat for several).")] = None,
    prompts_file: Annotated[
        Path | None, typer.Option(help="Prompts: .txt (one per line), .jsonl, .csv, .json.")
    ] = None,
    negative_prompt: Annotated[str | None, typer.Option(help="Negative prompt for CFG.")] = None,
    steps: Annotated[int | None, typer.Option(help="Sampling steps (family default if unset).")] = None,
    guidance_scale: Annotated[
        float | None, typer.Option(help="CFG scale (embedded guidance for FLUX.1-dev).")
    ] = None,
    true_cfg_scale: Annotated[float, typer.Option(help="Real CFG for guidance-distilled models.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the first sample; sample i uses seed + i.")] = 0,
    height: Annotated[int | None, typer.Option()] = None,
    width: Annotated[int | None, typer.Option()] = None,
    num_frames: Annotated[int | None, typer.Option(help="Frames (video families).")] = None,
    samples_per_prompt: Annotated[int, typer.Option()] = 1,
    batch_size: Annotated[int, typer.Option()] = 4,
    sampler: Annotated[str, typer.Option(help="euler or heun.")] = "euler",
    one_step: Annotated[bool, typer.Option("--one-step", help="One-step generator checkpoint.")] = False,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda if present).")
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="fp32, bf16 or fp16 (default: bf16 on GPU).")] = None,
    fps: Annotated[int, typer.Option(help="Frames per second of written videos.")] = 8,
    guide: Annotated[
        Path | None, typer.Option(help="Latent reward model folder for Flow-NRG guidance.")
    ] = None,
    reward_weights: Annotated[
        str | None, typer.Option(help="Flow-NRG dimension weights, e.g. vq=1,mq=0.5,ta=2.")
    ] = None,
    guidance_strength: Annotated[float, typer.Option(help="Flow-NRG strength w (0 = off).")] = 1.0,
    guide_steps: Annotated[str | None, typer.Option(help="Guide only for t in [a, b], as a:b.")] = None,
) -> None:
    """Generate images (PNG) or videos (MP4 + GIF) and a manifest.jsonl from prompts."""
    from flowalign.data.prompts import load_prompts
    from flowalign.models import load_flow_model
    from flowalign.pipelines.generate_files import GenerationSettings, generate_files
    from flowalign.pipelines.one_step import read_one_step_metadata

    if steps is not None and steps < 1:
        fail(f"--steps must be >= 1, got {steps}")
    if samples_per_prompt < 1:
        fail(f"--samples-per-prompt must be >= 1, got {samples_per_prompt}")
    if sampler not in ("euler", "heun"):
        fail(f"--sampler must be euler or heun, got {sampler!r}")
    if not prompt and prompts_file is None:
        fail("give --prompt TEXT or --prompts-file FILE")
    try:
        prompts = list(prompt or [])
        if prompts_file is not None:
            prompts += load_prompts(prompts_file)
        if not prompts or any(not p.strip() for p in prompts):
            fail("a prompt is empty")
        torch_device, torch_dtype = _device_and_dtype(device, dtype)
        flow_model = load_flow_model(model, torch_dtype=torch_dtype, device=torch_device)
        one_step_meta = read_one_step_metadata(model) if Path(model).is_dir() else None
        if one_step_meta is not None:  # a distilled checkpoint samples in one step with its recorded guidance
            one_step = True
            if guidance_scale is None:
                guidance_scale = one_step_meta.get("guidance_scale") or 1.0
        if one_step and steps not in (None, 1):
            fail(f"--one-step samples in one step; --steps {steps} does not apply")
        settings = GenerationSettings(
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            true_cfg_scale=true_cfg_scale,
            height=height,
            width=width,
            num_frames=num_frames,
            negative_prompt=negative_prompt,
            sampler=sampler,
            one_step=one_step,
            seed=seed,
            samples_per_prompt=samples_per_prompt,
            fps=fps,
        )
        factory = None
        if guide is not None:
            factory = _nrg_factory(flow_model, guide, reward_weights, guidance_strength, guide_steps)
            settings.extra = {
                "guide": str(guide),
                "reward_weights": reward_weights,
                "guidance_strength": guidance_strength,
                "guide_steps": guide_steps,
            }
        rows = generate_files(
            flow_model,
            prompts,
            out,
            settings,
            batch_size=batch_size,
            model_name=str(model),
            transforms_factory=factory,
        )
    except USER_ERRORS as err:
        fail(str(err).splitlines()[0])
    typer.echo(f"wrote {len(rows)} samples to {out}")


train_app = typer.Typer(help="Train a method on the shared loop.", no_args_is_help=True)
app.add_typer(train_app, name="train")

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML recipe (e.g. configs/toy_dpo.yaml).")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config key: --set train.optim.lr=1e-4")
]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue from the newest checkpoint in the run folder.")
]


def _run_training(run_cls, runner, config, overrides, resume, shortcuts: dict[str, object]) -> None:
    from flowalign.config import load_config

    sets = [f"{key}={value}" for key, value in shortcuts.items() if value is not None] + list(overrides or [])
    try:
        run = load_config(run_cls, config, sets)
        result = runner(run, resume=resume)
    except USER_ERRORS as err:
        fail(str(err).splitlines()[0])
    where = result.export_dir or result.checkpoint
    typer.echo(f"trained {result.step} steps; model in {where}")


@train_app.command("sft")
def train_sft(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[str | None, typer.Option(help="Hub id, folder, or toy:image / toy:video.")] = None,
    data: Annotated[
        str | None, typer.Option(help="toy:train or a manifest.jsonl of media + prompts.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (checkpoints, logs, final model).")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    resume: ResumeOpt = False,
) -> None:
    """Flow-matching fine-tuning (pretrains the toy base models)."""
    from flowalign.training.runs import SFTRun, run_sft

    _run_training(
        SFTRun,
        run_sft,
        config,
        set_,
        resume,
        {"model": model, "data": data, "train.output_dir": out, "train.max_steps": steps},
    )


@train_app.command("dpo")
def train_dpo(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[str | None, typer.Option(help="Base model: hub id or folder.")] = None,
    data: Annotated[
        str | None, typer.Option(help="pairs.jsonl, VideoAlign csv or Pick-a-Pic parquet.")
    ] = None,
    out: Annotated[Path | None, typer.Option()] = None,
    steps: Annotated[int | None, typer.Option()] = None,
    beta: Annotated[float | None, typer.Option(help="DPO beta (mean-reduced errors).")] = None,
    resume: ResumeOpt = False,
) -> None:
    """Flow-DPO preference fine-tuning (LoRA by default; --set lora=null for a full fine-tune)."""
    from flowalign.training.runs import DPORun, run_dpo

    _run_training(
        DPORun,
        run_dpo,
        config,
        set_,
        resume,
        {"model": model, "data": data, "train.output_dir": out, "train.max_steps": steps, "dpo.beta": beta},
    )


@train_app.command("rwr")
def train_rwr(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[str | None, typer.Option(help="Base model: hub id or folder.")] = None,
    data: Annotated[str | None, typer.Option(help="candidates.jsonl from `flowalign pairs`.")] = None,
    out: Annotated[Path | None, typer.Option()] = None,
    steps: Annotated[int | None, typer.Option()] = None,
    temperature: Annotated[float | None, typer.Option(help="RWR temperature beta.")] = None,
    resume: ResumeOpt = False,
) -> None:
    """Flow-RWR: reward-weighted flow matching on scored samples."""
    from flowalign.training.runs import RWRRun, run_rwr

    _run_training(
        RWRRun,
        run_rwr,
        config,
        set_,
        resume,
        {
            "model": model,
            "data": data,
            "train.output_dir": out,
            "train.max_steps": steps,
            "rwr.temperature": temperature,
        },
    )


@train_app.command("latent-reward")
def train_latent_reward(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[str | None, typer.Option(help="Flow model the guide is for: hub id or folder.")] = None,
    data: Annotated[
        str | None,
        typer.Option(help="Preference pairs with per-dimension labels, or candidates.jsonl from `pairs`."),
    ] = None,
    out: Annotated[Path | None, typer.Option()] = None,
    steps: Annotated[int | None, typer.Option()] = None,
    dimensions: Annotated[str | None, typer.Option(help="Reward dimensions, e.g. vq,ta or vq,mq,ta.")] = None,
    teacher: Annotated[
        str | None, typer.Option(help="Clean reward that labels every batch instead (e.g. toy).")
    ] = None,
    resume: ResumeOpt = False,
) -> None:
    """Noise-aware latent reward for Flow-NRG guidance (`generate --guide OUT/final`)."""
    from flowalign.training.runs import LatentRewardRun, run_latent_reward

    _run_training(
        LatentRewardRun,
        run_latent_reward,
        config,
        set_,
        resume,
        {
            "model": model,
            "data": data,
            "teacher": teacher,
            "train.output_dir": out,
            "train.max_steps": steps,
            "reward.dimensions": f"[{dimensions}]" if dimensions else None,
        },
    )


@train_app.command("fdistill")
def train_fdistill(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    teacher: Annotated[str | None, typer.Option(help="Teacher: hub id or folder of a flow model.")] = None,
    divergence: Annotated[
        str | None, typer.Option(help="js, kl, rkl, sf, sh, jf, pearson, neyman, alpha.")
    ] = None,
    out: Annotated[Path | None, typer.Option()] = None,
    steps: Annotated[int | None, typer.Option()] = None,
    resume: ResumeOpt = False,
) -> None:
    """f-distill: a one-step generator by f-divergence distribution matching."""
    from flowalign.training.methods.fdistill import FDistillRun, run_fdistill

    _run_training(
        FDistillRun,
        run_fdistill,
        config,
        set_,
        resume,
        {
            "teacher": teacher,
            "method.divergence": divergence,
            "train.output_dir": out,
            "train.max_steps": steps,
        },
    )


@train_app.command("distar")
def train_distar(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    teacher: Annotated[
        str | None, typer.Option(help="Teacher (reference diffusion): hub id or folder.")
    ] = None,
    reward: Annotated[str | None, typer.Option(help="A differentiable reward name.")] = None,
    reward_scale: Annotated[float | None, typer.Option()] = None,
    alpha: Annotated[float | None, typer.Option(help="Weight of the score-divergence regulariser.")] = None,
    out: Annotated[Path | None, typer.Option()] = None,
    steps: Annotated[int | None, typer.Option()] = None,
    resume: ResumeOpt = False,
) -> None:
    """Diff-Instruct*: a reward-aligned one-step generator with score-divergence regularisation."""
    from flowalign.training.methods.distar import DistarRun, run_distar

    _run_training(
        DistarRun,
        run_distar,
        config,
        set_,
        resume,
        {
            "teacher": teacher,
            "method.reward": reward,
            "method.reward_scale": reward_scale,
            "method.alpha": alpha,
            "train.output_dir": out,
            "train.max_steps": steps,
        },
    )


@train_app.command("cdt")
def train_cdt_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option()] = None,
    steps: Annotated[int | None, typer.Option()] = None,
    resume: ResumeOpt = False,
) -> None:
    """CDT: a conditioned-diffusion video tokenizer (toy clips by default; --set data.source=DIR)."""
    from flowalign.training.methods.cdt import CDTRunConfig, train_cdt

    _run_training(
        CDTRunConfig, train_cdt, config, set_, resume, {"train.output_dir": out, "train.max_steps": steps}
    )


@train_app.command("reward")
def train_reward(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data: Annotated[
        str | None,
        typer.Option(help="Preference pairs with per-dimension labels (jsonl, VideoAlign csv, parquet)."),
    ] = None,
    toy: Annotated[
        str | None, typer.Option(help="Oracle-labelled toy pairs instead: image or video.")
    ] = None,
    out: Annotated[Path | None, typer.Option()] = None,
    steps: Annotated[int | None, typer.Option()] = None,
    resume: ResumeOpt = False,
) -> None:
    """Multi-head reward model (vq/mq/ta heads, BTT loss); prints held-out accuracy per dimension."""
    from flowalign.config import load_config
    from flowalign.training.methods.reward_run import RewardModelRun, run_reward_model

    if data is not None and toy is not None:
        fail("give --data PAIRS or --toy image|video, not both")
    if toy is not None and toy not in ("image", "video"):
        fail(f"--toy must be image or video, got {toy!r}")
    shortcuts = {
        "data.source": f"toy:{toy}" if toy else data,
        "train.output_dir": out,
        "train.max_steps": steps,
    }
    sets = [f"{k}={v}" for k, v in shortcuts.items() if v is not None] + list(set_ or [])
    try:
        result = run_reward_model(load_config(RewardModelRun, config, sets), resume=resume)
    except (ValueError, FileExistsError) as err:
        fail(str(err))  # all lines: a dataset check lists each invalid row
    typer.echo(
        f"trained {result.train.step} steps; model in {result.train.export_dir or result.train.checkpoint}"
    )
    for dim, row in (result.metrics or {}).items():
        typer.echo(
            f"held-out {dim}: accuracy {row['accuracy']:.4f} ({row['num_decided']} non-tie pairs), "
            f"with ties {row['accuracy_with_ties']:.4f} ({row['num_pairs']} pairs)"
        )
    if result.metrics_path is not None:
        typer.echo(f"wrote {result.metrics_path}")


tokenize_app = typer.Typer(
    help="Encode, decode and reconstruct media with a CDT tokenizer.", no_args_is_help=True
)
app.add_typer(tokenize_app, name="tokenize")
TokModel = Annotated[Path, typer.Option("--model", help="Tokenizer folder (from `flowalign train cdt`).")]


@tokenize_app.command("encode")
def tokenize_encode(
    model: TokModel,
    input: Annotated[Path, typer.Option()],
    out: Annotated[Path, typer.Option()],
    device: Annotated[str, typer.Option()] = "cpu",
) -> None:
    """Video or image -> latent file."""
    from flowalign.tokenizers.files import encode_file

    try:
        path = encode_file(model, input, out, device=device)
    except USER_ERRORS as err:
        fail(str(err).splitlines()[0])
    typer.echo(f"wrote {path}")


@tokenize_app.command("decode")
def tokenize_decode(
    model: TokModel,
    input: Annotated[Path, typer.Option()],
    out: Annotated[Path, typer.Option()],
    steps: Annotated[int, typer.Option(help="DDIM steps (1 by default).")] = 1,
    device: Annotated[str, typer.Option()] = "cpu",
) -> None:
    """Latent file -> video or image."""
    from flowalign.tokenizers.files import decode_file

    try:
        path = decode_file(model, input, out, num_inference_steps=steps, device=device)
    except USER_ERRORS as err:
        fail(str(err).splitlines()[0])
    typer.echo(f"wrote {path}")


@tokenize_app.command("reconstruct")
def tokenize_reconstruct(
    model: TokModel,
    input: Annotated[list[Path], typer.Option(help="Files (repeat).")],
    out: Annotated[Path, typer.Option()],
    steps: Annotated[int, typer.Option()] = 1,
    device: Annotated[str, typer.Option()] = "cpu",
) -> None:
    """Encode + decode files; writes the reconstructions and metrics.json (PSNR, SSIM, LPIPS)."""
    import json as _json

    from flowalign.tokenizers.files import reconstruct_files

    try:
        metrics = reconstruct_files(model, input, out, num_inference_steps=steps, device=device)
    except USER_ERRORS as err:
        fail(str(err).splitlines()[0])
    typer.echo(_json.dumps(metrics.get("mean", metrics), indent=1, default=str))


def _parse_floats(text: str, option: str) -> list[float]:
    """``"1,1.5,3"`` -> [1.0, 1.5, 3.0], or one error naming the option and the bad item."""
    values = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        try:
            values.append(float(item))
        except ValueError:
            raise ValueError(f"{option}: {item!r} is not a number") from None
    return values


def _parse_weights(weights: str | None) -> dict[str, float] | None:
    from flowalign.rewards.combine import parse_weights

    return parse_weights(weights) if weights else None


@app.command()
def pairs(
    model: Annotated[str, typer.Option(help="Model to sample candidates from.")],
    out: Annotated[Path, typer.Option(help="Output folder: pairs.jsonl, candidates.jsonl, media.")],
    reward: Annotated[
        str, typer.Option(help="Reward names, comma separated (e.g. toy or pickscore,hpsv2.1).")
    ],
    prompts_file: Annotated[Path | None, typer.Option(help="Prompts file.")] = None,
    toy_split: Annotated[
        str | None, typer.Option(help="Use the toy world's prompts: train or heldout.")
    ] = None,
    weights: Annotated[str | None, typer.Option(help="Dimension weights, e.g. ta=1,vq=0.5.")] = None,
    num_candidates: Annotated[int, typer.Option(help="Samples per prompt (K).")] = 4,
    mode: Annotated[str, typer.Option(help="best_worst or all.")] = "best_worst",
    margin: Annotated[float, typer.Option(help="Minimum reward gap for a pair.")] = 0.0,
    steps: Annotated[int | None, typer.Option()] = None,
    guidance_scale: Annotated[float | None, typer.Option()] = None,
    seed: Annotated[int, typer.Option()] = 0,
    batch_size: Annotated[int, typer.Option()] = 32,
    video_format: Annotated[
        str, typer.Option(help="Video files: mp4 (lossy) or npy (exact frames, for tiny clips).")
    ] = "mp4",
    device: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Build a preference dataset from a model: K samples per prompt, scored, best vs worst."""
    from flowalign.data.prompts import load_prompts
    from flowalign.models import load_flow_model
    from flowalign.rewards import load_reward
    from flowalign.rewards.combine import RewardCombiner
    from flowalign.workflows.pairs import PairsConfig, build_pairs

    try:
        if toy_split is not None:
            from flowalign.toy.world import toy_prompts

            prompt_list = toy_prompts(toy_split, "image")
        elif prompts_file is not None:
            prompt_list = load_prompts(prompts_file)
        else:
            fail("give --prompts-file FILE or --toy-split train|heldout")
        torch_device, torch_dtype = _device_and_dtype(device, None)
        flow_model = load_flow_model(model, torch_dtype=torch_dtype, device=torch_device)
        if flow_model.is_video and toy_split is not None:
            prompt_list = toy_prompts(toy_split, "video")
        combiner = RewardCombiner(
            [load_reward(n.strip(), device=torch_device) for n in reward.split(",")], _parse_weights(weights)
        )
        config = PairsConfig(
            num_candidates=num_candidates,
            mode=mode,
            margin=margin,
            seed=seed,
            guidance_scale=guidance_scale,
            num_inference_steps=steps,
            batch_size=batch_size,
            video_ext="." + video_format.lstrip("."),
        )
        _, chosen = build_pairs(flow_model, prompt_list, combiner.score, out, config)
    except USER_ERRORS as err:
        fail(str(err).splitlines()[0])
    typer.echo(f"wrote {len(chosen)} pairs to {out / 'pairs.jsonl'}")


@app.command()
def rechoose(
    folder: Annotated[Path, typer.Argument(help="A folder written by 'flowalign pairs'.")],
    weights: Annotated[str, typer.Option(help="New dimension weights, e.g. ta=1 or ta=1,vq=0.1.")],
    out_file: Annotated[str, typer.Option(help="Name of the new pairs jsonl inside FOLDER.")],
    mode: Annotated[str, typer.Option(help="best_worst or all.")] = "best_worst",
    margin: Annotated[float, typer.Option(help="Minimum weighted-score gap for a pair.")] = 0.0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT_FILE.")] = False,
) -> None:
    """Choose pairs again from scored candidates with new weights, without sampling them again."""
    from flowalign.workflows.pairs import rechoose_pairs

    try:
        path, chosen = rechoose_pairs(
            folder,
            _parse_weights(weights) or {},
            filename=out_file,
            mode=mode,
            margin=margin,
            overwrite=overwrite,
        )
    except USER_ERRORS as err:
        fail(str(err).splitlines()[0])
    typer.echo(f"wrote {len(chosen)} pairs to {path}")


@app.command()
def score(
    reward: Annotated[str, typer.Option(help="Reward names, comma separated; options as name:key=value.")],
    media: Annotated[list[str], typer.Option(help="A manifest.jsonl, a folder, or files (repeat).")],
    out: Annotated[Path, typer.Option(help="scores.jsonl (incremental, resumable) or .parquet.")],
    prompts: Annotated[
        Path | None, typer.Option(help="Prompts file, one per media file (not with a manifest).")
    ] = None,
    weights: Annotated[
        str | None, typer.Option(help="Dimension weights for 'overall', e.g. vq=1,mq=0.5,ta=2.")
    ] = None,
    batch_size: Annotated[int, typer.Option()] = 16,
    device: Annotated[str | None, typer.Option()] = None,
    dtype: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Score media with one or more reward models."""
    from flowalign.data.prompts import load_prompts
    from flowalign.rewards.registry import parse_reward_spec
    from flowalign.rewards.scoring import score_files

    try:
        specs = [parse_reward_spec(s) for s in reward.split(",") if s.strip()]
        names = [name for name, _ in specs]
        kwargs = {name: opts for name, opts in specs if opts}
        prompt_list = load_prompts(prompts) if prompts is not None else None
        source = media[0] if len(media) == 1 else media
        torch_device, torch_dtype = _device_and_dtype(device, dtype)
        result = score_files(
            names,
            source,
            prompt_list,
            _parse_weights(weights),
            out,
            batch_size=batch_size,
            device=torch_device,
            dtype=torch_dtype,
            reward_kwargs=kwargs,
        )
    except USER_ERRORS as err:
        fail(str(err).splitlines()[0])
    typer.echo(f"scored {result.num_scored} items ({result.num_skipped} already done) into {out}")


@app.command("eval")
def eval_(
    out: Annotated[Path, typer.Option(help="Evaluation folder (report.html, report.json, media, scores).")],
    models: Annotated[
        list[str] | None, typer.Option(help="name=path[:key=value,...] (repeat); a path alone too.")
    ] = None,
    prompts: Annotated[
        list[str] | None, typer.Option(help="Prompt set: toy-heldout, parti:FILE, a prompts file...")
    ] = None,
    rewards: Annotated[str, typer.Option(help="Reward names, comma separated.")] = "toy",
    samples_per_prompt: Annotated[int, typer.Option()] = 1,
    seeds: Annotated[str, typer.Option(help="Base seeds of repetitions, comma separated.")] = "0",
    base: Annotated[str | None, typer.Option(help="Name of the base model for win rates and drift.")] = None,
    weights: Annotated[str | None, typer.Option(help="Dimension weights for 'overall'.")] = None,
    steps: Annotated[int | None, typer.Option()] = None,
    guidance_scale: Annotated[float | None, typer.Option()] = None,
    guidance_sweep: Annotated[
        str | None,
        typer.Option(
            help="Evaluate every model at each of these guidance scales (e.g. 1,2,3), as NAME_cfgG."
        ),
    ] = None,
    rerun: Annotated[
        bool, typer.Option("--rerun", help="Re-run from OUT/report.json, reusing everything.")
    ] = False,
    device: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Compare checkpoints on prompt sets with rewards: one reproducible HTML + JSON report."""
    from flowalign.evals.runner import EvalOptions, parse_model_spec, rerun_eval, run_eval, sweep_guidance
    from flowalign.pipelines.generate_files import GenerationSettings

    try:
        if rerun:
            result = rerun_eval(out)
        else:
            if not models or not prompts:
                fail("give --models and --prompts (or --rerun)")
            specs = {}
            for i, item in enumerate(models):
                name, spec = parse_model_spec(item if "=" in item.split(":")[0] else f"model{i}={item}")
                specs[name] = spec
            if guidance_sweep is not None:
                if guidance_scale is not None:
                    fail("give --guidance-scale or --guidance-sweep, not both")
                specs = sweep_guidance(specs, _parse_floats(guidance_sweep, "--guidance-sweep"))
            torch_device, torch_dtype = _device_and_dtype(device, None)
            options = EvalOptions(
                settings=GenerationSettings(num_inference_steps=steps, guidance_scale=guidance_scale),
                weights=_parse_weights(weights),
                base=base,
                device=torch_device,
                dtype=torch_dtype,
            )
            result = run_eval(
                specs,
                prompts if len(prompts) > 1 else prompts[0],
                [r.strip() for r in rewards.split(",") if r.strip()],
                out_dir=out,
                samples_per_prompt=samples_per_prompt,
                seeds=[int(x) for x in seeds.split(",")],
                options=options,
            )
    except USER_ERRORS as err:
        fail(str(err).splitlines()[0])
    for failure in result.failures:
        typer.echo(f"failed: {failure}", err=True)
    typer.echo(f"wrote {result.html_path} and {result.json_path}")
    if result.failures and not result.report.get("timings", {}).get("num_samples"):
        fail(
            f"no sample was generated or scored ({len(result.failures)} failures; see {result.json_path})", 1
        )


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder (summary.md, index.html, grids).")] = Path(
        "runs/demo"
    ),
    stages: Annotated[str, typer.Option(help="Comma-separated stages: base, dpo, nrg, onestep.")] = "base",
    samples: Annotated[int, typer.Option(help="Held-out samples per evaluated model.")] = 256,
    base_steps: Annotated[
        int, typer.Option(help="Training steps of the toy base model (1500 matches the README's tables).")
    ] = 900,
) -> None:
    """The toy world end to end: base model, held-out evaluation with exact oracles, Flow-DPO."""
    from flowalign.experiments.demo import DemoConfig, run_demo

    try:
        report = run_demo(
            DemoConfig(
                out_dir=out,
                stages=tuple(s.strip() for s in stages.split(",") if s.strip()),
                num_samples=samples,
                base_steps=base_steps,
            )
        )
    except USER_ERRORS as err:
        fail(str(err).splitlines()[0])
    typer.echo(report.table_md())
    typer.echo(f"\nwrote {out / 'summary.md'} and {out / 'index.html'}")


@app.command("lora-comfyui")
def lora_comfyui(
    lora: Annotated[Path, typer.Argument(help="A Wan LoRA exported by training (folder or .safetensors).")],
    out: Annotated[Path, typer.Option(help="The ComfyUI LoRA file to write.")],
) -> None:
    """Rename a Wan LoRA to the original Wan keys ComfyUI loads (SD3/FLUX LoRAs load there as exported)."""
    from flowalign.training.lora_comfyui import convert_wan_lora_to_comfyui

    try:
        written = convert_wan_lora_to_comfyui(lora, out)
    except USER_ERRORS as err:
        fail(str(err).splitlines()[0])
    typer.echo(f"wrote {written}")


def _nrg_factory(flow_model, guide: Path, weights: str | None, strength: float, steps: str | None):
    """Per-batch Flow-NRG transforms from a latent reward folder (errors name the bad value)."""
    from flowalign.rewards.combine import parse_weights
    from flowalign.rewards.latent import LatentRewardModel
    from flowalign.sampling.nrg import latent_reward_guidance

    if strength < 0:
        raise ValueError(f"--guidance-strength must be >= 0, got {strength}")
    step_range = None
    if steps:
        try:
            a, b = (float(x) for x in steps.split(":"))
        except ValueError:
            raise ValueError(f"--guide-steps must look like 0.2:0.9, got {steps!r}") from None
        step_range = (a, b)
    reward_model = LatentRewardModel.from_pretrained(guide, model=flow_model, device=flow_model.device)
    dims = parse_weights(weights) if weights else {d: 1.0 for d in reward_model.dimensions}
    reward_model.check_weights(dims)
    return lambda prompts: [
        latent_reward_guidance(
            flow_model, reward_model, prompts, dims, strength=strength, step_range=step_range
        )
    ]


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    sys.exit(main())
