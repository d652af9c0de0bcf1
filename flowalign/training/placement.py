"""Staged placement: a run that caches its conditioning never holds every component on the GPU at once.

Without staging a run loads the whole pipeline onto its device (transformer, every text encoder and
the VAE), builds its prompt cache (and latent cache), and only then takes the encoders off: the peak
at load is the sum of all weights, more than the training step needs for most recipes (SD3.5-Large
with T5-XXL, FLUX.1-dev). Staged, the same run goes through three phases:

1. load: the transformer stays on the CPU, read in its training dtype (the compute dtype for a LoRA
   base, fp32 master weights for a full fine-tune; never an extra fp32 copy); the text encoders
   and the VAE go to the process's device, and :attr:`FlowModel.execution_device` points the
   adapters at that device while the transformer is elsewhere;
2. caching: the method is built (LoRA adapters are created on the CPU transformer, in fp32; the
   frozen DPO reference of a full fine-tune is copied there in the compute dtype), then the prompt
   cache, the condition cache of image-conditioned families (:mod:`flowalign.training.condition_cache`)
   and the latent cache are built on the device, after which the text encoders (the image encoder,
   and the VAE when latents are cached) go to the CPU;
3. :func:`finish_staging`: every module the method trains or keeps frozen for the step (the
   transformer with its adapters, a reference copy, the VAE when latents are not cached) moves to
   the device, keeping its dtype, and the execution-device override is cleared.

The device then holds at most max(encoders + VAE, training state) instead of their sum. A
bitsandbytes-quantized base (``quantize_base``) is quantized while it is moved to the GPU, so it keeps
the one-phase load, and so do DeepSpeed runs.

DPO, RWR and SFT runs under FSDP2 always stage (with or without a prompt cache), and phase 3 differs: the modules FSDP2
shards (every trainable module, and a frozen one marked
:data:`~flowalign.training.distributed.SHARD_FROZEN` such as the frozen DPO reference of a full
fine-tune) stay on the CPU as full tensors in their training dtype. The loop then shards them there
(``fully_shard`` through ``Accelerator.prepare``), and ``fully_shard`` moves one FSDP unit at a time
to the device and keeps only this process's shard of it, so no process ever holds a whole network on
its device: the device peak while loading is the encoders (while caching), then one shard of each
sharded network plus one unsharded FSDP unit (a transformer block) at a time. Each process reads the
whole checkpoint into its CPU memory (host RAM: the sharded networks once per process).

Every move of a component to the run's device, and every module kept on the CPU for sharding, is
reported to the callables in :data:`PLACEMENT_HOOKS` as ``hook(event, name, device)`` with ``event``
``"device"`` or ``"cpu-for-sharding"`` (tests record the order of placement and sharding with it).

The one-step runs (f-distill, DI*) stage the same way with their teacher as the model: the generator
and fake score are copied from its transformer on the CPU (``flowalign/training/methods/onestep_cache.py``).

The LoRA adapters of a staged run are initialised by the CPU generator (the run seed), so a staged
run on a GPU starts from different adapter draws than an unstaged one would; on one device both
are the same run, loss for loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from flowalign.config import TrainConfig
from flowalign.models.base import FlowModel
from flowalign.training.condition_cache import cache_condition_images
from flowalign.training.distributed import SHARD_FROZEN, wants_deepspeed, wants_fsdp
from flowalign.training.latent_cache import cache_run_latents, data_identity

__all__ = [
    "PLACEMENT_HOOKS",
    "cache_run_conditioning",
    "cache_run_conditions",
    "dataset_prompts",
    "cache_run_prompts",
    "finish_staging",
    "stage_components",
    "stages_placement",
]


PLACEMENT_HOOKS: list[Callable[[str, str, torch.device], None]] = []
"""Callables told of each placement step as ``hook(event, component name, device)`` (see the module
docstring); empty unless a caller appends one."""


def _report(event: str, name: str, device: torch.device) -> None:
    for hook in PLACEMENT_HOOKS:
        hook(event, name, device)


def stages_placement(run: Any) -> bool:
    """Whether ``run`` (a DPO, RWR, SFT, f-distill or DI* run config) loads in stages (see the module
    docstring): its base is not quantized, the launch is not DeepSpeed, and it caches its prompts or,
    for a DPO, RWR or SFT run, the launch is FSDP2. One-step runs (they have a ``teacher``) keep the
    one-phase load under FSDP2: their discriminator probe runs the fake score on the device before
    the loop shards it."""
    if getattr(run, "quantize_base", None) is not None or wants_deepspeed():
        return False
    if wants_fsdp():
        return not hasattr(run, "teacher")
    return bool(getattr(run, "cache_prompts", False))


def stage_components(model: FlowModel, device: torch.device | str) -> FlowModel:
    """Phase 1 on a model loaded on the CPU: every component but the transformer moves to ``device``
    (dtypes kept), and the model computes on ``device`` (:attr:`FlowModel.execution_device`)."""
    device = torch.device(device)
    for name, module in model.modules().items():
        if name != "transformer":
            module.to(device)
            _report("device", name, device)
    model.execution_device = device
    return model


def finish_staging(
    method: Any, *, offload_frozen: bool = False, model: FlowModel | None = None, sharded: bool | None = None
) -> None:
    """Phase 3: the method's trainable and frozen-for-the-step modules move to the model's execution
    device (dtypes kept: fp32 adapters and master weights stay fp32), and the override is cleared.
    With ``offload_frozen`` (``train.offload_frozen``) the frozen ones go to the CPU instead, where the
    loop's offload hooks keep them. ``model`` is the staged model (default ``method.model``; a one-step
    method's teacher). With ``sharded`` (default: the launch is FSDP2) the modules FSDP2 will shard
    stay on the CPU, whole, for the loop to shard there. Nothing happens for a model that was not
    staged."""
    model = method.model if model is None else model
    device = model.execution_device
    if device is None:
        return
    sharded = wants_fsdp() if sharded is None else sharded
    for name, module in method.trainable_modules().items():
        _place(name, module, device, keep_cpu=sharded)
    for name, module in method.frozen_modules().items():
        if offload_frozen:
            module.to("cpu")
        else:
            _place(name, module, device, keep_cpu=sharded and getattr(module, SHARD_FROZEN, False))
    model.execution_device = None


def _place(name: str, module: torch.nn.Module, device: torch.device, *, keep_cpu: bool) -> None:
    if keep_cpu:
        module.to("cpu")
        _report("cpu-for-sharding", name, device)
    else:
        module.to(device)
        _report("device", name, device)


def cache_run_prompts(method: Any, prompts: list[str], train: TrainConfig) -> None:
    """Encode a run's prompts once into ``<output_dir>/cache/prompts`` (the main process builds it,
    the others then open it) and take the text encoders off the device."""
    from accelerate import PartialState

    with PartialState(cpu=train.cpu).main_process_first():
        method.cache_prompts(prompts, cache_dir=Path(train.output_dir) / "cache" / "prompts")


def dataset_prompts(data: Dataset) -> list[str]:
    """Every prompt of a training dataset: its ``prompts`` (a list, or a method returning one), else
    each item's ``"prompt"`` (reads every item once)."""
    prompts = getattr(data, "prompts", None)
    if callable(prompts):
        prompts = prompts()
    if prompts is None:
        prompts = [data[i]["prompt"] for i in range(len(data))]
    return list(prompts)


def cache_run_conditions(run: Any, method: Any, data: Dataset, *settings: Any) -> Dataset:
    """The condition images of an image-conditioned run's items, encoded once into
    ``<output_dir>/cache/conditions`` (:mod:`flowalign.training.condition_cache`; the main process
    builds it, the others then open it); the image encoder then leaves the device. Data without
    condition images (text-to-video rows for TI2V-5B) is returned as it is."""
    from accelerate import PartialState

    if "condition" not in data[0]:
        if getattr(method.model, "requires_images", False):
            raise ValueError(f"{method.model.family} needs a condition image per sample; the data has none")
        return data
    train = run.train
    folder = Path(train.output_dir) / "cache" / "conditions"
    with PartialState(cpu=train.cpu).main_process_first():
        rows = cache_condition_images(method.model, data, folder, identity=data_identity(run.data, *settings))
    encoder = method.model.modules().get("image_encoder")
    if encoder is not None:
        encoder.to("cpu")
    method.conditions_cached = True
    return rows


def cache_run_conditioning(
    run: Any,
    method: Any,
    data: Dataset,
    prompts: Sequence[str] | Callable[[], Sequence[str]],
    *settings: Any,
) -> Dataset:
    """Phase 2 and 3 of a run: its prompt cache (when ``run.cache_prompts`` and the method's text
    encoders are frozen and read no condition image; ``prompts`` may be a callable, read only then) with, on image-conditioned
    families, the condition images' encodings (:func:`cache_run_conditions`), its latent cache (when
    ``run.cache_latents``, see :func:`~flowalign.training.latent_cache.cache_run_latents` for
    ``settings``; it names the condition cache's fingerprint), then :func:`finish_staging`. Returns
    the dataset to train on."""
    text_reads_image = getattr(method.model, "text_reads_image", False)
    if run.cache_prompts and getattr(method, "caches_prompts", True) and not text_reads_image:
        cache_run_prompts(method, list(prompts() if callable(prompts) else prompts), run.train)
        if getattr(method.model, "takes_images", False):
            data = cache_run_conditions(run, method, data, *settings)
            settings = (*settings, getattr(data, "fingerprint", None))
    data = cache_run_latents(run, method, data, *settings)
    finish_staging(method, offload_frozen=run.train.offload_frozen)
    return data
