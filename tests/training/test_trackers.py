"""The trackers get a project, a run name and the flattened config (tensorboard here; wandb when installed)."""

from __future__ import annotations

import pytest

from flowalign.training.trackers import flat_hyperparameters, start_trackers


def test_flat_hyperparameters_flattens_and_stringifies():
    flat = flat_hyperparameters({"model": "m", "train": {"optim": {"lr": 1e-4}, "trackers": ["tensorboard"]},
                                 "lora": None, "dpo": {"beta": 5000.0, "tie": True}})  # fmt: skip
    assert flat == {"model": "m", "train.optim.lr": 1e-4, "train.trackers": "['tensorboard']", "lora": "null",
                    "dpo.beta": 5000.0, "dpo.tie": True}  # fmt: skip


def test_start_trackers_passes_project_name_and_config(tmp_path):
    from flowalign.config import TrainConfig

    seen = {}

    class Acc:
        def init_trackers(self, project, config=None, init_kwargs=None):
            seen.update(project=project, config=config, init_kwargs=init_kwargs)

    cfg = TrainConfig(output_dir=str(tmp_path / "my-run"), tracker_project="proj")
    start_trackers(Acc(), cfg, cfg, tmp_path / "my-run")
    assert seen["project"] == "proj"
    assert seen["init_kwargs"]["wandb"]["name"] == "my-run"
    assert seen["config"]["optim.lr"] == cfg.optim.lr
    cfg.run_name = "named"
    start_trackers(Acc(), cfg, cfg, tmp_path / "my-run")
    assert seen["init_kwargs"]["wandb"]["name"] == "named"


def test_wandb_offline_run_records_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from accelerate import Accelerator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    from flowalign.config import TrainConfig

    cfg = TrainConfig(output_dir=str(tmp_path), run_name="offline-run", trackers=["wandb"], cpu=True)
    acc = Accelerator(cpu=True, log_with=["wandb"])
    start_trackers(acc, cfg, cfg, tmp_path)
    run = acc.get_tracker("wandb", unwrap=True)
    assert run.name == "offline-run" and run.config["optim.lr"] == cfg.optim.lr
    acc.end_training()
