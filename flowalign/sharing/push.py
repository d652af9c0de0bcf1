"""``flowalign push``: a run's upload folder (weights, model card, config, eval, samples) and its upload.

:func:`build_upload_folder` writes exactly what goes to the Hub into a local folder, so a user can look
at it first (``--out``) and tests can check it offline; :func:`push_run` then uploads that folder in one
commit with ``huggingface_hub`` (``create_repo`` + ``upload_folder``).

The folder holds:

- the weights of ``<run>/final`` (``final-ema`` with ``ema=True``): a LoRA run's adapter files at the top
  (``pytorch_lora_weights.safetensors``, so ``pipe.load_lora_weights(repo_id)`` works), or a full
  fine-tune's whole pipeline folder;
- ``README.md``, the model card (:mod:`flowalign.sharing.card`);
- ``flowalign_config.yaml``, the run's resolved configuration;
- ``eval/report.json`` when an evaluation folder is given, its table in the card;
- ``samples.png``, a grid of the evaluated model's samples (or of the run's latest training previews).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from flowalign.sharing.card import CardInputs, card_path, render_card

__all__ = ["build_upload_folder", "push_run"]

GRID_SAMPLES = 8
_VIDEO_SUFFIXES = {".mp4", ".webm", ".mov", ".mkv", ".gif", ".npy"}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def _run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml; is this a flowalign run folder?")
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of config keys")
    return config


def _copy_weights(run_dir: Path, folder: Path, *, ema: bool) -> str:
    """Copy the final weights into ``folder``; returns ``"lora"`` or ``"full"``."""
    final = run_dir / ("final-ema" if ema else "final")
    if not final.is_dir():
        hint = " (the run kept no EMA; drop --ema)" if ema and (run_dir / "final").is_dir() else ""
        raise FileNotFoundError(f"{final}: no final weights; push a finished run{hint}")
    lora = final / "lora"
    if (lora / "pytorch_lora_weights.safetensors").is_file():
        for item in sorted(lora.iterdir()):
            if item.is_file():
                shutil.copy2(item, folder / item.name)
        return "lora"
    if (final / "model_index.json").is_file():
        shutil.copytree(final, folder, dirs_exist_ok=True)
        return "full"
    raise ValueError(
        f"{final}: neither a LoRA (lora/pytorch_lora_weights.safetensors) nor a pipeline (model_index.json)"
    )


def _eval_samples(report: dict[str, Any], eval_dir: Path, model: str | None) -> list[Path]:
    """Sample files of one model from the eval report's grids (the first non-base model by default)."""
    files: list[Path] = []
    for result in (report.get("results") or {}).values():
        models = result.get("models") or []
        if model is None:
            base = (report.get("settings") or {}).get("base")
            model = next((m for m in models if m != base), models[0] if models else None)
        for row in result.get("grid") or []:
            files += [eval_dir / f for f in row.get("samples", {}).get(model, [])]
    return files


def _preview_samples(run_dir: Path) -> list[Path]:
    steps = sorted(p for p in (run_dir / "samples").glob("step-*") if p.is_dir())
    media = _IMAGE_SUFFIXES | _VIDEO_SUFFIXES
    return (
        sorted(f for f in steps[-1].iterdir() if f.is_file() and f.suffix.lower() in media) if steps else []
    )


def _write_grid(files: list[Path], out: Path) -> bool:
    from flowalign.data.media import load_media, save_image
    from flowalign.evals.grid import image_grid

    media = [load_media(f) for f in files[:GRID_SAMPLES]]
    shapes = {tuple(m.shape) for m in media}
    if not media or len(shapes) != 1:
        return False
    save_image(image_grid(torch.stack(media), nrow=min(4, len(media))), out)
    return True


def build_upload_folder(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    repo_id: str,
    eval_dir: str | Path | None = None,
    eval_model: str | None = None,
    ema: bool = False,
    license: str = "other",
) -> Path:
    """Write the upload folder of ``run_dir`` to ``out_dir`` (which must not exist or be empty).

    Raises:
        FileNotFoundError: no run config, no final weights, or no ``report.json`` in ``eval_dir``.
        ValueError: ``out_dir`` is not empty, or the config or weights are not a run's.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir}: not empty; give a new folder for the upload")
    config = _run_config(run_dir)
    report = None
    if eval_dir is not None:
        report_path = Path(eval_dir) / "report.json"
        if not report_path.is_file():
            raise FileNotFoundError(f"{report_path}: no eval report (run flowalign eval first)")
        report = json.loads(report_path.read_text(encoding="utf-8"))
    tmp = Path(tempfile.mkdtemp(prefix=".upload-", dir=out_dir.parent if out_dir.parent.exists() else None))
    try:
        kind = _copy_weights(run_dir, tmp, ema=ema)
        shutil.copy2(run_dir / "config.yaml", tmp / "flowalign_config.yaml")
        samples = _eval_samples(report, Path(eval_dir), eval_model) if report else []
        samples = samples or _preview_samples(run_dir)
        grid = "samples.png" if samples and _write_grid(samples, tmp / "samples.png") else None
        if report is not None:
            (tmp / "eval").mkdir()
            shutil.copy2(Path(eval_dir) / "report.json", tmp / "eval" / "report.json")
        from importlib.metadata import PackageNotFoundError, version

        try:
            flowalign_version = version("flowalign")
        except PackageNotFoundError:
            flowalign_version = ""
        inputs = CardInputs(
            repo_id=repo_id,
            config=config,
            weights_kind=kind,
            media_kind="video" if any(f.suffix in _VIDEO_SUFFIXES for f in samples) else "image",
            license=license,
            eval_report=report,
            sample_grid=grid,
            version=flowalign_version,
        )
        card_path(tmp).write_text(render_card(inputs), encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def push_run(
    run_dir: str | Path,
    *,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    **folder_options: Any,
) -> str:
    """Build the upload folder in a temporary place and upload it as one commit; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="flowalign-push-") as tmp:
        folder = build_upload_folder(run_dir, Path(tmp) / "upload", repo_id=repo_id, **folder_options)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            commit_message=commit_message or f"flowalign: upload {Path(run_dir).name}",
        )
    return str(getattr(info, "commit_url", info))
