"""``flowalign train <method>``: one command per method, each a YAML recipe plus shortcut options."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated, Any

import typer

from flowalign.cli.app import Group, app, fail

train_app = Group(help="Train a method on the shared loop.", no_args_is_help=True)
app.add_typer(train_app, name="train")

OutOpt = Annotated[Path | None, typer.Option(help="Run folder (checkpoints, logs, final model).")]
StepsOpt = Annotated[int | None, typer.Option(help="Optimizer steps.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML recipe (e.g. configs/toy_dpo.yaml).")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config key: --set train.optim.lr=1e-4")
]
NoT5Opt = Annotated[
    bool, typer.Option("--no-t5", help="SD3/SD3.5: train without the T5 text encoder (drop_t5: true).")
]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue from the newest checkpoint in the run folder.")
]


def _help_config(run_config: str) -> Any:
    """The ``--help-config`` option of a command whose run config is the dataclass ``module:Name``:
    it prints every config key with its type, default and documentation, then exits."""

    def show(value: bool) -> None:
        if value:
            from flowalign.config import config_help

            module, _, name = run_config.partition(":")
            typer.echo(config_help(getattr(importlib.import_module(module), name)))
            raise typer.Exit()

    return Annotated[
        bool,
        typer.Option(
            "--help-config",
            is_eager=True,
            callback=show,
            help="Show every config key (for --config and --set) with its type, default and doc, and exit.",
        ),
    ]


def _run_training(
    run_cls, runner, config, overrides, resume, shortcuts: dict[str, object], *, out=None, steps=None
) -> None:
    """Load the run config (YAML, then the command's shortcut options, then ``--set``) and train.

    ``out`` and ``steps`` are the shortcuts every command has (``train.output_dir``, ``train.max_steps``)."""
    from flowalign.config import load_config

    shortcuts = {**shortcuts, "train.output_dir": out, "train.max_steps": steps}
    sets = [f"{key}={value}" for key, value in shortcuts.items() if value is not None] + list(overrides or [])
    run = load_config(run_cls, config, sets)  # every value checked (finite, in range) by the config loader
    result = runner(run, resume=resume)
    where = result.export_dir or result.checkpoint
    typer.echo(f"trained {result.step} steps; model in {where}")


@train_app.command("sft")
def train_sft(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    help_config: _help_config("flowalign.training.runs:SFTRun") = False,
    model: Annotated[str | None, typer.Option(help="Hub id, folder, or toy:image / toy:video.")] = None,
    data: Annotated[
        str | None,
        typer.Option(help="toy:image / toy:video (toy:train: the model's kind) or a manifest.jsonl."),
    ] = None,
    out: OutOpt = None,
    steps: StepsOpt = None,
    no_t5: NoT5Opt = False,
    resume: ResumeOpt = False,
) -> None:
    """Flow-matching fine-tuning (pretrains the toy base models)."""
    from flowalign.training.runs import SFTRun, run_sft

    overrides = {"model": model, "data": data, "drop_t5": no_t5 or None}
    _run_training(SFTRun, run_sft, config, set_, resume, overrides, out=out, steps=steps)


@train_app.command("dpo")
def train_dpo(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    help_config: _help_config("flowalign.training.runs:DPORun") = False,
    model: Annotated[str | None, typer.Option(help="Base model: hub id or folder.")] = None,
    data: Annotated[
        str | None, typer.Option(help="pairs.jsonl, VideoAlign csv or Pick-a-Pic parquet.")
    ] = None,
    out: OutOpt = None,
    steps: StepsOpt = None,
    beta: Annotated[float | None, typer.Option(help="DPO beta (mean-reduced errors).")] = None,
    no_t5: NoT5Opt = False,
    resume: ResumeOpt = False,
    online: Annotated[
        bool,
        typer.Option(
            "--online",
            help="Iterative Flow-DPO: --data is a prompt spec (toy:train or a prompt file) and pairs are "
            "sampled from the current policy every online.regenerate_every steps (--set rewards=[toy]).",
        ),
    ] = False,
) -> None:
    """Flow-DPO preference fine-tuning (LoRA by default; --set lora=null for a full fine-tune)."""
    if online:
        from flowalign.workflows.online_dpo_run import OnlineDPORun, run_online_dpo

        overrides = {"model": model, "prompts": data, "dpo.beta": beta}
        _run_training(OnlineDPORun, run_online_dpo, config, set_, resume, overrides, out=out, steps=steps)
        return
    from flowalign.training.runs import DPORun, run_dpo

    overrides = {"model": model, "data": data, "dpo.beta": beta, "drop_t5": no_t5 or None}
    _run_training(DPORun, run_dpo, config, set_, resume, overrides, out=out, steps=steps)


@train_app.command("rwr")
def train_rwr(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    help_config: _help_config("flowalign.training.runs:RWRRun") = False,
    model: Annotated[str | None, typer.Option(help="Base model: hub id or folder.")] = None,
    data: Annotated[str | None, typer.Option(help="candidates.jsonl from `flowalign pairs`.")] = None,
    out: OutOpt = None,
    steps: StepsOpt = None,
    temperature: Annotated[float | None, typer.Option(help="RWR temperature beta.")] = None,
    no_t5: NoT5Opt = False,
    resume: ResumeOpt = False,
) -> None:
    """Flow-RWR: reward-weighted flow matching on scored samples."""
    from flowalign.training.runs import RWRRun, run_rwr

    overrides = {
        "model": model,
        "data": data,
        "rwr.temperature": temperature,
        "drop_t5": no_t5 or None,
    }
    _run_training(RWRRun, run_rwr, config, set_, resume, overrides, out=out, steps=steps)


@train_app.command("grpo")
def train_grpo(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    help_config: _help_config("flowalign.training.grpo_run:GRPORun") = False,
    model: Annotated[str | None, typer.Option(help="Base model: hub id, folder, or toy:image.")] = None,
    prompts: Annotated[
        str | None, typer.Option(help="toy:train[:video] or a prompt file (.txt, .jsonl, .json, .csv).")
    ] = None,
    reward: Annotated[
        list[str] | None, typer.Option(help="Reward spec of the registry (repeat for a mix), e.g. toy.")
    ] = None,
    weights: Annotated[str | None, typer.Option(help="Per-dimension weights, e.g. ta=1,vq=0.5.")] = None,
    out: OutOpt = None,
    steps: StepsOpt = None,
    resume: ResumeOpt = False,
) -> None:
    """Flow-GRPO: online RL with K SDE samples per prompt, group advantages and a KL to the reference."""
    from flowalign.training.grpo_run import GRPORun, run_grpo

    overrides = {
        "model": model,
        "prompts": prompts,
        "weights": weights,
        "rewards": "[" + ",".join(reward) + "]" if reward else None,
    }
    _run_training(GRPORun, run_grpo, config, set_, resume, overrides, out=out, steps=steps)


@train_app.command("latent-reward")
def train_latent_reward(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    help_config: _help_config("flowalign.training.runs:LatentRewardRun") = False,
    model: Annotated[str | None, typer.Option(help="Flow model the guide is for: hub id or folder.")] = None,
    data: Annotated[
        str | None,
        typer.Option(help="Preference pairs with per-dimension labels, or candidates.jsonl from `pairs`."),
    ] = None,
    out: OutOpt = None,
    steps: StepsOpt = None,
    dimensions: Annotated[str | None, typer.Option(help="Reward dimensions, e.g. vq,ta or vq,mq,ta.")] = None,
    teacher: Annotated[
        str | None, typer.Option(help="Clean reward that labels every batch instead (e.g. toy).")
    ] = None,
    resume: ResumeOpt = False,
) -> None:
    """Noise-aware latent reward for Flow-NRG guidance (`generate --guide OUT/final`)."""
    from flowalign.training.runs import LatentRewardRun, run_latent_reward

    overrides = {
        "model": model,
        "data": data,
        "teacher": teacher,
        "reward.dimensions": f"[{dimensions}]" if dimensions else None,
    }
    _run_training(LatentRewardRun, run_latent_reward, config, set_, resume, overrides, out=out, steps=steps)


@train_app.command("fdistill")
def train_fdistill(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    help_config: _help_config("flowalign.training.methods.fdistill:FDistillRun") = False,
    teacher: Annotated[str | None, typer.Option(help="Teacher: hub id or folder of a flow model.")] = None,
    divergence: Annotated[
        str | None, typer.Option(help="js, kl, rkl, sf, sh, jf, pearson, neyman, alpha.")
    ] = None,
    out: OutOpt = None,
    steps: StepsOpt = None,
    resume: ResumeOpt = False,
) -> None:
    """f-distill: a one-step generator by f-divergence distribution matching."""
    from flowalign.training.methods.fdistill import FDistillRun, run_fdistill

    overrides = {
        "teacher": teacher,
        "method.divergence": divergence,
    }
    _run_training(FDistillRun, run_fdistill, config, set_, resume, overrides, out=out, steps=steps)


@train_app.command("distar")
def train_distar(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    help_config: _help_config("flowalign.training.methods.distar:DistarRun") = False,
    teacher: Annotated[
        str | None, typer.Option(help="Teacher (reference diffusion): hub id or folder.")
    ] = None,
    reward: Annotated[str | None, typer.Option(help="A differentiable reward name.")] = None,
    reward_scale: Annotated[float | None, typer.Option()] = None,
    alpha: Annotated[float | None, typer.Option(help="Weight of the score-divergence regulariser.")] = None,
    out: OutOpt = None,
    steps: StepsOpt = None,
    resume: ResumeOpt = False,
) -> None:
    """Diff-Instruct*: a reward-aligned one-step generator with score-divergence regularisation."""
    from flowalign.training.methods.distar import DistarRun, run_distar

    overrides = {
        "teacher": teacher,
        "method.reward": reward,
        "method.reward_scale": reward_scale,
        "method.alpha": alpha,
    }
    _run_training(DistarRun, run_distar, config, set_, resume, overrides, out=out, steps=steps)


@train_app.command("cdt")
def train_cdt_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    help_config: _help_config("flowalign.training.methods.cdt:CDTRunConfig") = False,
    out: OutOpt = None,
    steps: StepsOpt = None,
    resume: ResumeOpt = False,
) -> None:
    """CDT: a conditioned-diffusion video tokenizer (toy clips by default; --set data.source=DIR)."""
    from flowalign.training.methods.cdt import CDTRunConfig, train_cdt

    _run_training(CDTRunConfig, train_cdt, config, set_, resume, {}, out=out, steps=steps)


@train_app.command("reward")
def train_reward(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    help_config: _help_config("flowalign.training.methods.reward_run:RewardModelRun") = False,
    data: Annotated[
        str | None,
        typer.Option(help="Preference pairs with per-dimension labels (jsonl, VideoAlign csv, parquet)."),
    ] = None,
    toy: Annotated[
        str | None, typer.Option(help="Oracle-labelled toy pairs instead: image or video.")
    ] = None,
    out: OutOpt = None,
    steps: StepsOpt = None,
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
