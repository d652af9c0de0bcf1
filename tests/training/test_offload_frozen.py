"""train.offload_frozen: the frozen modules of a run stay on the CPU under accelerate's offload hooks,
the loop does not move them, and the losses are those of the plain run (same weights, same ops)."""

from __future__ import annotations

import json

import pytest
import torch
from stand_ins import random_image_pairs
from torch import nn

from flowalign.config import TrainConfig
from flowalign.planning.memory import SWITCHES, Recipe, suggest
from flowalign.training.loop import train
from flowalign.training.offload import is_offloaded, place_frozen
from flowalign.training.runs import DPORun, prepare_dpo

TARGET = torch.device("cpu", 0)  # a device distinct from "cpu" that still computes on the CPU


def _pairs(tmp_path, n: int = 2) -> str:
    return str(random_image_pairs(tmp_path, [(32, 32)] * n))


def _run(model_dir, data, out, *, offload: bool) -> DPORun:
    train_cfg = TrainConfig(
        output_dir=out, max_steps=2, batch_size=2, cpu=True, trackers=[], log_every=1, offload_frozen=offload
    )
    return DPORun(model=str(model_dir), data=data, train=train_cfg, lora=None, cache_prompts=False)


def test_full_finetune_dpo_with_offloaded_frozen_modules_gives_the_same_losses(tiny_model_dir, tmp_path):
    data = _pairs(tmp_path)
    losses, seen = {}, []
    for offload in (False, True):
        run = _run(tiny_model_dir("sd3"), data, tmp_path / f"run-{offload}", offload=offload)
        method, items = prepare_dpo(run)
        reference = method.reference.copy
        before = {n: p.detach().clone() for n, p in reference.named_parameters()}
        plain_loss = method.compute_loss

        def compute_loss(*args, method=method, reference=reference, plain=plain_loss, **kwargs):
            params = list(reference.parameters()) + list(method.model.pipe.text_encoder.parameters())
            seen.append((hasattr(reference, "_hf_hook"), {p.device.type for p in params}))
            return plain(*args, **kwargs)

        method.compute_loss = compute_loss
        train(method, items, run.train, progress=False, run_config=run)
        lines = (tmp_path / f"run-{offload}" / "metrics.jsonl").read_text().splitlines()
        losses[offload] = [json.loads(line)["loss"] for line in lines]
        # after the run the hooks are gone and the reference holds its own weights again, on the CPU
        assert not hasattr(reference, "_hf_hook") and not is_offloaded(reference)
        for name, p in reference.named_parameters():
            assert p.device.type == "cpu" and torch.equal(p, before[name]), name
    assert len(losses[True]) == 2 and losses[True][0] != losses[True][1]
    assert losses[True] == losses[False]
    # plain run: real CPU weights; offloaded run: the hooks are on and the parameters are meta
    # placeholders (the weights sit in the hooks' CPU state dict) between and during steps
    assert seen[:2] == [(False, {"cpu"})] * 2
    assert seen[2:] == [(True, {"meta"})] * 2


class _Moves:
    def __init__(self, monkeypatch) -> None:
        self.targets: dict[int, list[str]] = {}
        plain_to = nn.Module.to

        def to(module, *args, **kwargs):
            device = next((a for a in args if isinstance(a, torch.device | str)), kwargs.get("device"))
            if device is not None:
                self.targets.setdefault(id(module), []).append(str(torch.device(device)))
            return plain_to(module, *args, **kwargs)

        monkeypatch.setattr(nn.Module, "to", to)


def test_the_loop_placement_skips_offloaded_modules_and_refuses_sharding(monkeypatch):
    moves = _Moves(monkeypatch)
    frozen = {"reference": nn.Linear(3, 3), "vae": nn.Linear(3, 3)}
    trainable = {"transformer": nn.Linear(3, 3)}
    place_frozen(frozen, trainable, TARGET, offload=True)
    for module in frozen.values():
        assert is_offloaded(module) and module._hf_hook is not None
        assert moves.targets[id(module)] == ["cpu"]  # never sent to the training device
        assert module.weight.device.type == "meta"
        hooks = getattr(module._hf_hook, "hooks", [module._hf_hook])
        assert TARGET in {getattr(h, "execution_device", None) for h in hooks}
    place_frozen(frozen, trainable, TARGET, offload=True)  # a second placement leaves them alone
    assert all(moves.targets[id(m)] == ["cpu"] for m in frozen.values())
    streamed, copy = nn.Linear(3, 3), nn.Linear(3, 3)
    copy.load_state_dict(streamed.state_dict())
    place_frozen({"vae": streamed}, trainable, "cpu", offload=True)
    x = torch.randn(2, 3)
    assert torch.equal(streamed(x), copy(x))  # the weights are streamed in for the forward
    plain = {"vae": nn.Linear(3, 3)}
    place_frozen(plain, trainable, TARGET, offload=False)
    assert moves.targets[id(plain["vae"])] == [str(TARGET)]
    with pytest.raises(ValueError, match="^train.offload_frozen works with single-process or DDP"):
        place_frozen({"vae": nn.Linear(2, 2)}, trainable, TARGET, offload=True, sharded=True)
    shared = {"copy": nn.Sequential(trainable["transformer"])}
    with pytest.raises(ValueError, match="^train.offload_frozen: frozen module 'copy' shares parameters"):
        place_frozen(shared, trainable, TARGET, offload=True)


def test_staged_full_finetune_leaves_the_reference_on_the_cpu(tiny_model_dir, tmp_path, monkeypatch):
    """A staged run (cached prompts) sends its trainable transformer to the device after caching, and
    with offload_frozen its reference copy and VAE to the CPU instead, where the loop's hooks keep them."""
    from flowalign.training import runs

    moves = _Moves(monkeypatch)
    monkeypatch.setattr(runs, "training_device", lambda train: TARGET)
    run = _run(tiny_model_dir("sd3"), _pairs(tmp_path), tmp_path / "run", offload=True)
    run.cache_prompts = True
    method, _ = prepare_dpo(run)
    assert moves.targets[id(method.model.transformer)][-1] == str(TARGET)
    for module in (method.reference.copy, method.model.pipe.vae):  # the VAE was on TARGET for caching
        assert moves.targets[id(module)][-1] == "cpu"
        assert {p.device for p in module.parameters()} == {torch.device("cpu")}


def test_planner_names_the_real_key_and_offers_it_only_where_training_offloads():
    name = next(n for n, c in SWITCHES if c == {"cpu_offload": True})
    assert "train.offload_frozen" in name
    full = Recipe("sd35m", lora_rank=None, gradient_checkpointing=True)
    switches, _ = suggest(full, 1)  # nothing fits 1 GiB: every switch that lowers the peak is kept
    assert name in switches
    # a LoRA base lives inside the trained transformer: with the encoders and the VAE cached away, a
    # LoRA run has no frozen module left to offload
    lora = Recipe("sd35m", text_encoders="cached", vae="cached")
    switches, _ = suggest(lora, 1)
    assert name not in switches


def test_fdistill_with_an_offloaded_teacher_gives_the_same_losses(tiny_model_dir):
    """The teacher (transformer, encoders, VAE) is streamed; the generator's loss differentiates through
    it up to its feature block, and both groups' losses equal the plain run's exactly (one device)."""
    from flowalign.models import load_flow_model
    from flowalign.training.method import StepContext
    from flowalign.training.methods.fdistill import FDistill, FDistillConfig

    def run_group(method, batch, group, step):
        ctx = StepContext(step=step, seed=0, group=group, modules=method.trainable_modules())
        loss, _ = method.compute_loss(batch, ctx, group)
        loss.backward()  # through the streamed teacher for the generator's group
        return loss.item()

    losses = {}
    for offload in (False, True):
        torch.manual_seed(0)
        config = FDistillConfig(divergence="js", gan_weight=1e-2, guidance_scale=3.0, height=64, width=64)
        fd = FDistill(load_flow_model(tiny_model_dir("sd3")), config)
        place_frozen(fd.frozen_modules(), fd.trainable_modules(), "cpu", offload=offload, owner=fd)
        assert is_offloaded(fd.teacher.transformer) == offload
        pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        batch = {"prompt": ["a", "b"], "index": torch.arange(2), "pixels": pixels}
        losses[offload] = [run_group(fd, batch, g, s) for g, s in (("generator", 0), ("critic", 1))]
    assert losses[True] == losses[False]
