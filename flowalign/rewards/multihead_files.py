"""The folder format of :class:`~flowalign.rewards.multihead.MultiHeadRewardModel`.

    config.json         {"format": "flowalign.multihead_reward", "format_version": 1, "dtype", "config"}
    model.safetensors   every parameter and persistent buffer
    tokenizer/          the word-level tokenizer (config-built text towers only; open_clip names bring theirs)

A folder is written to a temporary sibling that then replaces the target, so a reader never sees a
half-written model. Every reading error names the file that is missing or wrong.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from flowalign.files import match_umask
from flowalign.formats import read_tagged_json

__all__ = [
    "CONFIG_NAME",
    "TOKENIZER_DIR",
    "WEIGHTS_NAME",
    "MultiHeadLoadError",
    "read_config_blob",
    "read_tokenizer",
    "read_weights",
    "write_folder",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
FORMAT = "flowalign.multihead_reward"
FORMAT_VERSION = 1


class MultiHeadLoadError(ValueError):
    """A multi-head reward folder that cannot be read (the message names the file)."""


def write_folder(
    out_dir: str | os.PathLike,
    *,
    state: Mapping[str, Tensor],
    config: dict[str, Any],
    dtype: str,
    tokenizer: Any,
) -> Path:
    """Write the three parts into ``out_dir`` at once (``tokenizer`` None: no ``tokenizer/``)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
        save_file(cpu, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        blob = {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype, "config": config}
        (tmp / CONFIG_NAME).write_text(json.dumps(blob, indent=2) + "\n")
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
        match_umask(tmp)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_config_blob(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """(the ``config`` mapping, the saved dtype name) of ``path/config.json``, format checked.

    Raises:
        MultiHeadLoadError: no such file, invalid JSON, another format or version.
    """
    file = Path(path) / CONFIG_NAME
    data = read_tagged_json(
        file,
        FORMAT,
        error=MultiHeadLoadError,
        version=FORMAT_VERSION,
        missing=f"missing ({path} is not a multihead reward folder)",
    )
    if not isinstance(data.get("config"), dict):
        raise MultiHeadLoadError(f"{file}: 'config' must be an object, got {data.get('config')!r}")
    return dict(data["config"]), str(data.get("dtype", "float32"))


def read_tokenizer(path: str | os.PathLike) -> Any:
    """The word tokenizer saved in ``path/tokenizer/``."""
    tok_dir = Path(path) / TOKENIZER_DIR
    if not (tok_dir / "tokenizer.json").is_file():
        raise MultiHeadLoadError(f"{tok_dir / 'tokenizer.json'}: missing (the model's word tokenizer)")
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(tok_dir))


def read_weights(path: str | os.PathLike, expected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``path/model.safetensors``, checked against the names and shapes of ``expected``."""
    from safetensors.torch import load_file

    weights = Path(path) / WEIGHTS_NAME
    if not weights.is_file():
        raise MultiHeadLoadError(f"{weights}: missing (the weights beside {CONFIG_NAME})")
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises several types for damaged files
        raise MultiHeadLoadError(f"{weights}: cannot read safetensors ({err})") from err
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        raise MultiHeadLoadError(
            f"{weights}: weights do not match {CONFIG_NAME}: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, shape differs for {reshaped[:3]}"
        )
    return state
