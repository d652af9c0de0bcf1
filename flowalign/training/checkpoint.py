"""Atomic, verifiable training checkpoints.

A checkpoint is a folder ``<output_dir>/checkpoint-{step:08d}/`` holding::

    model-<name>.safetensors   trainable parameters of each trainable module (requires_grad only)
    ema.safetensors            fp32 EMA shadow (when EMA is on)
    optimizer.pt               {group: optimizer.state_dict()}      (torch.save, tensors + primitives)
    scheduler.pt               {group: lr_scheduler.state_dict()}
    rng.pt                     per-process RNG states (torch, CUDA, python, numpy as plain lists)
    method_state.pt            Method.state_dict()
    state.json                 step, data cursor (epoch, position), NaN counters, world size, ...
    config.yaml                the resolved run config
    manifest.json              every file above with its size and sha256, written LAST

Sharded runs (FSDP2) write the same folder with the weights, EMA and optimizer state in ``shards/``
instead, each process its own part (``layout: sharded`` in the manifest; see
:mod:`flowalign.training.dcp_checkpoint`).

It is written into ``checkpoint-<step 8 digits>.tmp-<pid>/`` and renamed into place with
:func:`os.replace`, so a folder under the final name is always complete; a folder without a
valid manifest is never picked up. ``.pt`` files are read back only with
``torch.load(weights_only=True)``. Any size/hash mismatch or unreadable file raises
:class:`CheckpointError` naming the file; a write that fails (a full disk, say) raises
:class:`CheckpointWriteError` naming the checkpoint, after removing its temporary folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from flowalign.files import match_umask
from flowalign.formats import read_tagged_json
from flowalign.training.distributed import shard_like

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "CheckpointError",
    "CheckpointWriteError",
    "capture_rng_state",
    "checkpoint_dir_name",
    "find_latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_trainable_state_dict",
    "remove_stale_tmp_dirs",
    "restore_rng_state",
    "rotate_checkpoints",
    "save_checkpoint",
    "trainable_state_dict",
    "verify_checkpoint",
]

CHECKPOINT_FORMAT = "flowalign-checkpoint"
CHECKPOINT_VERSION = 1
MANIFEST = "manifest.json"
_NAME_RE = re.compile(r"^checkpoint-(\d{8})$")
_TMP_RE = re.compile(r"^checkpoint-\d{8}\.(tmp|del)-(\d+)$")
_MODULE_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupted or does not match the model."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (e.g. ENOSPC): nothing appeared under its name, older ones are unchanged.

    An ``OSError`` (``errno`` is the cause's, if it had one) and a ``CheckpointError`` (so the CLI
    reports it as one line).
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def checkpoint_dir_name(step: int) -> str:
    """``checkpoint-{step:08d}``."""
    return f"checkpoint-{step:08d}"


# --------------------------------------------------------------------------------------------
# Trainable state and RNG


def trainable_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """CPU copies of the ``requires_grad`` parameters of ``module``, by parameter name."""
    return {
        n: p.detach().to("cpu", copy=True).contiguous()
        for n, p in module.named_parameters()
        if p.requires_grad
    }


@torch.no_grad()
def load_trainable_state_dict(
    module: nn.Module, state: Mapping[str, Tensor], *, source: str = "<state>"
) -> None:
    """Copy ``state`` into the ``requires_grad`` parameters of ``module``; names and shapes must match.

    Raises:
        CheckpointError: missing/unexpected names or a shape mismatch, naming ``source``.
    """
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: trainable parameters do not match the model: missing {missing[:5]} "
            f"({len(missing)} total), unexpected {unexpected[:5]} ({len(unexpected)} total)"
        )
    for name, p in params.items():
        value = state[name]
        if value.shape != p.shape:
            raise CheckpointError(
                f"{source}: parameter {name!r} has shape {tuple(value.shape)}, the model expects {tuple(p.shape)}"
            )
        p.copy_(shard_like(value, p))  # a sharded (DTensor) parameter takes its shard of the full value


def capture_rng_state() -> dict[str, Any]:
    """torch (CPU + CUDA), python and numpy global RNG states, as weights_only-loadable objects."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Writing


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, write: Callable[[Path], None]) -> None:
    """Write one checkpoint file with ``write(path)`` and flush it to disk."""
    write(path)
    _fsync_path(path)


def _torch_saver(obj: Any) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        path.write_bytes(buffer.getvalue())

    return write


def _text_saver(text: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(text, encoding="utf-8")


def _remove_dir(path: Path) -> None:
    """Rename ``path`` aside (atomic) and delete it, so a crash never leaves a half-deleted checkpoint."""
    trash = path.with_name(f"{path.name}.del-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    modules: Mapping[str, nn.Module | Mapping[str, Tensor]],
    optimizers: Mapping[str, dict],
    schedulers: Mapping[str, dict],
    state: Mapping[str, Any],
    rng_states: list[dict[str, Any]] | None = None,
    ema: Mapping[str, Tensor] | None = None,
    method_state: Mapping[str, Any] | None = None,
    config: dict | None = None,
    keep_last: int | None = None,
    tmp: Path | None = None,
) -> Path:
    """Write ``checkpoint-{step:08d}`` atomically and rotate old ones.

    Args:
        output_dir: run folder.
        step: number of optimizer steps done.
        modules: trainable modules (unwrapped), whose ``requires_grad`` parameters are saved, or
            already gathered ``{parameter name: full tensor}`` dicts (sharded runs).
        optimizers, schedulers: ``state_dict()`` per parameter group.
        state: JSON-serialisable loop state (data cursor, counters).
        rng_states: one :func:`capture_rng_state` per process (index = rank).
        ema: flat EMA shadow, or None.
        method_state: ``Method.state_dict()``.
        config: resolved config as a plain mapping (written as YAML).
        keep_last: keep only this many newest complete checkpoints (None = all).
        tmp: the temporary folder, already holding the ``shards/`` of a sharded checkpoint
            (:func:`flowalign.training.dcp_checkpoint.start_sharded`); None = a new one.

    Returns:
        The final checkpoint folder.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / checkpoint_dir_name(step)
    if tmp is None:
        tmp = output_dir / f"{final.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    try:
        for name, module in modules.items():
            if not _MODULE_NAME_RE.match(name):
                raise ValueError(
                    f"trainable module name {name!r} is not usable as a file name ([A-Za-z0-9_.-]+)"
                )
            tensors = trainable_state_dict(module) if isinstance(module, nn.Module) else dict(module)
            _write_file(tmp / f"model-{name}.safetensors", lambda p, t=tensors: save_file(t, str(p)))
        if ema is not None:
            shadow = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in ema.items()}
            _write_file(tmp / "ema.safetensors", lambda p: save_file(shadow, str(p)))
        _write_file(tmp / "optimizer.pt", _torch_saver(dict(optimizers)))
        _write_file(tmp / "scheduler.pt", _torch_saver(dict(schedulers)))
        _write_file(tmp / "rng.pt", _torch_saver(list(rng_states or [])))
        _write_file(tmp / "method_state.pt", _torch_saver(dict(method_state or {})))
        _write_file(
            tmp / "state.json", _text_saver(json.dumps({"step": step, **state}, indent=2, sort_keys=True))
        )
        if config is not None:
            _write_file(tmp / "config.yaml", _text_saver(yaml.safe_dump(config, sort_keys=False)))
        files = {
            p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        manifest = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step, "files": files}
        if (tmp / "shards").is_dir():
            manifest["layout"] = "sharded"
        _write_file(tmp / MANIFEST, _text_saver(json.dumps(manifest, indent=2, sort_keys=True)))
        match_umask(tmp)  # safetensors writes 0600
        _fsync_path(tmp)
        if final.exists():
            _remove_dir(final)
        os.replace(tmp, final)
        _fsync_path(output_dir)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(
            f"{final}: writing the checkpoint failed: {type(err).__name__}: {err}; "
            "no checkpoint was written under that name and the earlier ones are unchanged",
            getattr(err, "errno", None),
        ) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last is not None:
        rotate_checkpoints(output_dir, keep_last=keep_last)
    return final


def rotate_checkpoints(output_dir: str | os.PathLike, *, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest complete checkpoints; returns the removed folders."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    complete = list_checkpoints(output_dir)
    removed = complete[:-keep_last]
    for path in removed:
        _remove_dir(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Remove ``checkpoint-*.tmp-<pid>`` / ``.del-<pid>`` folders left by processes that no longer run.

    Only pids on this host are checked, so do not share an output_dir between hosts' writers.
    """
    output_dir = Path(output_dir)
    removed = []
    if not output_dir.is_dir():
        return removed
    for path in output_dir.iterdir():
        match = _TMP_RE.match(path.name)
        if (
            match
            and path.is_dir()
            and (int(match.group(2)) == os.getpid() or not _pid_alive(int(match.group(2))))
        ):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


# --------------------------------------------------------------------------------------------
# Finding and reading


def _read_manifest(path: Path) -> dict:
    """The manifest of checkpoint folder ``path``, or CheckpointError if absent or malformed."""
    mpath = path / MANIFEST
    manifest = read_tagged_json(
        mpath,
        CHECKPOINT_FORMAT,
        error=CheckpointError,
        version=CHECKPOINT_VERSION,
        version_key="version",
        missing="missing (the checkpoint is incomplete)",
    )
    if not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("step"), int):
        raise CheckpointError(f"{mpath}: not a {CHECKPOINT_FORMAT} manifest ('files' or 'step' malformed)")
    match = _NAME_RE.match(path.name)
    if match and int(match.group(1)) != manifest["step"]:
        raise CheckpointError(f"{mpath}: records step {manifest['step']} but the folder is {path.name}")
    return manifest


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (final name + valid manifest) under ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _NAME_RE.match(path.name)
        if not match or not path.is_dir():
            continue
        try:
            _read_manifest(path)
        except CheckpointError:
            continue
        found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``output_dir`` (tmp folders and ones without a valid manifest
    are ignored), or None. File contents are verified later, by :func:`load_checkpoint`."""
    complete = list_checkpoints(output_dir)
    return complete[-1] if complete else None


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check every file listed in the manifest for presence, size and sha256; returns the manifest.

    Raises:
        CheckpointError: naming the first file that is missing, truncated or altered.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    for name, meta in sorted(manifest["files"].items()):
        fpath = path / name
        if not fpath.is_file():
            raise CheckpointError(f"{fpath}: listed in the manifest but missing")
        size = fpath.stat().st_size
        if size != meta.get("size"):
            raise CheckpointError(
                f"{fpath}: size {size} bytes, the manifest says {meta.get('size')} (truncated?)"
            )
        digest = _sha256(fpath)
        if digest != meta.get("sha256"):
            raise CheckpointError(f"{fpath}: sha256 {digest[:16]}... does not match the manifest (corrupted)")
    return manifest


@dataclass
class Checkpoint:
    """The contents of a checkpoint folder (tensors on CPU)."""

    path: Path
    step: int
    state: dict[str, Any]
    weights: dict[str, dict[str, Tensor]]
    optimizers: dict[str, dict]
    schedulers: dict[str, dict]
    rng_states: list[dict[str, Any]]
    method_state: dict[str, Any]
    ema: dict[str, Tensor] | None = None
    config: dict | None = None
    files: dict[str, dict] = field(default_factory=dict)
    layout: str = "full"
    """"full", or "sharded": weights, EMA and optimizer state are in ``shards/`` (see
    :func:`flowalign.training.dcp_checkpoint.load_full`)."""


def _load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors of many kinds: all mean "this file is bad"
        raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True): {err}") from None


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors file: {err}") from None


def load_checkpoint(path: str | os.PathLike, *, verify: bool = True) -> Checkpoint:
    """Read a checkpoint folder (after checking sizes and hashes when ``verify``).

    Raises:
        CheckpointError: naming the file that is missing, truncated, corrupted or unreadable.
    """
    path = Path(path)
    manifest = verify_checkpoint(path) if verify else _read_manifest(path)
    files = manifest["files"]
    weights = {}
    for name in sorted(files):
        if name.startswith("model-") and name.endswith(".safetensors"):
            weights[name[len("model-") : -len(".safetensors")]] = _load_safetensors(path / name)
    ema = _load_safetensors(path / "ema.safetensors") if "ema.safetensors" in files else None
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path / 'state.json'}: unreadable: {err}") from None
    config = None
    if "config.yaml" in files:
        try:
            config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise CheckpointError(f"{path / 'config.yaml'}: unreadable: {err}") from None
    return Checkpoint(
        path=path,
        step=manifest["step"],
        state=state,
        weights=weights,
        optimizers=_load_torch(path / "optimizer.pt"),
        schedulers=_load_torch(path / "scheduler.pt"),
        rng_states=_load_torch(path / "rng.pt"),
        method_state=_load_torch(path / "method_state.pt"),
        ema=ema,
        config=config,
        files=files,
        layout=str(manifest.get("layout", "full")),
    )
