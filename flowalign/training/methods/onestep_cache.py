"""Cached conditioning of the one-step runs (f-distill, Diff-Instruct*): the teacher's prompt embeddings
encoded once, and f-distill's real data encoded once through the teacher's VAE.

Without caches every generator and critic step encodes its prompts through the teacher's text
encoders (twice with CFG: the prompts and the empty prompt), and every critic step of f-distill
encodes its real media through the VAE for the discriminator. :func:`cache_onestep_conditioning`
builds, before training:

- the prompt cache (``cache_prompts``, default on) of every prompt of the data plus the empty prompt
  (CFG's unconditional branch, as ``encode_prompt(..., with_uncond=True)`` encodes it), in
  ``<output_dir>/cache/prompts`` (:class:`~flowalign.training.cache.PromptEmbedCache`); the text
  encoders then go to the CPU and leave the method's frozen modules, so the loop never places them
  (not for image-conditioned teachers, which encode each row's condition image with its text);
- the latent cache (``cache_latents``) of the real media, for f-distill with a discriminator (the only
  one-step consumer of real media; DI* is data-free and decodes its samples for the reward, so it
  keeps the VAE), in ``latent_cache_dir`` (default ``<output_dir>/cache/latents``); the VAE then goes
  to the CPU as well.

A run that caches its prompts loads in stages, as DPO, RWR and SFT do (``flowalign/training/placement.py``):
:func:`load_onestep_teacher` reads the teacher on the CPU (its transformer in fp32, the source of the
trainable copies) and puts only its text encoders and VAE on the device; the method then builds the
generator and the fake score from the transformer on the CPU, the caches are built with the encoders
(and the VAE, for real-data latents) on the device, they leave, and :func:`finish_onestep_loading`
moves the transformers (teacher, generator, fake score) to the device and builds f-distill's
discriminator heads, whose input widths come from one probe forward of the teacher. The device
never holds the encoders beside a transformer copy. A quantized, FSDP2 or DeepSpeed launch loads
in one phase (:func:`~flowalign.training.placement.stages_placement`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from flowalign.models.base import FlowModel
from flowalign.training.cache import PromptEmbedCache, text_encoder_names
from flowalign.training.latent_cache import cache_media_latents, data_identity
from flowalign.training.methods.onestep_data import MediaTextDataset

__all__ = [
    "cache_onestep_conditioning",
    "finish_onestep_loading",
    "load_onestep_teacher",
    "onestep_data_identity",
]


def load_onestep_teacher(run: Any, *, method: str) -> tuple[FlowModel, torch.dtype]:
    """The teacher of a one-step run (``run.teacher``) and its frozen dtype (``run.teacher_dtype``, else
    the compute dtype of ``train.mixed_precision``). Staged (the run caches its prompts, see
    :func:`~flowalign.training.placement.stages_placement`), the teacher is read on the CPU and only
    its other components go to the training device, which :attr:`FlowModel.execution_device` names."""
    from flowalign.training.methods.onestep_dtypes import frozen_dtype, load_run_teacher
    from flowalign.training.placement import stage_components, stages_placement
    from flowalign.training.runs import training_device

    frozen = frozen_dtype(run.teacher_dtype, run.train.mixed_precision)
    device = training_device(run.train)
    staged = stages_placement(run)
    teacher = load_run_teacher(run.teacher, method=method, frozen=frozen, device="cpu" if staged else device)
    return (stage_components(teacher, device) if staged else teacher), frozen


def finish_onestep_loading(run: Any, method: Any) -> None:
    """The last phase of a staged one-step run: the method's trainable networks and the frozen ones
    the step uses go to the device (:func:`~flowalign.training.placement.finish_staging`; to the CPU
    for the frozen ones with ``train.offload_frozen``), and :meth:`OneStepDistillation.finish_loading`
    builds what needs the teacher's forward (f-distill's discriminator) on the device: with
    ``offload_frozen`` the teacher transformer visits the device alone for that probe, before the
    generator and fake score arrive. Nothing moves for a run loaded in one phase."""
    from flowalign.training.placement import finish_staging

    teacher = method.teacher
    if teacher.execution_device is not None and run.train.offload_frozen:
        teacher.transformer.to(teacher.execution_device)
        method.finish_loading()
    finish_staging(method, offload_frozen=run.train.offload_frozen, model=teacher)
    method.finish_loading()


def onestep_data_identity(data: Any, kind: str) -> str:
    """The identity of a one-step run's real data (:class:`OneStepData`): the manifest file (path,
    size, mtime) or the toy spec and item count, as :func:`data_identity` hashes them."""
    if data.toy_items > 0:
        return data_identity(f"toy:{kind}", "onestep", data.toy_items)
    return data_identity(data.real_manifest, "onestep")


def cache_onestep_conditioning(run: Any, method: Any, dataset: Dataset) -> Dataset:
    """Build the caches ``run`` asks for (``cache_prompts``, ``cache_latents``; see the module
    docstring) on the main process first, take the encoders they replace off the device, and return
    the dataset to train on."""
    from accelerate import PartialState

    from flowalign.training.placement import dataset_prompts

    train, teacher = run.train, method.teacher
    out = Path(train.output_dir) / "cache"
    state = PartialState(cpu=train.cpu)
    if run.cache_prompts and not teacher.takes_images:  # a condition image is encoded with its text
        rows = dataset.rows if isinstance(dataset, MediaTextDataset) else None  # no media read
        prompts = [*(dataset_prompts(dataset) if rows is None else [r["prompt"] for r in rows]), ""]
        with state.main_process_first():
            method.prompt_cache = PromptEmbedCache.build(teacher, prompts, cache_dir=out / "prompts")
        for name in text_encoder_names(teacher):
            teacher.modules()[name].to("cpu")
    wants_media = getattr(method, "reads_real_media", False)
    if getattr(run, "cache_latents", False) and wants_media and "pixels" in dataset[0]:
        kind = "video" if teacher.is_video else "image"
        folder = run.latent_cache_dir or out / "latents"
        with state.main_process_first():
            dataset = cache_media_latents(
                teacher, dataset, folder, identity=onestep_data_identity(run.data, kind)
            )
        vae = teacher.modules().get("vae")
        if vae is not None:
            vae.to("cpu")
        method.media_cached = True
    return dataset
