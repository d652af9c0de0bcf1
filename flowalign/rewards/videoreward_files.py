"""VideoReward's published checkpoint format: model_config.json, checkpoint folders, weights, LoRA merge.

Layout (hub ``KwaiVGI/VideoReward``, written by VideoAlign's trainer)::

    model_config.json                  {"data_config", "model_config", "peft_lora_config", "inference_config"}
    checkpoint-<step>/model.pth        full PEFT state dict: base_model.model.{visual,model,lm_head,rm_head}.*,
                                       LoRA layers as .base_layer.weight + .lora_A/B.default.weight
    checkpoint-<step>/tokenizer/       the Qwen2 tokenizer with the three reward tokens
    (or checkpoint-<step>/adapter_model.safetensors + non_lora_state_dict.pth, applied to the base weights)

``model.pth`` is a pickle and is read with ``weights_only=True``; a ``model.safetensors`` holding the
same keys is preferred when present. :func:`convert_checkpoint` maps every layout to the names of
:class:`flowalign.rewards.videoreward.VideoReward` (``backbone.*`` = ``transformers.Qwen2VLModel``,
``head.weight`` = ``rm_head``) and merges LoRA: W = W0 + s * B @ A with s = alpha / r (alpha / sqrt(r)
for rsLoRA). Also here: the tokenizer (with the three reward tokens), chat template and processor
settings that :func:`flowalign.rewards.videoreward.load_videoreward` reads beside the checkpoint.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowalign.rewards.videoreward_inputs import SPECIAL_TOKENS

__all__ = [
    "CheckpointFiles",
    "VideoRewardConfig",
    "convert_checkpoint",
    "find_checkpoint",
    "load_state",
    "read_json",
    "read_model_config",
    "read_weights",
    "resolve_folder",
]

EVAL_DIMS = ["VQ", "MQ", "TA"]

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_UNSUPPORTED_LORA = ("lora_embedding_", "lora_magnitude_vector", "lora_bias")
# checkpoint name (PEFT prefix removed) -> Qwen2VLModel name; transformers < 4.52 and newer layouts
_RENAMES = (
    ("model.visual.", "visual."),
    ("model.language_model.", "language_model."),
    ("visual.", "visual."),
    ("model.", "language_model."),
)
EMBED_KEY = "backbone.language_model.embed_tokens.weight"
HEAD_KEY = "head.weight"


def _target_name(name: str) -> str:
    if name.startswith("rm_head."):
        return "head." + name[len("rm_head.") :]
    for old, new in _RENAMES:
        if name.startswith(old):
            return f"backbone.{new}{name[len(old) :]}"
    return f"backbone.{name}"  # unknown: reported as unexpected when loaded


def convert_checkpoint(
    state_dict: Mapping[str, Tensor], *, lora_scaling: float | None, source: str
) -> dict[str, Tensor]:
    """Map a VideoAlign state dict to ``backbone.*`` / ``head.weight``, merging LoRA pairs.

    Handles the ``base_model.model.`` prefix and ``.base_layer.`` names of PEFT, LoRA keys with an
    adapter name (``lora_A.default.weight``) or without (``adapter_model.safetensors``), both
    transformers layouts, and drops the unused ``lm_head`` and rotary ``inv_freq`` buffers. Each pair
    gives W = W0 + s * B @ A, computed in float32 and stored in W0's dtype (for bfloat16 weights that is
    one more bfloat16 rounding than the reference's unmerged LoRA forward).

    Raises:
        ValueError: a LoRA key without its partner or base weight, several adapters, an unsupported
            LoRA variant (embedding, DoRA), or LoRA keys while ``lora_scaling`` is None; the message
            names ``source`` and the key.
    """
    plain: dict[str, Tensor] = {}
    lora: dict[str, dict[str, Tensor]] = {}
    adapters: set[str] = set()
    for key, value in state_dict.items():
        name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if any(part in name for part in _UNSUPPORTED_LORA):
            raise ValueError(f"{source}: unsupported LoRA weight {key!r} (only LoRA on linear layers loads)")
        if match := _LORA_KEY.match(name):
            lora.setdefault(match["module"], {})[match["part"]] = value
            adapters.add(match["adapter"] or "")
        elif not name.startswith("lm_head.") and not name.endswith(".inv_freq"):  # unused / recomputed
            plain[_target_name(name)] = value
    if len(adapters) > 1:
        raise ValueError(f"{source}: holds several LoRA adapters {sorted(adapters)}; expected one")
    if lora and lora_scaling is None:
        raise ValueError(
            f"{source}: has LoRA weights but model_config.json enables no LoRA (peft_lora_config)"
        )
    for module, pair in lora.items():
        target = _target_name(module) + ".weight"
        if set(pair) != {"A", "B"} or target not in plain:
            missing = sorted({"A", "B"} - set(pair)) or [f"the base weight {module}.weight"]
            raise ValueError(f"{source}: LoRA on {module!r} lacks {missing}")
        base = plain[target]
        delta = pair["B"].float() @ pair["A"].float()  # [out, r] @ [r, in] -> [out, in]
        plain[target] = (base.float() + lora_scaling * delta).to(base.dtype)
    return plain


def read_weights(path: Path) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a torch file (``weights_only=True``, memory-mapped).

    Raises:
        FileNotFoundError: no such file. ValueError: not a weights-only mapping of names to tensors.
    """
    if not path.is_file():
        raise FileNotFoundError(f"videoreward: weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # refused unpickling, a legacy (non-zip) file or a corrupt one
        raise ValueError(f"{path}: cannot be read as a weights-only torch state dict ({err})") from err
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    return dict(obj)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"videoreward: {path.name} not found at {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class VideoRewardConfig:
    """The settings of model_config.json that inference uses.

    Attributes:
        base_model: model_config.model_name_or_path (``Qwen/Qwen2-VL-2B-Instruct``).
        fps, num_frames, max_frame_pixels: data_config frame sampling and size.
        output_dim: model_config.output_dim (1: one head row shared by the tokens; 3: diagonal).
        lora_scaling: alpha / r (alpha / sqrt(r) with rsLoRA), None without LoRA.
        stats: ``{"vq": (mean, std), ...}`` from inference_config, None if absent.
    """

    base_model: str
    fps: float
    num_frames: int | None
    max_frame_pixels: int
    output_dim: int
    lora_scaling: float | None
    stats: dict[str, tuple[float, float]] | None


def read_model_config(path: Path) -> VideoRewardConfig:
    """Parse and check model_config.json.

    Raises:
        FileNotFoundError: the file is missing. ValueError: a missing section or key, or a setting
            this scorer does not reproduce (another prompt template, pooling or frame sampling),
            naming ``section.key`` and the value found.
    """
    data = read_json(path)

    def section(name: str) -> Mapping[str, Any]:
        value = data.get(name)
        if not isinstance(value, Mapping):
            raise ValueError(f"{path}: missing section {name!r}")
        return value

    def get(sec: str, key: str, *, expected: Any = None) -> Any:
        values = section(sec)
        if key not in values:
            raise ValueError(f"{path}: missing key {sec}.{key}")
        value = values[key]
        if expected is not None and value != expected:
            raise ValueError(f"{path}: {sec}.{key} is {value!r}; this scorer reproduces {expected!r} only")
        return value

    eval_dim = get("data_config", "eval_dim")
    if (eval_dim if isinstance(eval_dim, list) else [eval_dim]) != EVAL_DIMS:
        raise ValueError(f"{path}: data_config.eval_dim is {eval_dim!r}; expected {EVAL_DIMS}")
    get("data_config", "prompt_template_type", expected="detailed_special")
    get("data_config", "sample_type", expected="uniform")
    get("model_config", "use_special_tokens", expected=True)
    get("model_config", "reward_token", expected="special")
    output_dim = int(get("model_config", "output_dim"))
    if output_dim not in (1, 3):
        raise ValueError(f"{path}: model_config.output_dim is {output_dim}; expected 1 or 3")
    num_frames = section("data_config").get("num_frames")
    lora_scaling = None
    peft = data.get("peft_lora_config")
    if isinstance(peft, Mapping) and peft.get("lora_enable"):
        r, alpha = float(get("peft_lora_config", "lora_r")), float(get("peft_lora_config", "lora_alpha"))
        lora_scaling = alpha / (math.sqrt(r) if peft.get("use_rslora") else r)
    stats = None
    if isinstance(data.get("inference_config"), Mapping):
        stats = {}
        for dim in EVAL_DIMS:
            mean, std = (
                float(get("inference_config", f"{dim}_mean")),
                float(get("inference_config", f"{dim}_std")),
            )
            if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
                raise ValueError(
                    f"{path}: inference_config {dim}_mean/{dim}_std = {mean}/{std}; need std > 0"
                )
            stats[dim.lower()] = (mean, std)
    return VideoRewardConfig(
        base_model=str(get("model_config", "model_name_or_path")),
        fps=float(get("data_config", "fps")),
        num_frames=None if num_frames is None else int(num_frames),
        max_frame_pixels=int(get("data_config", "max_frame_pixels")),
        output_dim=output_dim,
        lora_scaling=lora_scaling,
        stats=stats,
    )


def resolve_folder(source: str | Path, *, patterns: list[str], what: str) -> Path:
    """A local folder, or a hub id downloaded with ``huggingface_hub.snapshot_download``."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder
    text = str(source)
    if folder.exists() or text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"videoreward: {what} {text!r} is not a folder (nor a hub id 'org/name')")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=text, allow_patterns=patterns))


@dataclass(frozen=True)
class CheckpointFiles:
    """The weights of one checkpoint: ``full`` (one file) or ``adapter`` + ``non_lora`` (+ base weights)."""

    folder: Path
    full: Path | None
    adapter: Path | None = None
    non_lora: Path | None = None

    @property
    def needs_base_weights(self) -> bool:
        return self.full is None


def find_checkpoint(root: Path, step: int | None = None) -> CheckpointFiles:
    """The ``checkpoint-<step>`` folder (the highest step by default, or ``root`` itself) and its files.

    Raises:
        FileNotFoundError: no checkpoint folder, the requested step is absent (the message lists the
            steps found), or the folder holds none of the weight layouts (the message lists them).
    """
    folders = {}
    for child in root.glob("checkpoint-*"):
        suffix = child.name.removeprefix("checkpoint-")
        if child.is_dir() and suffix.isdigit():
            folders[int(suffix)] = child
    if step is not None:
        if step not in folders:
            raise FileNotFoundError(
                f"videoreward: {root} has no checkpoint-{step} (found steps {sorted(folders)})"
            )
        folder = folders[step]
    else:
        folder = folders[max(folders)] if folders else root
    for name in ("model.safetensors", "model.pth"):
        if (folder / name).is_file():
            return CheckpointFiles(folder, full=folder / name)
    adapter, non_lora = folder / "adapter_model.safetensors", folder / "non_lora_state_dict.pth"
    if adapter.is_file() and non_lora.is_file():
        return CheckpointFiles(folder, full=None, adapter=adapter, non_lora=non_lora)
    raise FileNotFoundError(
        f"videoreward: no weights in {folder}: expected model.safetensors, model.pth, or "
        "adapter_model.safetensors + non_lora_state_dict.pth (in checkpoint-<step>/)"
    )


def _base_weights(base: Path) -> dict[str, Tensor]:
    index = base / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(read_weights(base / shard))
        return state
    return read_weights(base / "model.safetensors")


def load_state(
    files: CheckpointFiles, *, lora_scaling: float | None, base: Path | None, vocab_size: int
) -> dict[str, Tensor]:
    """All weights of the reward model, in :class:`VideoReward` names.

    ``full``: the one file. ``adapter``: the base model's weights, overridden by
    ``non_lora_state_dict.pth``, with the adapter's LoRA merged; the embedding keeps its first
    ``vocab_size`` rows (what ``resize_token_embeddings`` did before training) and must have them.

    Raises:
        ValueError: missing ``rm_head.weight``, or an embedding with fewer rows than the tokenizer.
    """
    if files.full is not None:
        state = convert_checkpoint(
            read_weights(files.full), lora_scaling=lora_scaling, source=str(files.full)
        )
        source = str(files.full)
    else:
        assert base is not None and files.adapter is not None and files.non_lora is not None
        config = files.adapter.parent / "adapter_config.json"
        if config.is_file():  # PEFT's own record of r and alpha beats model_config.json
            peft = read_json(config)
            r, alpha = float(peft["r"]), float(peft["lora_alpha"])
            lora_scaling = alpha / (math.sqrt(r) if peft.get("use_rslora") else r)
        merged = {**_base_weights(base), **read_weights(files.non_lora), **read_weights(files.adapter)}
        state = convert_checkpoint(merged, lora_scaling=lora_scaling, source=f"{files.folder} + base {base}")
        source = f"{files.non_lora} (over the base weights in {base})"
        if EMBED_KEY in state and state[EMBED_KEY].shape[0] > vocab_size:
            state[EMBED_KEY] = state[EMBED_KEY][:vocab_size]
    if HEAD_KEY not in state:
        raise ValueError(f"{source}: missing key 'rm_head.weight' (the reward head)")
    if EMBED_KEY in state and state[EMBED_KEY].shape[0] < vocab_size:
        raise ValueError(
            f"{source}: embed_tokens has {state[EMBED_KEY].shape[0]} rows but the tokenizer has {vocab_size} tokens"
        )
    return state


# ------------------------------------------------------------------------------------------ tokenizer and processor


def load_tokenizer(files_folder: Path, base: Path) -> tuple[Any, Path]:
    """The checkpoint's tokenizer, or the base model's with the three reward tokens appended."""
    from transformers import AutoTokenizer

    folder = files_folder / "tokenizer"
    if folder.is_dir():
        return AutoTokenizer.from_pretrained(folder), folder
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)  # ids appended in VQ, MQ, TA order
    return tokenizer, base


def chat_template_of(tokenizer: Any, base: Path, source: Path) -> str:
    """The chat template: the tokenizer's own, else chat_template.jinja / .json of the base model."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    if (base / "chat_template.jinja").is_file():
        return (base / "chat_template.jinja").read_text()
    if (base / "chat_template.json").is_file():
        return str(read_json(base / "chat_template.json")["chat_template"])
    raise FileNotFoundError(
        f"videoreward: no chat template in the tokenizer at {source} nor chat_template.jinja/.json in {base}"
    )


def processor_settings(base: Path, vision: Any) -> dict[str, Any]:
    """Normalisation and pixel bounds from preprocessor_config.json, checked against the vision config."""
    path = base / "preprocessor_config.json"
    proc = read_json(path)
    for key, expected in (
        ("patch_size", vision.patch_size),
        ("temporal_patch_size", vision.temporal_patch_size),
        ("merge_size", vision.spatial_merge_size),
    ):
        if key in proc and int(proc[key]) != int(expected):
            raise ValueError(f"{path}: {key} is {proc[key]} but the model's vision config has {expected}")
    size = proc.get("size") or {}
    missing = [k for k in ("image_mean", "image_std") if k not in proc]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}")
    return {
        "image_mean": tuple(float(v) for v in proc["image_mean"]),
        "image_std": tuple(float(v) for v in proc["image_std"]),
        "processor_min_pixels": int(proc.get("min_pixels") or size.get("shortest_edge") or 56 * 56),
        "processor_max_pixels": int(proc.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280),
    }


def single_token_ids(tokenizer: Any, tokens: Sequence[str], source: Path) -> list[int]:
    """The id of each of ``tokens``, each of which must be one known token of ``tokenizer``."""
    ids = []
    for token in tokens:
        encoded = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1 or encoded[0] == tokenizer.unk_token_id:
            raise ValueError(
                f"videoreward: tokenizer at {source} does not hold {token!r} as one token: {encoded}"
            )
        ids.append(int(encoded[0]))
    return ids
