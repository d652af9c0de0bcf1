"""Staged loading of the one-step runs: the teacher and its trainable copies wait on the CPU while the
text encoders (and the VAE, for f-distill's real-data latents) build the caches on the device. The
teacher is the tiny SD3 model (its CLIP text encoders and a VAE).

On a CPU-only machine the training device and the CPU are one device, so the run gets a distinct
target, ``cpu:0`` (a valid torch device that computes on the CPU), and every ``nn.Module.to`` call is
recorded: the last recorded target of a module is where the run placed it (``None``: never moved
since it was built on the CPU).
"""

from __future__ import annotations

import json

import pytest
import torch
from onestep_helpers import PROMPTS
from stand_ins import BrightnessReward, Placements

from flowalign.config import CheckpointConfig, OptimConfig, TrainConfig
from flowalign.data.media import save_image
from flowalign.models.sd3 import SD3Model
from flowalign.toy.render import render_prompts
from flowalign.training import loop, placement
from flowalign.training.cache import text_encoder_names
from flowalign.training.methods.distar import DistarConfig, DistarRun, run_distar
from flowalign.training.methods.fdistill import FDistill, FDistillConfig, FDistillRun, run_fdistill
from flowalign.training.methods.onestep_data import OneStepData

TARGET = torch.device("cpu", 0)
CPU = torch.device("cpu")
SIZE = 64  # the tiny SD3 teacher: 8x8 latents


def _train(out, **kw) -> TrainConfig:
    return TrainConfig(
        output_dir=out,
        max_steps=2,
        batch_size=2,
        log_every=1,
        trackers=[],
        cpu=True,
        optim=OptimConfig(lr=1e-3),
        checkpoint=CheckpointConfig(every=0),
        **kw,
    )


def _manifest(folder) -> str:
    rows = []
    for i, (prompt, image) in enumerate(zip(PROMPTS, render_prompts(PROMPTS, size=SIZE), strict=True)):
        save_image(image, folder / f"{i}.png")
        rows.append(json.dumps({"prompt": prompt, "file": f"{i}.png"}) + "\n")
    (folder / "manifest.jsonl").write_text("".join(rows))
    return str(folder / "manifest.jsonl")


def _run(kind: str, teacher_dir, folder, out):
    """f-distill with a discriminator on cached real latents (generator step, then critic step), or DI*
    with a pixel reward (the VAE stays for its decode)."""
    if kind == "fdistill":
        return FDistillRun(
            teacher=str(teacher_dir),
            method=FDistillConfig(
                divergence="js", height=SIZE, width=SIZE, generator_every=2, gan_weight=1e-2
            ),
            data=OneStepData(real_manifest=_manifest(folder)),
            cache_latents=True,
            train=_train(out),
        )
    (folder / "prompts.txt").write_text("\n".join(PROMPTS))
    return DistarRun(
        teacher=str(teacher_dir),
        method=DistarConfig(reward_scale=1.0, height=SIZE, width=SIZE, generator_every=2, guidance_scale=2.0),
        data=OneStepData(prompts_file=folder / "prompts.txt"),
        train=_train(out),
    )


def _start(kind: str, run):
    return (
        run_fdistill(run, progress=False)
        if kind == "fdistill"
        else run_distar(run, reward=BrightnessReward(), progress=False)
    )


@pytest.mark.parametrize("kind", ["fdistill", "distar"])
def test_staged_losses_equal_the_one_phase_load(kind, tiny_model_dir, tmp_path, monkeypatch):
    teacher_dir = tiny_model_dir("sd3")
    """On one device the two loads are the same computation: the first two steps' losses agree exactly."""
    records = {}
    for staged in (True, False):
        monkeypatch.setattr(placement, "stages_placement", lambda run, s=staged: s)
        out = tmp_path / f"run-{staged}"
        _start(kind, _run(kind, teacher_dir, tmp_path, out))
        lines = (out / "metrics.jsonl").read_text().splitlines()
        records[staged] = [json.loads(line) for line in lines]
    # every logged number of a step but the clock: losses, gradient norms, ratios, accuracies
    kept = {s: [{k: v for k, v in r.items() if "/" in k} for r in recs] for s, recs in records.items()}
    assert [sorted(r) for r in kept[True]] == [sorted(r) for r in kept[False]]
    assert len(kept[True]) == 2 and "generator/loss" in kept[True][0] and "critic/loss" in kept[True][1]
    assert kept[True] == kept[False]


@pytest.mark.parametrize("kind", ["fdistill", "distar"])
def test_caches_are_built_with_every_transformer_on_the_cpu(kind, tiny_model_dir, tmp_path, monkeypatch):
    teacher_dir = tiny_model_dir("sd3")
    placed = Placements(monkeypatch, TARGET)
    snapshots: list[tuple[str, dict[int, torch.device]]] = []  # (encoder call, placements then)
    encode_prompt, encode_media = SD3Model.encode_prompt, SD3Model.encode_media

    def prompt_spy(self, prompts, **kwargs):
        snapshots.append(("prompts", dict(placed.last)))
        return encode_prompt(self, prompts, **kwargs)

    def media_spy(self, media, **kwargs):
        snapshots.append(("media", dict(placed.last)))
        return encode_media(self, media, **kwargs)

    monkeypatch.setattr(SD3Model, "encode_prompt", prompt_spy)
    monkeypatch.setattr(SD3Model, "encode_media", media_spy)
    heads_built = []
    finish = FDistill.finish_loading

    def finish_spy(self):  # the probe forward runs with the transformer already on the device
        heads_built.append((placed.of(self.teacher.transformer), self.teacher.execution_device))
        return finish(self)

    monkeypatch.setattr(FDistill, "finish_loading", finish_spy)
    started = {}
    train = loop.train

    def start(method, *args, **kwargs):
        teacher = method.teacher
        started.update(
            method=method,
            snapshots=len(snapshots),
            encoders={placed.of(teacher.modules()[n]) for n in text_encoder_names(teacher)},
            vae=placed.of(teacher.pipe.vae),
            nets={placed.of(m) for m in (teacher.transformer, method.generator, method.fake)},
            execution_device=teacher.execution_device,
        )
        return train(method, *args, **kwargs)

    monkeypatch.setattr(loop, "train", start)
    result = _start(kind, _run(kind, teacher_dir, tmp_path, tmp_path / "run"))
    assert result.step == 2
    method = started.pop("method")
    nets = [method.teacher.transformer, method.generator, method.fake]
    caching = snapshots[: started.pop("snapshots")]
    assert {name for name, _ in caching} == ({"prompts", "media"} if kind == "fdistill" else {"prompts"})
    for name, seen in caching:  # no transformer copy has gone to the target while the caches build
        assert {seen.get(id(net), CPU) for net in nets} == {CPU}, name
        encoders = {seen.get(id(method.teacher.modules()[n])) for n in text_encoder_names(method.teacher)}
        assert encoders == ({TARGET} if name == "prompts" else {CPU}), name
        assert seen.get(id(method.teacher.pipe.vae)) == TARGET
    vae = CPU if kind == "fdistill" else TARGET  # DI* decodes its samples for the reward
    assert started == {"encoders": {CPU}, "vae": vae, "nets": {TARGET}, "execution_device": None}
    assert method.generator.dtype == torch.float32 and method.fake.dtype == torch.float32
    if kind == "fdistill":
        assert heads_built == [(TARGET, None)] and method.discriminator is not None
    assert (tmp_path / "run" / "cache" / "prompts" / "index.json").is_file()


def test_offloaded_teacher_is_probed_on_the_device(tiny_model_dir, tmp_path, monkeypatch):
    """With ``train.offload_frozen`` the frozen teacher ends on the CPU, but the discriminator's probe
    forward runs with it on the device, before the generator and fake score join it there."""
    placed = Placements(monkeypatch, TARGET)
    seen = []
    finish = FDistill.finish_loading

    def finish_spy(self):
        nets = (self.teacher.transformer, self.generator, self.fake, self.discriminator)
        seen.append(tuple(placed.of(m) if m is not None else None for m in nets))
        return finish(self)

    monkeypatch.setattr(FDistill, "finish_loading", finish_spy)
    run = _run("fdistill", tiny_model_dir("sd3"), tmp_path, tmp_path / "run")
    run.train = _train(tmp_path / "run", offload_frozen=True)
    assert run_fdistill(run, progress=False).step == 2
    # the probe: the teacher alone on the target; then it is offloaded, the trainable networks (heads
    # included) are on the target and nothing is built again
    assert seen == [(TARGET, None, None, None), (CPU, TARGET, TARGET, TARGET)]
