"""``flowalign train <method>``: one command per method, each a YAML recipe plus shortcut options."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
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


def _opt(kind: Any, help: str | None = None) -> Any:
    """A command's shortcut option for one config key: a ``kind`` value, or None to keep the config's."""
    return Annotated[kind | None, typer.Option(help=help)]


def _help_config(run_config: str) -> Any:
    """The ``--help-config`` option of a command whose run config is the dataclass ``module:Name``:
    it prints every config key with its type, default and documentation, then exits."""

    def show(value: bool) -> None:
        if value:
            from flowalign.config import config_help

            typer.echo(config_help(_load(run_config)))
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


def _load(spec: str) -> Any:
    """The object ``module:name``."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


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


RUN_KEY = "__run__"
"""A command's shortcuts may name another (run config, runner) pair under this key (``train dpo --online``)."""


def _train_command(name: str, run_config: str, runner: str) -> Callable[[Callable[..., dict]], Any]:
    """Register ``flowalign train <name>`` from a function that declares the command's own shortcut options
    and returns them as ``{config key: value}`` (None: not given; :data:`RUN_KEY`: another run config
    and runner, module:name each).

    The options every command has are added here: ``--config``, ``--set`` and ``--help-config`` (of the
    run config dataclass ``run_config``, "module:Name") before the function's own, ``--out``, ``--steps``
    and ``--resume`` after them. The command loads the run config and trains it with ``runner``
    ("module:name")."""

    def register(shortcuts: Callable[..., dict]) -> Any:
        def param(key: str, annotation: Any, default: Any) -> inspect.Parameter:
            return inspect.Parameter(
                key, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
            )

        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in _own_params(shortcuts)]
        head = [param("config", ConfigOpt, None), param("set_", SetOpt, None)]
        head.append(param("help_config", _help_config(run_config), False))
        tail = [param("out", OutOpt, None), param("steps", StepsOpt, None), param("resume", ResumeOpt, False)]

        def command(**options: Any) -> None:
            common = {
                key: options.pop(key) for key in ("config", "set_", "help_config", "out", "steps", "resume")
            }
            keys = shortcuts(**options)
            config_spec, runner_spec = keys.pop(RUN_KEY, (run_config, runner))
            _run_training(
                _load(config_spec), _load(runner_spec), common["config"], common["set_"], common["resume"],
                keys, out=common["out"], steps=common["steps"],
            )  # fmt: skip

        command.__signature__ = inspect.Signature([*head, *own, *tail])
        command.__name__, command.__doc__ = shortcuts.__name__, shortcuts.__doc__
        return train_app.command(name)(command)

    return register


def _own_params(fn: Callable[..., Any]) -> list[inspect.Parameter]:
    """``fn``'s parameters with their annotations evaluated (this module has postponed annotations)."""
    return list(inspect.signature(fn, eval_str=True).parameters.values())


@_train_command("sft", "flowalign.training.runs:SFTRun", "flowalign.training.runs:run_sft")
def train_sft(
    model: _opt(str, "Hub id, folder, or toy:image / toy:video.") = None,
    data: _opt(str, "toy:image / toy:video (toy:train: the model's kind) or a manifest.jsonl.") = None,
    no_t5: NoT5Opt = False,
) -> dict[str, object]:
    """Flow-matching fine-tuning (pretrains the toy base models)."""
    return {"model": model, "data": data, "drop_t5": no_t5 or None}


@_train_command("dpo", "flowalign.training.runs:DPORun", "flowalign.training.runs:run_dpo")
def train_dpo(
    model: _opt(str, "Base model: hub id or folder.") = None,
    data: _opt(str, "pairs.jsonl, VideoAlign csv or Pick-a-Pic parquet.") = None,
    beta: _opt(float, "DPO beta (mean-reduced errors).") = None,
    no_t5: NoT5Opt = False,
    online: Annotated[
        bool,
        typer.Option(
            "--online",
            help="Iterative Flow-DPO: --data is a prompt spec (toy:train or a prompt file) and pairs are "
            "sampled from the current policy every online.regenerate_every steps (--set rewards=[toy]).",
        ),
    ] = False,
) -> dict[str, object]:
    """Flow-DPO preference fine-tuning (LoRA by default; --set lora=null for a full fine-tune)."""
    if online:
        online_run = "flowalign.workflows.online_dpo_run"
        run = (f"{online_run}:OnlineDPORun", f"{online_run}:run_online_dpo")
        return {RUN_KEY: run, "model": model, "prompts": data, "dpo.beta": beta}
    return {"model": model, "data": data, "dpo.beta": beta, "drop_t5": no_t5 or None}


@_train_command("rwr", "flowalign.training.runs:RWRRun", "flowalign.training.runs:run_rwr")
def train_rwr(
    model: _opt(str, "Base model: hub id or folder.") = None,
    data: _opt(str, "candidates.jsonl from `flowalign pairs`.") = None,
    temperature: _opt(float, "RWR temperature beta.") = None,
    no_t5: NoT5Opt = False,
) -> dict[str, object]:
    """Flow-RWR: reward-weighted flow matching on scored samples."""
    return {"model": model, "data": data, "rwr.temperature": temperature, "drop_t5": no_t5 or None}


@_train_command("grpo", "flowalign.training.grpo_run:GRPORun", "flowalign.training.grpo_run:run_grpo")
def train_grpo(
    model: _opt(str, "Base model: hub id, folder, or toy:image.") = None,
    prompts: _opt(str, "toy:train[:video] or a prompt file (.txt, .jsonl, .json, .csv).") = None,
    reward: _opt(list[str], "Reward spec of the registry (repeat for a mix), e.g. toy.") = None,
    weights: _opt(str, "Per-dimension weights, e.g. ta=1,vq=0.5.") = None,
) -> dict[str, object]:
    """Flow-GRPO: online RL with K SDE samples per prompt, group advantages and a KL to the reference."""
    rewards = "[" + ",".join(reward) + "]" if reward else None
    return {"model": model, "prompts": prompts, "weights": weights, "rewards": rewards}


@_train_command(
    "latent-reward", "flowalign.training.runs:LatentRewardRun", "flowalign.training.runs:run_latent_reward"
)
def train_latent_reward(
    model: _opt(str, "Flow model the guide is for: hub id or folder.") = None,
    data: _opt(str, "Preference pairs with per-dimension labels, or candidates.jsonl from `pairs`.") = None,
    dimensions: _opt(str, "Reward dimensions, e.g. vq,ta or vq,mq,ta.") = None,
    teacher: _opt(str, "Clean reward that labels every batch instead (e.g. toy).") = None,
) -> dict[str, object]:
    """Noise-aware latent reward for Flow-NRG guidance (`generate --guide OUT/final`)."""
    dims = f"[{dimensions}]" if dimensions else None
    return {"model": model, "data": data, "teacher": teacher, "reward.dimensions": dims}


_FDISTILL = "flowalign.training.methods.fdistill"


@_train_command("fdistill", f"{_FDISTILL}:FDistillRun", f"{_FDISTILL}:run_fdistill")
def train_fdistill(
    teacher: _opt(str, "Teacher: hub id or folder of a flow model.") = None,
    divergence: _opt(str, "js, kl, rkl, sf, sh, jf, pearson, neyman, alpha.") = None,
) -> dict[str, object]:
    """f-distill: a one-step generator by f-divergence distribution matching."""
    return {"teacher": teacher, "method.divergence": divergence}


_DISTAR = "flowalign.training.methods.distar"


@_train_command("distar", f"{_DISTAR}:DistarRun", f"{_DISTAR}:run_distar")
def train_distar(
    teacher: _opt(str, "Teacher (reference diffusion): hub id or folder.") = None,
    reward: _opt(str, "A differentiable reward name.") = None,
    reward_scale: _opt(float) = None,
    alpha: _opt(float, "Weight of the score-divergence regulariser.") = None,
) -> dict[str, object]:
    """Diff-Instruct*: a reward-aligned one-step generator with score-divergence regularisation."""
    scaled = {"method.reward_scale": reward_scale, "method.alpha": alpha}
    return {"teacher": teacher, "method.reward": reward, **scaled}


@_train_command(
    "cdt", "flowalign.training.methods.cdt:CDTRunConfig", "flowalign.training.methods.cdt:train_cdt"
)
def train_cdt_cmd() -> dict[str, object]:
    """CDT: a conditioned-diffusion video tokenizer (toy clips by default; --set data.source=DIR)."""
    return {}


@train_app.command("reward")
def train_reward(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    help_config: _help_config("flowalign.training.methods.reward_run:RewardModelRun") = False,
    data: _opt(str, "Preference pairs with per-dimension labels (jsonl, VideoAlign csv, parquet).") = None,
    toy: _opt(str, "Oracle-labelled toy pairs instead: image or video.") = None,
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
