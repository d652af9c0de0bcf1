"""One-step generator checkpoints: save, recognise and sample them.

A distilled one-step generator (f-distill, Diff-Instruct*) is the teacher's transformer fine-tuned to
map pure noise z at t = 1 to a sample in one call, x0 = z - v_G(z, 1, c). It is saved as a complete
model folder in the teacher family's diffusers layout (the generator in place of the transformer, the
teacher's text encoders, tokenizers, VAE and scheduler alongside), so ``load_flow_model(dir)`` and
``FlowPipeline(model)(..., one_step=True)`` (``flowalign generate --one-step``) sample it unchanged.

A ``one_step.json`` next to ``model_index.json`` records how: the method, the guidance to pass
(None: no classifier-free guidance, since the teacher's CFG is distilled into the generator; a value
for guidance-embedding families such as FLUX.1-dev), and the method's settings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowalign.files import atomic_write_json
from flowalign.formats import read_tagged_json
from flowalign.models.base import FlowModel
from flowalign.models.loading import load_flow_model
from flowalign.pipelines.text_to_media import FlowPipeline, GenerationOutput

__all__ = ["ONE_STEP_FILE", "OneStepPipeline", "read_one_step_metadata", "save_one_step"]

ONE_STEP_FILE = "one_step.json"
FORMAT = "flowalign.one_step"


def save_one_step(
    teacher: FlowModel,
    generator: nn.Module,
    out_dir: str | os.PathLike,
    *,
    method: str,
    guidance_scale: float | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``generator`` as a full model folder (teacher's other components) plus ``one_step.json``.

    A generator carrying LoRA adapters is merged into a copy first, so the folder holds plain weights.

    Args:
        teacher: the teacher adapter whose pipeline supplies every other component.
        generator: the one-step generator (same class as ``teacher.transformer``).
        out_dir: destination folder (created).
        method: the method's name, recorded in the metadata.
        guidance_scale: guidance to sample with (None: no CFG); an embedded-guidance value for FLUX.1-dev.
        extra: more settings to record.

    Returns:
        ``out_dir``.
    """
    from flowalign.models.lora import has_lora, merge_lora

    if type(generator) is not type(teacher.transformer):
        raise ValueError(
            f"save_one_step: generator is a {type(generator).__name__}, the teacher's transformer a "
            f"{type(teacher.transformer).__name__}; they must be the same class"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if has_lora(generator):
        import copy

        generator = merge_lora(copy.deepcopy(generator))
    was_training = generator.training
    generator.eval()
    try:
        with teacher.swapped(transformer=generator):
            teacher.save_pretrained(out_dir)
    finally:
        generator.train(was_training)
    meta = {
        "format": FORMAT,
        "version": 1,
        "method": method,
        "generator_time": 1.0,
        "guidance_scale": guidance_scale,
        "family": teacher.family,
        **(extra or {}),
    }
    atomic_write_json(out_dir / ONE_STEP_FILE, meta, sort_keys=True, default=str)
    return out_dir


def read_one_step_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """``one_step.json`` of a model folder, or None if the folder is not a one-step checkpoint.

    Raises:
        ValueError: the file exists but is not valid JSON or not in this format (names the file).
    """
    file = Path(path) / ONE_STEP_FILE
    if not file.is_file():
        return None
    return read_tagged_json(file, FORMAT)


class OneStepPipeline:
    """Sample a one-step checkpoint with the guidance its metadata records (no CFG unless stated).

    Args:
        model: a loaded one-step model (or a folder: loaded with :func:`load_flow_model`).
        guidance_scale: override of the recorded guidance (None: the recorded one, else 1 = no CFG).
    """

    def __init__(self, model: FlowModel | str | os.PathLike, *, guidance_scale: float | None = None) -> None:
        meta = None
        if not isinstance(model, FlowModel):
            meta = read_one_step_metadata(model)
            model = load_flow_model(model)
        self.model = model
        recorded = (meta or {}).get("guidance_scale")
        self.guidance_scale = guidance_scale if guidance_scale is not None else (recorded or 1.0)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], **kwargs: Any) -> GenerationOutput:
        """``FlowPipeline(model)(prompt, one_step=True, guidance_scale=...)``; other arguments as there."""
        if "num_inference_steps" in kwargs and kwargs["num_inference_steps"] not in (None, 1):
            raise ValueError(
                f"a one-step generator samples in 1 step, got num_inference_steps={kwargs['num_inference_steps']}"
            )
        kwargs.pop("num_inference_steps", None)
        kwargs.setdefault("guidance_scale", self.guidance_scale)
        return FlowPipeline(self.model)(prompt, one_step=True, **kwargs)
