"""The training loop: exact resume, SIGTERM, accumulation, NaN guard, groups, logs, export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_toy import ToyFlowMatching, TwoNetMethod, VectorDataset, toy_config

from flowalign.config import EMAConfig, OptimConfig, TrainConfig, load_config
from flowalign.training.batches import DataCursor
from flowalign.training.checkpoint import find_latest_checkpoint, list_checkpoints, load_checkpoint
from flowalign.training.loop import METRICS_FILE, TrainingDiverged, train
from flowalign.training.optim import build_lr_scheduler


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]


def _resume_config(out: Path) -> TrainConfig:
    # 10 items, global batch 2 x 2 = 4: 2 steps per epoch (tail of 2 dropped), so 6 steps cross 2 epoch
    # boundaries; cosine LR with warm-up, clipping and EMA all carry state across the resume.
    cfg = toy_config(out, max_steps=6, grad_accum_steps=2, grad_clip=0.5)
    cfg.optim = OptimConfig(lr=3e-2, schedule="cosine", warmup_steps=2)
    cfg.ema = EMAConfig(use=True, decay=0.9, every=1)
    cfg.checkpoint.every = 2
    cfg.checkpoint.keep_last = None
    return cfg


def test_resume_after_sigterm_is_bit_identical(tmp_path):
    straight = train(ToyFlowMatching(), VectorDataset(10), _resume_config(tmp_path / "a"), progress=False)
    assert straight.step == 6 and not straight.interrupted

    # SIGTERM arrives during step index 2: the step finishes, checkpoint-3 is written, train returns.
    first = train(
        ToyFlowMatching(sigterm_at=2), VectorDataset(10), _resume_config(tmp_path / "b"), progress=False
    )
    assert first.interrupted and first.step == 3
    assert first.checkpoint == tmp_path / "b" / "checkpoint-00000003"
    assert first.export_dir is None and not (tmp_path / "b" / "final").exists()
    second = train(
        ToyFlowMatching(seed=99),
        VectorDataset(10),
        _resume_config(tmp_path / "b"),
        resume=True,
        progress=False,
    )
    assert second.step == 6 and not second.interrupted

    a = load_checkpoint(tmp_path / "a" / "checkpoint-00000006")
    b = load_checkpoint(tmp_path / "b" / "checkpoint-00000006")
    for key, value in a.weights["net"].items():
        assert torch.equal(value, b.weights["net"][key]), key
    for key, value in a.ema.items():
        assert torch.equal(value, b.ema[key]), key
    opt_a, opt_b = a.optimizers["main"], b.optimizers["main"]
    for idx, state in opt_a["state"].items():
        for name, tensor in state.items():
            assert torch.equal(tensor, opt_b["state"][idx][name]), (idx, name)
    assert a.schedulers == b.schedulers
    assert a.state == b.state
    # the log of the resumed run is the straight run's, line for line
    assert (tmp_path / "a" / METRICS_FILE).read_text() == (tmp_path / "b" / METRICS_FILE).read_text()
    assert [r["epoch"] for r in _records(tmp_path / "a")] == [0, 0, 1, 1, 2, 2]
    final_a = load_file(tmp_path / "a" / "final" / "net.safetensors")
    final_b = load_file(tmp_path / "b" / "final" / "net.safetensors")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_resume_truncates_metrics_written_after_the_checkpoint(tmp_path):
    cfg = toy_config(tmp_path, max_steps=4)
    cfg.checkpoint.every = 2
    train(ToyFlowMatching(), VectorDataset(), cfg, progress=False)
    reference = (tmp_path / METRICS_FILE).read_text()
    # pretend the run crashed after logging step 4 but before checkpoint-4 completed
    (tmp_path / "checkpoint-00000004" / "manifest.json").unlink()
    with open(tmp_path / METRICS_FILE, "a") as fh:
        fh.write('{"step": 5, "loss": 1.0}\n{"step": 6, "lo')  # a stale line and a torn one
    train(ToyFlowMatching(), VectorDataset(), cfg, resume=True, progress=False)
    assert (tmp_path / METRICS_FILE).read_text() == reference


def test_every_trainable_parameter_changes_after_one_step(tmp_path):
    method = ToyFlowMatching()
    before = {k: v.clone() for k, v in method.net.state_dict().items()}
    train(method, VectorDataset(), toy_config(tmp_path, max_steps=1), progress=False)
    for key, value in method.net.state_dict().items():
        assert not torch.equal(value, before[key]), f"{key} did not change"


def test_gradient_accumulation_matches_a_larger_batch(tmp_path):
    """2 micro-batches of B=2 == 1 batch of B=4: same global batch, same per-sample noise.
    Tolerance: 1e-6 relative on losses, 1e-6 absolute on weights (float32 summation order differs)."""
    runs = {}
    for name, (b, k) in {"accum": (2, 2), "big": (4, 1)}.items():
        method = ToyFlowMatching()
        cfg = toy_config(tmp_path / name, max_steps=4, batch_size=b, grad_accum_steps=k, grad_clip=None)
        cfg.optim = OptimConfig(lr=1e-2)
        train(method, VectorDataset(), cfg, progress=False)
        runs[name] = (method.net.state_dict(), _records(tmp_path / name))
    (w_a, log_a), (w_b, log_b) = runs["accum"], runs["big"]
    for ra, rb in zip(log_a, log_b, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5)
    for key in w_a:
        torch.testing.assert_close(w_a[key], w_b[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["nan_loss", "nan_grad"])
def test_non_finite_steps_are_skipped_and_counted(tmp_path, kind):
    bad = {1, 3}
    method = ToyFlowMatching(
        record=True, **({"nan_steps": bad} if kind == "nan_loss" else {"inf_grad_steps": bad})
    )
    cfg = toy_config(tmp_path, max_steps=5, log_every=5, max_nan_steps_in_row=2)
    result = train(method, VectorDataset(), cfg, progress=False)
    assert result.step == 5 and result.nan_skipped == 2
    for step in bad:  # the optimizer did not move on a skipped step
        for key, value in method.snapshots[step].items():
            assert torch.equal(value, method.snapshots[step + 1][key]), (step, key)
    for key, value in method.snapshots[0].items():
        assert not torch.equal(value, method.snapshots[1][key])
    records = _records(tmp_path)
    # skipped steps are always logged (log_every=5 otherwise logs only step 5)
    assert [r["step"] for r in records] == [2, 4, 5]
    assert [r["skipped"] for r in records] == [True, True, False]
    assert [r["nan_skipped"] for r in records] == [1, 2, 2]
    if kind == "nan_loss":
        assert records[0]["loss"] is None
    else:
        assert records[0]["loss"] is not None and records[0]["grad_norm"] is None


def test_consecutive_non_finite_steps_raise_training_diverged(tmp_path):
    cfg = toy_config(tmp_path, max_steps=10, max_nan_steps_in_row=3)
    cfg.checkpoint.every = 1
    with pytest.raises(TrainingDiverged, match=r"3 steps in a row.*checkpoint-00000003"):
        train(ToyFlowMatching(nan_steps={1, 2, 3, 4}), VectorDataset(), cfg, progress=False)
    records = _records(tmp_path)
    assert records[-1]["step"] == 4 and records[-1]["nan_skipped"] == 3
    assert find_latest_checkpoint(tmp_path).name == "checkpoint-00000003"  # none for the diverging step
    # checkpoints taken during the NaN streak still hold the weights of step 1 (nothing was applied)
    w1 = load_checkpoint(tmp_path / "checkpoint-00000001").weights["net"]
    w3 = load_checkpoint(tmp_path / "checkpoint-00000003").weights["net"]
    assert all(torch.equal(w1[k], w3[k]) for k in w1)


def test_nan_counter_resets_after_a_good_step(tmp_path):
    cfg = toy_config(tmp_path, max_steps=6, max_nan_steps_in_row=2)
    result = train(ToyFlowMatching(nan_steps={0, 2, 4}), VectorDataset(), cfg, progress=False)
    assert result.step == 6 and result.nan_skipped == 3


def test_lr_schedule_warmup_then_cosine(tmp_path):
    cfg = toy_config(tmp_path, max_steps=6)
    cfg.optim = OptimConfig(lr=0.1, schedule="cosine", warmup_steps=2)
    train(ToyFlowMatching(), VectorDataset(), cfg, progress=False)
    lrs = [r["lr"] for r in _records(tmp_path)]
    expected = [0.0, 0.05] + [0.1 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 4)) for s in range(2, 6)]
    assert lrs == pytest.approx(expected, abs=1e-12)


def test_two_groups_update_alternately(tmp_path):
    method = TwoNetMethod()
    train(method, VectorDataset(), toy_config(tmp_path, max_steps=4), progress=False)
    for step in range(3):
        active = "gen" if step % 2 == 0 else "critic"
        for key, before in method.snapshots[step].items():
            after = method.snapshots[step + 1][key]
            assert torch.equal(before, after) != key.startswith(active), (step, key)
    records = _records(tmp_path)
    assert "gen/loss" in records[0] and "critic/loss" not in records[0]
    assert "critic/loss" in records[1] and "gen/lr" not in records[1]
    ckpt = load_checkpoint(find_latest_checkpoint(tmp_path))
    assert sorted(ckpt.weights) == ["critic", "gen"] and sorted(ckpt.optimizers) == ["critic", "gen"]


def test_data_order_is_split_across_processes_without_changing_the_global_batch():
    """Process p of P, micro-step k reads its own slice; together they are the 1-process global batch."""
    data = VectorDataset(13)
    collate = torch.utils.data.default_collate

    def ids(cursor):
        return [b["index"].tolist() for b in cursor.next_step()]

    single = DataCursor(
        data, collate, seed=1, micro_batch=4, accum=1, num_processes=1, process_index=0, num_workers=0
    )
    ranks = [
        DataCursor(
            data, collate, seed=1, micro_batch=1, accum=2, num_processes=2, process_index=p, num_workers=0
        )
        for p in range(2)
    ]
    for _ in range(7):  # 3 steps per epoch (13 // 4): crosses two epoch boundaries
        (whole,) = ids(single)
        r0, r1 = ids(ranks[0]), ids(ranks[1])
        assert [r0[0], r1[0], r0[1], r1[1]] == [[i] for i in whole]
        assert len(set(whole)) == 4
    assert single.state() == ranks[0].state() == {"epoch": 2, "position": 4, "global_batch_size": 4}


def test_refuses_to_overwrite_a_run_and_checks_inputs(tmp_path):
    cfg = toy_config(tmp_path, max_steps=1)
    train(ToyFlowMatching(), VectorDataset(), cfg, progress=False)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(ToyFlowMatching(), VectorDataset(), cfg, progress=False)
    with pytest.raises(ValueError, match="fewer than one global batch of 8"):
        train(ToyFlowMatching(), VectorDataset(5), toy_config(tmp_path / "x", batch_size=8), progress=False)


def test_logs_checkpoint_config_and_export(tmp_path):
    cfg = toy_config(tmp_path, max_steps=4, log_every=2, trackers=["tensorboard"])
    cfg.ema = EMAConfig(use=True, decay=0.5)
    cfg.checkpoint.every = 1
    cfg.checkpoint.keep_last = 2
    method = ToyFlowMatching()
    result = train(method, VectorDataset(), cfg, progress=False)
    assert [r["step"] for r in _records(tmp_path)] == [2, 4]
    # tensorboard under logs/<project>, with every config key as a hyperparameter
    assert list((tmp_path / "logs" / "flowalign").glob("events.out.tfevents.*"))
    import yaml

    (hparams_file,) = (tmp_path / "logs" / "flowalign").rglob("hparams.yml")  # in a timestamped sub-folder
    hparams = yaml.safe_load(hparams_file.read_text())
    assert hparams["max_steps"] == 4 and hparams["optim.lr"] == cfg.optim.lr and hparams["ema.decay"] == 0.5
    assert hparams["trackers"] == "['tensorboard']"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000003", "checkpoint-00000004"]
    assert load_config(TrainConfig, tmp_path / "checkpoint-00000004" / "config.yaml") == cfg
    final = load_file(result.export_dir / "net.safetensors")
    assert all(torch.equal(final[k], v) for k, v in method.net.state_dict().items())
    ema_final = load_file(tmp_path / "final-ema" / "net.safetensors")
    ema_ckpt = load_checkpoint(tmp_path / "checkpoint-00000004").ema
    assert all(torch.equal(ema_final[k], ema_ckpt[f"net.{k}"]) for k in ema_final)
    assert not all(torch.equal(ema_final[k], final[k]) for k in final)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_schedules_match_diffusers_get_scheduler(schedule):
    from diffusers.optimization import get_scheduler

    def lrs(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
        sched = make(opt)
        out = []
        for _ in range(12):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    cfg = OptimConfig(lr=0.3, schedule=schedule, warmup_steps=3)
    ours = lrs(lambda opt: build_lr_scheduler(opt, cfg, max_steps=10))
    name = "constant_with_warmup" if schedule == "constant" else schedule
    theirs = lrs(lambda opt: get_scheduler(name, opt, num_warmup_steps=3, num_training_steps=10))
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_bf16_autocast_keeps_fp32_weights_and_tracks_the_fp32_run(tmp_path):
    runs = {}
    for mp in ("no", "bf16"):
        method = ToyFlowMatching()
        train(
            method,
            VectorDataset(),
            toy_config(tmp_path / mp, max_steps=3, mixed_precision=mp),
            progress=False,
        )
        assert all(p.dtype == torch.float32 for p in method.net.parameters())
        assert (
            method.net.forward.__func__ is torch.nn.Sequential.forward
        )  # accelerate's autocast patch removed
        runs[mp] = [r["loss"] for r in _records(tmp_path / mp)]
    assert runs["bf16"] != runs["no"]  # autocast was really on
    assert runs["bf16"] == pytest.approx(runs["no"], rel=2e-2)
    with pytest.raises(ValueError, match="fp16' needs a CUDA device"):
        train(
            ToyFlowMatching(),
            VectorDataset(),
            toy_config(tmp_path / "fp16", mixed_precision="fp16"),
            progress=False,
        )


def test_worker_processes_and_duck_typed_methods_give_the_same_run(tmp_path):
    class Plain:  # not a Method subclass: the loop falls back to Method's defaults
        def __init__(self) -> None:
            self.inner = ToyFlowMatching()

        def trainable_modules(self):
            return self.inner.trainable_modules()

        def compute_loss(self, batch, ctx, group):
            return self.inner.compute_loss(batch, ctx, group)

    train(ToyFlowMatching(), VectorDataset(), toy_config(tmp_path / "a", max_steps=4), progress=False)
    train(Plain(), VectorDataset(), toy_config(tmp_path / "b", max_steps=4, num_workers=2), progress=False)
    assert (tmp_path / "a" / METRICS_FILE).read_text() == (tmp_path / "b" / METRICS_FILE).read_text()


def test_resume_from_an_explicit_checkpoint_and_bad_methods(tmp_path):
    cfg = toy_config(tmp_path / "a", max_steps=4)
    cfg.checkpoint.every = 2
    cfg.checkpoint.keep_last = None
    train(ToyFlowMatching(), VectorDataset(), cfg, progress=False)
    # continue from checkpoint-2 into a new folder: the same steps 3-4 as the original run
    cfg_b = toy_config(tmp_path / "b", max_steps=4)
    result = train(
        ToyFlowMatching(),
        VectorDataset(),
        cfg_b,
        resume=tmp_path / "a" / "checkpoint-00000002",
        progress=False,
    )
    assert result.step == 4
    assert _records(tmp_path / "b") == _records(tmp_path / "a")[2:]

    class NoLoss:
        def trainable_modules(self):
            return {}

    with pytest.raises(TypeError, match="NoLoss is not a Method: it has no compute_loss"):
        train(NoLoss(), VectorDataset(), toy_config(tmp_path / "c"), progress=False)

    class WrongGroup(ToyFlowMatching):
        def groups_to_update(self, step):
            return ["critic"]

    with pytest.raises(
        ValueError, match=r"groups_to_update\(0\) returned \['critic'\]; groups are \['main'\]"
    ):
        train(WrongGroup(), VectorDataset(), toy_config(tmp_path / "d"), progress=False)
