"""Sample previews during training (``train.validation``).

Every ``validation.every`` optimizer steps the main process samples the validation prompts with
the model as it trains (a LoRA run: adapters on) and writes

    <output_dir>/samples/step-<6 digits>/<k>.png   (clips: <k>.gif)
    <output_dir>/samples/step-<6 digits>/samples.json   prompts, files and sampling settings

and the same pictures to the trackers (tensorboard: one image grid per step, a clip as its frames).

A preview leaves the run as it was: the global random state (torch CPU/CUDA, python, numpy) is
saved before and restored after, the noise comes from its own generators (prompt k: seed + k), and
the trained modules return to train mode. A run with previews therefore trains bit-identically to
one without, and a resumed run to an uninterrupted one. Components that were taken off the device
(text encoders with cached prompts, the VAE with cached latents) visit it for the preview only.
Frozen text encoders encode the prompts once, at the start; a trained one encodes them at each
preview. Sharded runs (FSDP2, DeepSpeed) are refused: the main process alone cannot run a sharded
model.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flowalign.config import TrainConfig, ValidationConfig
from flowalign.models.base import FlowModel, PromptEmbeds
from flowalign.sampling.guidance import model_velocity_fn
from flowalign.sampling.samplers import get_sampler
from flowalign.training.cache import text_encoder_names
from flowalign.training.checkpoint import capture_rng_state, restore_rng_state

__all__ = ["SAMPLES_DIR", "Previews", "flow_model_of", "preview_folder"]

SAMPLES_DIR = "samples"


def preview_folder(output_dir: str | os.PathLike, step: int) -> Path:
    """The folder of the previews written after optimizer step ``step``."""
    return Path(output_dir) / SAMPLES_DIR / f"step-{step:06d}"


def flow_model_of(method: Any) -> FlowModel | None:
    """The FlowModel a method trains (its ``model``), also through the loop's method adapter."""
    for obj in (method, getattr(method, "_obj", None)):
        model = getattr(obj, "model", None)
        if isinstance(model, FlowModel):
            return model
    return None


def _device_of(module: nn.Module) -> torch.device | None:
    return next((p.device for p in module.parameters()), None)


@contextmanager
def _on_device(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    """Move ``modules`` to ``device`` for the block, each back where it was afterwards."""
    homes = [_device_of(m) for m in modules]
    try:
        for module, home in zip(modules, homes, strict=True):
            if home is not None and home != device:
                module.to(device)
        yield
    finally:
        for module, home in zip(modules, homes, strict=True):
            if home is not None and home != device:
                module.to(home)


def _to_cpu(cond: PromptEmbeds | None) -> PromptEmbeds | None:
    return None if cond is None else cond.to(device="cpu")


class Previews:
    """The previews of one run; :meth:`maybe_write` after each optimizer step (every process calls it,
    the main process samples)."""

    def __init__(self, method: Any, cfg: TrainConfig, acc: Any, *, sharded: bool) -> None:
        self.config: ValidationConfig = cfg.validation
        self.output_dir = Path(cfg.output_dir)
        self.acc = acc
        self.method = method
        model = flow_model_of(method)
        if model is None:
            raise ValueError(
                f"train.validation: {type(method).__name__} trains no flow model (no .model), so it has "
                "nothing to sample; remove the validation block"
            )
        if sharded:
            raise ValueError(
                "train.validation: previews need the whole model on the main process; they are not "
                "available with FSDP2 or DeepSpeed (use DDP or remove the validation block)"
            )
        self.model = model
        self.modules = dict(method.trainable_modules())
        names = text_encoder_names(model)
        self.encoders = [model.modules()[n] for n in names]
        trained = {id(m) for m in self.modules.values()}
        self.encode_each_time = any(id(m) in trained for m in self.encoders)
        self.guidance = (
            model.default_guidance_scale if self.config.guidance_scale is None else self.config.guidance_scale
        )
        self.use_cfg = not model.uses_guidance_embedding and self.guidance > 1.0
        cfg = self.config
        self.size = (
            cfg.height or model.default_height,
            cfg.width or model.default_width,
            cfg.num_frames or model.default_num_frames,
        )
        try:
            model.check_size(*self.size)
        except ValueError as err:
            raise ValueError(f"train.validation: {err}") from None
        self.conds: tuple[PromptEmbeds, PromptEmbeds | None] | None = None
        if acc.is_main_process and not self.encode_each_time:
            self.conds = tuple(map(_to_cpu, self._encode()))

    def _encode(self) -> tuple[PromptEmbeds, PromptEmbeds | None]:
        state = capture_rng_state()
        try:
            with torch.no_grad(), _on_device(self.encoders, self.model.device):
                return self.model.encode_prompt(list(self.config.prompts), with_uncond=self.use_cfg)
        finally:
            restore_rng_state(state)

    def maybe_write(self, step: int) -> Path | None:
        """Write the previews of ``step`` if it is a preview step (main process); their folder or None."""
        if step % self.config.every or not self.acc.is_main_process:
            return None
        state = capture_rng_state()
        modes = {name: module.training for name, module in self.modules.items()}
        try:
            for module in self.modules.values():
                module.eval()
            media = self.sample()
            folder = self.save(step, media)
            self.log(step, media)
            return folder
        finally:
            for name, module in self.modules.items():
                module.train(modes[name])
            restore_rng_state(state)

    @torch.no_grad()
    def sample(self) -> Tensor:
        """Media in [0, 1] of the validation prompts: [N, 3, H, W] or [N, T, 3, H, W]."""
        cfg, model = self.config, self.model
        device = model.device
        cond, uncond = self.conds if self.conds is not None else self._encode()
        cond = cond.to(device=device)
        uncond = uncond.to(device=device) if uncond is not None else None
        height, width, frames = self.size
        noise = torch.cat(
            [
                model.prepare_noise(
                    1,
                    height=height,
                    width=width,
                    num_frames=frames,
                    generator=torch.Generator().manual_seed(cfg.seed + k),
                )  # fmt: skip
                for k in range(len(cfg.prompts))
            ]
        ).float()
        v_fn = model_velocity_fn(
            model,
            cond,
            uncond=uncond if self.use_cfg else None,
            guidance_scale=1.0 if model.uses_guidance_embedding else self.guidance,
            embedded_guidance=self.guidance if model.uses_guidance_embedding else None,
        )
        steps = cfg.steps or model.default_num_inference_steps
        ts = model.time_grid(steps, height=height, width=width, num_frames=frames, device=device)
        x0 = get_sampler("euler")(v_fn, noise, ts, callback=None, progress=False)
        vae = model.modules().get("vae")
        with _on_device([vae] if vae is not None else [], device):
            return model.decode_latents(x0).float().cpu()

    def save(self, step: int, media: Tensor) -> Path:
        """Write ``media`` into the step's folder (built aside, then renamed into place)."""
        from flowalign.data.media import save_image, save_video

        folder = preview_folder(self.output_dir, step)
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        files = []
        for k, item in enumerate(media):
            name = f"{k:02d}.gif" if item.ndim == 4 else f"{k:02d}.png"
            if item.ndim == 4:
                save_video(item, tmp / name, fps=self.config.fps)
            else:
                save_image(item, tmp / name)
            files.append(name)
        settings = {k: v for k, v in vars(self.config).items() if k != "prompts"}
        record = {"step": step, "files": files, "prompts": list(self.config.prompts), **settings}
        (tmp / "samples.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
        if folder.exists():  # a resumed run writes the step again
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        return folder

    def log(self, step: int, media: Tensor) -> None:
        """The previews to every tracker that takes images (tensorboard: NCHW grids)."""
        for tracker in self.acc.trackers:
            if not callable(getattr(tracker, "log_images", None)):
                continue
            if tracker.name == "tensorboard":
                if media.ndim == 4:
                    tracker.log_images({"samples": media}, step=step, dataformats="NCHW")
                else:
                    for k, clip in enumerate(media):
                        tracker.log_images({f"samples/{k:02d}": clip}, step=step, dataformats="NCHW")
            else:  # e.g. wandb: a list of HWC uint8 pictures (a clip's middle frame)
                pictures = media if media.ndim == 4 else media[:, media.shape[1] // 2]
                arrays = [(p.permute(1, 2, 0) * 255).round().byte().numpy() for p in pictures]
                tracker.log_images({"samples": arrays}, step=step)
