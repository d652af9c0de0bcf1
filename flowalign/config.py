"""Typed run configuration: nested dataclasses, YAML recipes and dotted command-line overrides.

Every knob of a run lives in a dataclass here (or in a method's own config, which nests
:class:`TrainConfig`). LoRA is set once per run, by the run config's top-level ``lora`` block
(:class:`LoraConfig`; ``lora=null`` for a full fine-tune), never under ``train``. Each field is documented once, by the attribute docstring under it;
:func:`describe_config` reads those docstrings back (for ``--help`` texts and docs).

Loading order (later wins): the dataclass defaults, then the YAML file, then the overrides::

    cfg = load_config(DPORun, "configs/toy_dpo.yaml", ["train.optim.lr=1e-4", "lora.rank=8"])

Values are coerced to the annotated type (``"1e-4"`` -> float, ``[0.9, 0.99]`` -> tuple, ``"runs/x"``
-> Path, ``null`` -> None for optional fields). An unknown key, a value of the wrong type or an
out-of-range value raises :class:`ConfigError` naming the full dotted key, where it came from
(the YAML file or the override) and, for unknown keys, the closest valid keys.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import re
import textwrap
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from flowalign.config_types import (
    ALLOW_INF,
    ConfigError,
    MemorySaverKeys,
    MissingConfigKey,
    _build,
    _check,
    _dataclass_in,
    _is_union,
    _load_yaml,
    _non_none,
    _type_hints,
    _type_name,
    _unknown_key_error,
)
from flowalign.files import atomic_write_text
from flowalign.validation import short_repr

__all__ = [
    "ALLOW_INF",
    "CheckpointConfig",
    "ConfigError",
    "EMAConfig",
    "LoraConfig",
    "OptimConfig",
    "TrainConfig",
    "ValidationConfig",
    "config_from_dict",
    "config_to_dict",
    "describe_config",
    "load_config",
    "save_config",
]

C = TypeVar("C")

_MAX_YAML_BYTES = 1 << 20  # a config file above 1 MiB is refused unread (the recipes are ~1-3 KB)


# --------------------------------------------------------------------------------------------
# The configs


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW and its learning-rate schedule (one optimizer per parameter group)."""

    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    """"adamw" (torch) or "adamw8bit": bitsandbytes' AdamW with both moments stored in 8 bits
    (block-wise quantised; 2 bytes of state per parameter instead of 8), for big full fine-tunes.
    Needs the ``bitsandbytes`` extra; tensors under 4096 elements keep 32-bit state."""
    lr: float = 1e-4
    """Peak learning rate (reached after ``warmup_steps``)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    weight_decay: float = 1e-2
    """AdamW decoupled weight decay, applied to every trainable parameter."""
    eps: float = 1e-8
    """AdamW epsilon."""
    fused: bool | None = None
    """Fused AdamW kernel: None = use it on CUDA only, True = always (fails where torch lacks it), False = never
    (torch's AdamW only)."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate shape after warm-up: constant, linear decay to 0, or half-cosine decay to 0 at max_steps."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0 to ``lr``."""

    def __post_init__(self) -> None:
        _check(self.lr >= 0, "lr", f"must be >= 0, got {self.lr}")
        _check(all(0 <= b < 1 for b in self.betas), "betas", f"must lie in [0, 1), got {self.betas}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        _check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")


@dataclass(kw_only=True)
class LoraConfig:
    """Low-rank adapters (peft LoRA) on the trainable network instead of a full fine-tune."""

    rank: int = 16
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / rank."""
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """Names (suffixes) of the linear layers that get adapters (diffusers attention projections by default)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch input."""
    init: Literal["default", "gaussian"] = "default"
    """peft init of A: "default" (Kaiming-uniform) or "gaussian" (N(0, 1/rank)); B = 0 in both, so training starts at the base model."""
    export_merged: bool = True
    """At the end of a DPO/RWR run also write the whole model with the adapters merged (next to
    ``lora/``), merged on the CPU in the base's dtype; false writes the LoRA file only (small and
    fast; diffusers' ``load_lora_weights`` reads it)."""

    def __post_init__(self) -> None:
        _check(self.rank >= 1, "rank", f"must be >= 1, got {self.rank}")
        _check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        _check(len(self.target_modules) > 0, "target_modules", "must name at least one module")
        _check(0 <= self.dropout < 1, "dropout", f"must lie in [0, 1), got {self.dropout}")


@dataclass(kw_only=True)
class EMAConfig:
    """Exponential moving average of the trainable weights (an fp32 shadow copy)."""

    use: bool = False
    """Keep an fp32 EMA of the trained parameters only (``requires_grad``: for a LoRA run the adapters,
    never the frozen base; saved in checkpoints, exported to ``final-ema/``)."""
    decay: float = 0.9999
    """shadow <- decay * shadow + (1 - decay) * param, at each EMA update."""
    every: int = 1
    """Update the EMA every this many optimizer steps."""
    start_step: int = 0
    """Before this step the shadow is a plain copy of the weights (decay 0)."""

    def __post_init__(self) -> None:
        _check(0 <= self.decay < 1, "decay", f"must lie in [0, 1), got {self.decay}")
        _check(self.every >= 1, "every", f"must be >= 1, got {self.every}")
        _check(self.start_step >= 0, "start_step", f"must be >= 0, got {self.start_step}")


@dataclass(kw_only=True)
class CheckpointConfig:
    """Periodic, atomic checkpoints under ``output_dir/checkpoint-<step 8 digits>/``."""

    every: int = 500
    """Write a checkpoint every this many steps (0 = only at the end and on SIGTERM)."""
    keep_last: int | None = 3
    """Keep only the newest this many complete checkpoints (None = keep all)."""
    layout: str = "auto"
    """"full": whole tensors gathered on the main process; "sharded": each process writes its own
    shards (torch.distributed.checkpoint); "auto": sharded under FSDP2, else full. Either resumes
    under any process count."""

    def __post_init__(self) -> None:
        _check(self.every >= 0, "every", f"must be >= 0, got {self.every}")
        _check(
            self.layout in ("auto", "full", "sharded"),
            "layout",
            f"must be auto, full or sharded, got {self.layout!r}",
        )
        _check(
            self.keep_last is None or self.keep_last >= 1,
            "keep_last",
            f"must be >= 1 or null, got {self.keep_last}",
        )


@dataclass(kw_only=True)
class ValidationConfig:
    """Sample previews during training (``train.validation``): the model as it trains (LoRA on)
    samples fixed prompts every ``every`` steps into ``<output_dir>/samples/step-<6 digits>/`` and
    the trackers, on the main process, without touching the training random state."""

    prompts: list[str] = field(default_factory=list)
    """The prompts of each preview (one sample each)."""
    every: int = 100
    """Write previews after every this many optimizer steps."""
    seed: int = 0
    """Seed of the preview noise: prompt i starts from the noise of seed + i at every preview."""
    steps: int | None = None
    """Sampling steps (None: the family's default)."""
    guidance_scale: float | None = None
    """CFG scale, or FLUX.1-dev's embedded guidance (None: the family's default)."""
    height: int | None = None
    """Preview height in pixels (None: the family's default)."""
    width: int | None = None
    """Preview width in pixels (None: the family's default)."""
    num_frames: int | None = None
    """Frames of video previews (None: the family's default)."""
    fps: int = 8
    """Frames per second of written video previews."""

    def __post_init__(self) -> None:
        _check(len(self.prompts) > 0, "prompts", "must list at least one prompt")
        _check(all(p.strip() for p in self.prompts), "prompts", "a prompt is empty")
        for key in ("every", "fps"):
            _check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("steps", "height", "width", "num_frames"):
            value = getattr(self, key)
            _check(value is None or value >= 1, key, f"must be >= 1 or null, got {value}")


@dataclass(kw_only=True)
class TrainConfig(MemorySaverKeys):
    """Everything the training loop needs; methods nest this in their own config."""

    output_dir: Path = Path("runs/train")
    """Run folder: checkpoints, metrics.jsonl, tensorboard logs and the final export."""
    seed: int = 0
    """Seed of the data order and of every per-sample random draw (noise, t)."""
    max_steps: int = 1000
    """Number of optimizer steps (a step whose loss is not finite still counts)."""
    batch_size: int = 4
    """Samples per process per micro-step; global batch = batch_size * num_processes * grad_accum_steps."""
    grad_accum_steps: int = 1
    """Micro-steps whose gradients are averaged before each optimizer step."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """The compute dtype of the run, its one dtype setting: frozen weights (text encoders, VAE, the
    transformer base of a LoRA run, a full fine-tune's reference copy) load in it, and the forward
    pass runs under its autocast; trainable parameters (LoRA adapters, or fp32 master weights of a
    full fine-tune), optimizer state and EMA stay fp32. A family's fp32 parts (Wan's VAE) stay fp32."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm of each parameter group to this value (None = no clipping)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them, for every trainable module of
    every method: the module's own switch (diffusers, transformers, open_clip) or else block-wise
    checkpointing of its ModuleList/ModuleDict elements (see ``flowalign.training.memory``)."""
    log_every: int = 10
    """Write metrics (metrics.jsonl, tensorboard) every this many steps."""
    max_nan_steps_in_row: int = 5
    """Stop with TrainingDiverged after this many consecutive steps with a non-finite loss or gradient."""
    num_workers: int = 0
    """DataLoader worker processes per training process."""
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """accelerate trackers to log to (``log_with``), e.g. ["tensorboard"] or ["tensorboard", "wandb"]
    (the ``wandb`` extra); [] = none. Each gets the whole resolved config as hyperparameters."""
    tracker_project: str = "flowalign"
    """Project the trackers file the run under (wandb's project; tensorboard's folder ``logs/<project>``)."""
    run_name: str | None = None
    """The run's name in the trackers; null = the output folder's name."""
    cpu: bool = False
    """Train on CPU even when an accelerator is available."""
    ddp_find_unused_parameters: bool = False
    """Let DDP tolerate trainable parameters that get no gradient in a step (methods alternating networks)."""
    compile: bool = False
    """Regional ``torch.compile`` of every trainable module: each repeated transformer block is
    compiled on its own (diffusers' ``compile_repeated_blocks`` where the model declares its blocks,
    else every element of its block lists), not the whole model; the first steps pay the compile time."""
    compile_backend: str = "inductor"
    """The ``torch.compile`` backend of ``compile`` ("inductor" generates kernels; "aot_eager" only
    traces, to find graph breaks without a compiler)."""
    attention_backend: str = "sdpa"
    """Attention kernel of the trained and frozen transformers: "sdpa" (torch's scaled dot-product
    attention, the default) or one of diffusers' attention backends (``flash``, ``sage``, ``flex``,
    ``xformers``, ...; see ``flowalign.training.speed``), where the model's attention offers it."""
    validation: ValidationConfig | None = None
    """Sample previews during training (null: none)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    ema: EMAConfig = field(default_factory=EMAConfig)
    """Exponential moving average of the weights."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint frequency and rotation."""

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "grad_accum_steps", "log_every", "max_nan_steps_in_row"):
            value = getattr(self, key)
            _check(value >= 1, key, f"must be >= 1, got {value}")
        _check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        _check(
            self.grad_clip is None or self.grad_clip > 0,
            "grad_clip",
            f"must be > 0 or null, got {self.grad_clip}",
        )


# --------------------------------------------------------------------------------------------
# Public API


def config_from_dict(cls: type[C], data: dict, *, source: str = "<dict>") -> C:
    """Build ``cls`` from a nested mapping (missing keys keep their defaults).

    Raises:
        ConfigError: unknown key, wrong type or invalid value, naming the dotted key and ``source``.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    return _build(cls, data, "", source)


def _set_dotted(root: type, data: dict, dotted: str, raw: str, source: str) -> None:
    """Apply ``dotted=raw`` to the nested mapping ``data``, checking each key against ``root``."""
    parts = dotted.split(".")
    cls: type | None = root
    node = data
    tp: Any = root
    for i, part in enumerate(parts):
        walked = ".".join(parts[: i + 1])
        if cls is not None:
            hints = _type_hints(cls)
            if part not in {f.name for f in dataclasses.fields(cls) if f.init}:
                raise _unknown_key_error(root, dotted, source)
            tp = hints[part]
        elif typing.get_origin(tp) is dict:
            tp = (typing.get_args(tp) or (Any, Any))[1]
        else:
            raise ConfigError(
                f"{source}: {walked!r} goes inside {_type_name(tp)}, which has no sub-keys", key=walked
            )
        if i == len(parts) - 1:
            is_text = any(t in (str, Path) for t in _non_none(tp))
            is_optional = _is_union(tp) and type(None) in typing.get_args(tp)
            if is_text and not (is_optional and raw.strip() in ("null", "~")):
                node[part] = raw  # keep text verbatim ("001" stays "001")
            else:
                node[part] = _load_yaml(raw, f"{source}: the value of {dotted!r}") if raw.strip() else None
            return
        sub = _dataclass_in(tp)
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
        cls = sub


def load_config(
    cls: type[C], yaml_path: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> C:
    """Load a config: dataclass defaults, then the YAML file, then ``key.sub=value`` overrides.

    Override values are parsed as YAML scalars/lists (``optim.betas=[0.9,0.99]``, ``lora=null``) and
    coerced to the field type; for str/Path fields the raw text is kept. Setting a key inside an
    optional nested config that is None (``lora.rank=8``) creates it with defaults first.

    Args:
        cls: the config dataclass (e.g. :class:`TrainConfig` or a method config nesting it).
        yaml_path: optional YAML file with a (partial) nested mapping of fields.
        overrides: ``"dotted.key=value"`` strings, applied in order after the file.

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: unknown key (with close matches), bad type or value, unreadable YAML; the
            message names the dotted key and the file or override it came from.
    """
    data: dict = {}
    source = "defaults"
    if yaml_path is not None:
        path = Path(yaml_path)
        source = str(path)
        try:
            if path.stat().st_size > _MAX_YAML_BYTES:
                raise ConfigError(
                    f"config file {path} is {path.stat().st_size} bytes; files above {_MAX_YAML_BYTES} are refused"
                )
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read config file {path}: {err}") from None
        loaded = _load_yaml(text, f"config file {path}")
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {path}: expected a mapping at the top level, got {type(loaded).__name__}"
            )
        data = loaded
        # Validate the file on its own first so that errors name the file, not an override
        # (required keys may still come from the overrides: checked once all are applied).
        try:
            _build(cls, data, "", source)
        except MissingConfigKey:
            pass
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {short_repr(item)} is not of the form key=value")
        dotted, raw = item.split("=", 1)
        dotted = dotted.strip()
        osource = f"override {short_repr(item)}"
        _set_dotted(cls, data, dotted, raw, osource)
        try:
            _build(cls, data, "", osource)
        except MissingConfigKey:
            pass  # a later override may set it; checked once all are applied
    return _build(cls, data, "", source if not overrides else f"{source} + overrides")


def config_to_dict(cfg: Any) -> dict:
    """Nested plain-Python mapping of a config (tuples -> lists, Paths -> str), ready for YAML/JSON."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"config_to_dict expects a dataclass instance, got {type(cfg).__name__}")
    return plain(cfg)


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write ``cfg`` as YAML (atomically: temp file + rename); ``load_config(type(cfg), path)`` gives it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    return atomic_write_text(path, text)


def _attribute_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal right under each field) of one dataclass."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    tree = ast.parse(source)
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for stmt, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _walk_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any, str]]:
    """(dotted key, field, type, attribute docstring) of every field, nested configs after their key."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            docs.update(_attribute_docs(base))
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        yield prefix + f.name, f, hints[f.name], docs.get(f.name, "")
        sub = _dataclass_in(hints[f.name])
        if sub is not None:
            yield from _walk_fields(sub, prefix + f.name + ".")


def describe_config(cls: type) -> dict[str, str]:
    """Dotted key -> the field's documentation (its attribute docstring), nested configs included."""
    return {key: doc for key, _, _, doc in _walk_fields(cls)}


def config_help(cls: type) -> str:
    """Every settable key of ``cls``, one a line: ``key: type = default -- documentation``.

    What ``flowalign train <method> --help-config`` prints, so each key is documented once, by its
    attribute docstring; nested configs list their own keys.
    """
    lines = []
    for key, f, tp, doc in _walk_fields(cls):
        if _dataclass_in(tp) is not None and tp is _dataclass_in(tp):
            continue  # a required nested block: its keys follow
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = dataclasses.MISSING
        if value is dataclasses.MISSING:
            default = " (required)"
        elif dataclasses.is_dataclass(value):
            default = " = {...} (its keys follow; null turns it off)"
        else:
            default = f" = {str(value) if isinstance(value, Path) else repr(value)}"
        kind = re.sub(
            r"\b(?:\w+\.)+(\w+)", r"\1", _type_name(tp)
        )  # flowalign.config.LoraConfig -> LoraConfig
        text = " ".join(doc.split())
        lines.append(f"{key}: {kind}{default}" + (f" -- {text}" if text else ""))
    return "\n".join(lines)
