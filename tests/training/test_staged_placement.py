"""Staged placement: the transformer joins the device only after the conditioning caches are built.

On a CPU-only machine the training device and the CPU are one device, so the tests give the run a
distinct target, ``cpu:0`` (a valid torch device that computes on the CPU), and record every
``nn.Module.to`` call: the last recorded target of a module is where the run placed it.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from stand_ins import Placements, random_image_pairs
from torch import nn

from flowalign.config import LoraConfig, TrainConfig
from flowalign.models.sd3 import SD3Model
from flowalign.training import runs
from flowalign.training.loop import train
from flowalign.training.placement import stages_placement
from flowalign.training.runs import DPORun, RWRRun, prepare_dpo

TARGET = torch.device("cpu", 0)


def _pairs(tmp_path, n: int = 4) -> str:
    return str(random_image_pairs(tmp_path, [(32, 32)] * n))


def _run(model_dir, data, out, *, lora: bool = True, cache_latents: bool = False) -> DPORun:
    return DPORun(
        model=str(model_dir),
        data=data,
        train=TrainConfig(
            output_dir=out,
            max_steps=2,
            batch_size=2,
            cpu=True,
            mixed_precision="bf16",
            trackers=[],
            log_every=1,
        ),
        lora=LoraConfig(rank=4, init="gaussian", export_merged=False) if lora else None,
        cache_latents=cache_latents,
    )


def _encoders(model) -> list[nn.Module]:
    return [m for name, m in model.modules().items() if name.startswith("text_encoder")]


def test_staged_run_caches_with_the_transformer_on_the_cpu(tiny_model_dir, tmp_path, monkeypatch):
    placed = Placements(monkeypatch, TARGET)
    seen = {}
    encode_prompt, encode_media = SD3Model.encode_prompt, SD3Model.encode_media

    def record(phase, model):
        seen.setdefault(phase, []).append(
            {
                "device": model.device,
                "transformer": placed.of(model.transformer),
                "encoders": {placed.of(m) for m in _encoders(model)},
                "vae": placed.of(model.pipe.vae),
            }
        )

    def prompt_spy(self, prompts, **kwargs):
        record("prompts", self)
        return encode_prompt(self, prompts, **kwargs)

    def media_spy(self, media, **kwargs):
        record("media", self)
        return encode_media(self, media, **kwargs)

    monkeypatch.setattr(SD3Model, "encode_prompt", prompt_spy)
    monkeypatch.setattr(SD3Model, "encode_media", media_spy)
    run = _run(tiny_model_dir("sd3"), _pairs(tmp_path), tmp_path / "run", cache_latents=True)
    method, _ = prepare_dpo(run)
    model = method.model

    cpu = torch.device("cpu")
    assert seen["prompts"] and seen["media"]
    for state in seen["prompts"]:  # the adapters encode on the target while the transformer waits
        assert state == {"device": TARGET, "transformer": cpu, "encoders": {TARGET}, "vae": TARGET}
    for state in seen["media"]:  # the prompt cache is built: the encoders have left the target
        assert state == {"device": TARGET, "transformer": cpu, "encoders": {cpu}, "vae": TARGET}
    assert placed.of(model.transformer) == TARGET and model.execution_device is None
    assert {placed.of(m) for m in _encoders(model)} == {cpu} and placed.of(model.pipe.vae) == cpu
    lora = [p for n, p in model.transformer.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    base = [p for n, p in model.transformer.named_parameters() if "lora_" not in n]
    assert sum(p.numel() for p in base if p.dtype == torch.bfloat16) > 0.9 * sum(p.numel() for p in base)


def test_staged_full_finetune_moves_master_weights_and_reference(tiny_model_dir, tmp_path, monkeypatch):
    placed = Placements(monkeypatch, TARGET)
    run = _run(tiny_model_dir("sd3"), _pairs(tmp_path), tmp_path / "run", lora=False)
    method, _ = prepare_dpo(run)
    transformer, reference = method.model.transformer, method.reference.copy
    assert placed.of(transformer) == TARGET and placed.of(reference) == TARGET
    assert all(p.dtype == torch.float32 and p.requires_grad for p in transformer.parameters())
    dtypes = [p.dtype for p in reference.parameters()]
    assert dtypes.count(torch.bfloat16) > 0.9 * len(dtypes) and not any(
        p.requires_grad for p in reference.parameters()
    )
    assert placed.of(method.model.pipe.vae) == TARGET  # latents not cached: the VAE stays for the step
    assert {placed.of(m) for m in _encoders(method.model)} == {torch.device("cpu")}


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_staged_dpo_losses_equal_the_one_phase_load(lora, tiny_model_dir, tmp_path, monkeypatch):
    """On one device the two loads are the same computation: the losses agree exactly."""
    data = _pairs(tmp_path)
    losses = {}
    for staged in (True, False):
        monkeypatch.setattr(runs, "stages_placement", lambda run, s=staged: s)
        run = _run(tiny_model_dir("sd3"), data, tmp_path / f"run-{staged}", lora=lora)
        method, items = prepare_dpo(run)
        assert method.model.execution_device is None
        train(method, items, run.train, progress=False, run_config=run)
        lines = (tmp_path / f"run-{staged}" / "metrics.jsonl").read_text().splitlines()
        losses[staged] = [json.loads(line)["loss"] for line in lines]
    assert len(losses[True]) == 2 and losses[True][0] != losses[True][1]
    assert losses[True] == losses[False]


def test_quantized_sharded_and_uncached_runs_load_in_one_phase(tmp_path, monkeypatch):
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    dpo = DPORun(model="m", data="d", train=TrainConfig(output_dir=tmp_path, cpu=True))
    rwr = RWRRun(model="m", data="d", train=TrainConfig(output_dir=tmp_path, cpu=True))
    assert stages_placement(dpo) and stages_placement(rwr)
    assert not stages_placement(DPORun(model="m", data="d", quantize_base="int8"))
    assert not stages_placement(RWRRun(model="m", data="d", quantize_base="nf4"))
    assert not stages_placement(DPORun(model="m", data="d", cache_prompts=False))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert not stages_placement(dpo) and not stages_placement(rwr)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # FSDP2 stages, with or without a prompt cache
    assert stages_placement(dpo) and stages_placement(DPORun(model="m", data="d", cache_prompts=False))
    assert not stages_placement(DPORun(model="m", data="d", quantize_base="int8"))
    one_step = SimpleNamespace(teacher="m", cache_prompts=True, quantize_base=None)
    assert not stages_placement(one_step)  # one-step runs keep the one-phase load under FSDP2
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert stages_placement(one_step)


def test_fsdp2_run_keeps_the_sharded_networks_on_the_cpu(tiny_model_dir, tmp_path, monkeypatch):
    """Under an FSDP2 launch a full fine-tune caches with the encoders on the target, and the policy
    and its frozen reference copy (both sharded by the loop) stay on the CPU, whole, in their training
    dtypes (fp32 master weights, the reference in bf16): the device never receives them unsharded."""
    from flowalign.training.distributed import SHARD_FROZEN
    from flowalign.training.placement import PLACEMENT_HOOKS

    placed = Placements(monkeypatch, TARGET)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    events = []

    def hook(event, name, device):
        events.append((event, name, device))

    PLACEMENT_HOOKS.append(hook)
    try:
        seen = []
        encode_prompt = SD3Model.encode_prompt

        def spy(self, prompts, **kwargs):
            seen.append((placed.of(self.transformer), {placed.of(m) for m in _encoders(self)}))
            return encode_prompt(self, prompts, **kwargs)

        monkeypatch.setattr(SD3Model, "encode_prompt", spy)
        run = _run(tiny_model_dir("sd3"), _pairs(tmp_path), tmp_path / "run", lora=False)
        method, _ = prepare_dpo(run)
    finally:
        PLACEMENT_HOOKS.remove(hook)
    cpu = torch.device("cpu")
    assert seen and all(state == (cpu, {TARGET}) for state in seen)
    reference = method.reference.copy
    assert getattr(reference, SHARD_FROZEN, False)
    for module, dtype in ((method.model.transformer, torch.float32), (reference, torch.bfloat16)):
        assert placed.of(module) == cpu
        assert {(p.device, p.dtype) for p in module.parameters()} == {(cpu, dtype)}
    assert ("cpu-for-sharding", "transformer", TARGET) in events
    assert not any(e[0] == "device" and e[1] == "transformer" for e in events), events
    assert method.model.execution_device is None


def test_one_phase_load_encodes_with_every_component_on_the_target(tiny_model_dir, tmp_path, monkeypatch):
    """Under a DeepSpeed launch the old path stays: the whole pipeline is on the target before caching."""
    placed = Placements(monkeypatch, TARGET)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    seen = []
    encode_prompt = SD3Model.encode_prompt

    def spy(self, prompts, **kwargs):
        seen.append((placed.of(self.transformer), {placed.of(m) for m in _encoders(self)}))
        return encode_prompt(self, prompts, **kwargs)

    monkeypatch.setattr(SD3Model, "encode_prompt", spy)
    run = _run(tiny_model_dir("sd3"), _pairs(tmp_path), tmp_path / "run")
    method, _ = prepare_dpo(run)
    assert seen and all(state == (TARGET, {TARGET}) for state in seen)
    assert method.model.execution_device is None
