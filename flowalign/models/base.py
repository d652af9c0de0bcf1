"""The FlowModel interface: the one contract every model family satisfies.

Everything outside ``flowalign.models`` works in canonical space (see ``flowalign.flow``):

- latents are unpacked: ``[B, C, H, W]`` for images, ``[B, C, T, H, W]`` for videos;
- ``x_t = (1 - t) x0 + t noise`` with ``t`` in [0, 1] (1 = noise) and ``v = noise - x0``;
- media are float tensors in [0, 1]: ``[B, 3, H, W]`` images, ``[B, T, 3, H, W]`` videos.

Dtypes: a model computes in the dtype it was loaded in (bf16, fp16 or fp32; a family's fp32
components, such as Wan's VAE, stay fp32), while latents, velocities and media cross the port in
at least fp32: each adapter casts its inputs to the network's dtype and its outputs back.

A family adapter wraps the family's diffusers pipeline (which owns loading, saving and the text
encoders) and converts at the port: timestep scaling, latent packing, VAE scale and shift, video axes.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import diffusers
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from packaging.version import Version
from torch import Tensor, nn

# diffusers renamed ``torch_dtype`` to ``dtype`` in 0.40.
_DTYPE_KWARG = "dtype" if Version(diffusers.__version__).release >= (0, 40) else "torch_dtype"


def at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in fp32 when it is in a half-precision dtype (bf16, fp16); fp32 and fp64 stay as they are.

    Latents, velocities and media leave a model in at least fp32, whatever its compute dtype: the
    samplers and losses integrate and reduce in full precision.
    """
    return x.to(torch.promote_types(x.dtype, torch.float32)) if x.is_floating_point() else x


def net_dtype(net: nn.Module) -> torch.dtype:
    """The compute dtype of a velocity network: the dtype of most of its base (non-LoRA) weights.

    Wrappers (DDP, ``torch.compile``) are seen through; LoRA parameters (fp32 while the frozen base
    is bf16) and small fp32 islands a family keeps (Wan's norms and time embedder) are outvoted
    by element count, so a bf16 base reads as bf16 and an fp32 full fine-tune as fp32.
    """
    counts: dict[torch.dtype, int] = {}
    for name, p in net.named_parameters():
        if p.is_floating_point() and "lora_" not in name:
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    if not counts:
        return torch.float32
    return max(counts, key=counts.get)


class ModelLoadError(ValueError):
    """A model folder or hub id that cannot be loaded as a flowalign model family."""


@dataclass
class PromptEmbeds:
    """Text conditioning for a batch. Fields a family does not use stay ``None``.

    A condition image (image-to-video first frame, edit source) travels in the same object as the
    text: the family's ``encode_prompt(..., images=...)`` fills the image fields and its
    ``velocity`` consumes them, so samplers and training losses pass one conditioning object.

    Attributes:
        embeds: token embeddings ``[B, L, D]``.
        pooled: pooled embeddings ``[B, D_pooled]`` (SD3, FLUX).
        text_ids: FLUX text position ids ``[L, 3]`` (shared by the batch, not batched).
        mask: ``[B, L]``, nonzero on real tokens, for families whose transformer drops or masks padding
            (bool for Qwen-Image and Z-Image; the pipeline's own float or integer mask for HunyuanVideo
            1.5 and LTX-2); None means every token counts.
        image_latents: condition-image latents ``[B, ...]`` in the family's layout (Wan I2V: the
            first-frame mask and latents concatenated on channels to the noisy latents; Qwen-Image-Edit:
            the source image's latents ``[B, 16, H_c, W_c]``, appended to the noisy tokens).
        image_embeds: condition-image encoder tokens ``[B, L_img, D_img]`` (Wan 2.1 I2V's CLIP).
        embeds_2: a second encoder's tokens ``[B, L2, D2]`` kept apart from ``embeds`` (HunyuanVideo
            1.5's ByT5 glyph encoder), with its token mask ``mask_2`` ``[B, L2]``.
    """

    embeds: Tensor
    pooled: Tensor | None = None
    text_ids: Tensor | None = None
    mask: Tensor | None = None
    image_latents: Tensor | None = None
    image_embeds: Tensor | None = None
    embeds_2: Tensor | None = None
    mask_2: Tensor | None = None

    _BATCHED = ("embeds", "pooled", "mask", "image_latents", "image_embeds", "embeds_2", "mask_2")

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def _map_batched(self, fn) -> PromptEmbeds:
        out = {name: getattr(self, name) for name in self._BATCHED}
        return replace(self, **{k: None if v is None else fn(v) for k, v in out.items()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PromptEmbeds:
        """Move every field; ``dtype`` applies to the floating ones (a bool or integer mask keeps its dtype)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                value = value.to(device=device, dtype=dtype if value.is_floating_point() else None)
            out[f.name] = value
        return PromptEmbeds(**out)

    def index(self, idx: Tensor | slice | list[int]) -> PromptEmbeds:
        """Select batch rows."""
        return self._map_batched(lambda x: x[idx])

    def repeat_interleave(self, repeats: int) -> PromptEmbeds:
        """Repeat each row ``repeats`` times (one prompt, several samples)."""
        return self._map_batched(lambda x: x.repeat_interleave(repeats, dim=0))

    @staticmethod
    def cat(items: list[PromptEmbeds]) -> PromptEmbeds:
        """Concatenate along the batch axis (e.g. [uncond, cond] for one CFG forward)."""
        first = items[0]
        lengths = {item.embeds.shape[1] for item in items}
        if len(lengths) != 1:
            raise ValueError(f"cannot batch prompt embeddings of different lengths {sorted(lengths)}")
        batched = {
            name: None if getattr(first, name) is None else torch.cat([getattr(item, name) for item in items])
            for name in PromptEmbeds._BATCHED
        }
        return PromptEmbeds(text_ids=first.text_ids, **batched)


def check_image_size(family: str, height: int, width: int, num_frames: int, *, multiple: int) -> None:
    """The size check of an image family whose sides must be positive multiples of ``multiple``."""
    for name, value in (("height", height), ("width", width)):
        if value < multiple or value % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple} for {family}, got {value}")
    if num_frames != 1:
        raise ValueError(f"{family} makes images: num_frames must be 1, got {num_frames}")


def check_video_size(
    family: str, height: int, width: int, num_frames: int, *, multiple: int, temporal: int
) -> None:
    """The size check of a video family: sides positive multiples of ``multiple``, frames ``1 + temporal * n``."""
    for name, value in (("height", height), ("width", width)):
        if value < multiple or value % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple} for {family}, got {value}")
    if num_frames < 1 or (num_frames - 1) % temporal:
        raise ValueError(f"num_frames must be 1 + a multiple of {temporal} for {family}, got {num_frames}")


class FlowModel(ABC):
    """A text-to-image/video rectified-flow model behind the canonical interface.

    Subclasses set ``family``, ``pipeline_class`` and implement the abstract methods. The wrapped
    diffusers pipeline stays available as ``self.pipe`` (components can be swapped there, e.g. a
    LoRA-adapted transformer).
    """

    family: ClassVar[str]
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    is_video: ClassVar[bool] = False
    default_num_inference_steps: ClassVar[int] = 28
    default_guidance_scale: ClassVar[float] = 7.0
    default_height: ClassVar[int] = 1024
    default_width: ClassVar[int] = 1024
    default_num_frames: ClassVar[int] = 1
    # Components that may be absent from a saved folder (loaded as None).
    optional_components: ClassVar[tuple[str, ...]] = ()
    # Components kept in fp32 whatever the compute dtype (the family's diffusers pipeline does the same).
    fp32_components: ClassVar[tuple[str, ...]] = ()

    def __init__(self, pipe: DiffusionPipeline, *, compute_dtype: torch.dtype | None = None):
        self.pipe = pipe
        self.compute_dtype = compute_dtype or net_dtype(pipe.transformer)
        """The dtype of the frozen weights (text encoders, a frozen transformer or reference): the
        dtype the model was loaded in, before any trainable part is kept in fp32."""

    @classmethod
    def component_dtypes(cls, torch_dtype: torch.dtype | dict[str, torch.dtype]) -> dict[str, torch.dtype]:
        """Per-component load dtypes, diffusers style (``{"default": ..., name: ...}``).

        A single dtype applies to every component except the family's ``fp32_components``; a dict
        overrides per component on top of that (e.g. ``{"default": bf16, "transformer": fp32}`` for
        a full fine-tune with fp32 master weights and bf16 frozen parts).
        """
        given = dict(torch_dtype) if isinstance(torch_dtype, dict) else {"default": torch_dtype}
        dtypes = {"default": given.pop("default", torch.float32)}
        dtypes.update({name: torch.float32 for name in cls.fp32_components})
        dtypes.update(given)
        return dtypes

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        *,
        torch_dtype: torch.dtype | dict[str, torch.dtype] = torch.float32,
        device: torch.device | str = "cpu",
        **components: Any,
    ) -> FlowModel:
        """Load from a hub id or a local folder in diffusers' layout; ``components`` replace parts.

        Each component is read straight into its dtype from :meth:`component_dtypes` (no fp32
        copy of a bf16 model on the way), then moved to ``device``.
        """
        index = read_model_index(path_or_id)
        # Optional components the folder does not have load as None (a folder that has them, e.g. a
        # Wan 2.2 A14B ``transformer_2``, loads them).
        kwargs = {name: None for name in cls.optional_components if name not in index}
        # Components saved as None (e.g. SD3 without T5) must be passed as None explicitly.
        expected, _ = cls.pipeline_class._get_signature_keys(cls.pipeline_class)
        kwargs.update({name: None for name in expected if index.get(name, [None, None])[0] is None})
        kwargs.update(components)
        dtypes = cls.component_dtypes(torch_dtype)
        kwargs[_DTYPE_KWARG] = dtypes
        try:
            pipe = cls.pipeline_class.from_pretrained(str(path_or_id), **kwargs)
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise ModelLoadError(f"cannot load {cls.family} model from {path_or_id}: {err}") from err
        except Exception as err:
            if type(err).__name__ != "UnpicklingError":  # torch.load(weights_only=True) refused a pickle
                raise
            raise ModelLoadError(
                f"cannot load {cls.family} model from {path_or_id}: a component's weights are a pickle that "
                "holds more than tensors, refused unread; save that component as safetensors"
            ) from None
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe.to(device), compute_dtype=dtypes["default"])

    def save_pretrained(self, path: str | Path) -> None:
        """Write the whole model (weights as safetensors) in diffusers' layout."""
        self.pipe.save_pretrained(str(path), safe_serialization=True)

    # ------------------------------------------------------------------ components
    @property
    def transformer(self) -> nn.Module:
        return self.pipe.transformer

    execution_device: torch.device | None = None
    """Where the adapters compute (prompt encoding, noise) while the transformer is elsewhere: staged
    placement (:mod:`flowalign.training.placement`) sets it while the transformer waits on the CPU
    and the text encoders work on the GPU. ``None`` (the default) means the transformer's device."""

    @property
    def device(self) -> torch.device:
        """:attr:`execution_device` when set, else the transformer's device."""
        if self.execution_device is not None:
            return self.execution_device
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's compute dtype (see :func:`net_dtype`)."""
        return net_dtype(self.transformer)

    @property
    def takes_images(self) -> bool:
        """True for families conditioned on an image (image-to-video, edit): their ``encode_prompt``
        takes ``images=`` (one per prompt) and the target ``height``/``width``/``num_frames``."""
        return False

    @property
    def training_t_span(self) -> tuple[float, float]:
        """The t range training draws from, (0, 1) unless the trained network serves only part of
        the trajectory (one Wan 2.2 A14B expert)."""
        return (0.0, 1.0)

    @property
    def requires_images(self) -> bool:
        """True where a condition image is mandatory (image-to-video, edit), not merely accepted."""
        return False

    @property
    def text_reads_image(self) -> bool:
        """True where the text encoder sees the condition image (edit families): the text embeddings
        then depend on the image and cannot come from a text-only prompt cache."""
        return False

    @property
    def uses_guidance_embedding(self) -> bool:
        """True for guidance-distilled models that take the guidance scale as an input (FLUX.1-dev)."""
        return False

    @property
    def guidance_scale_is_cfg(self) -> bool:
        """Whether ``guidance_scale`` means classifier-free guidance. False for families whose diffusers
        pipeline reads it as the embedded guidance input only (FLUX: real CFG is ``true_cfg_scale``)."""
        return not self.uses_guidance_embedding

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FlowModel:
        """Move every component; a ``dtype`` becomes the compute dtype (``fp32_components`` stay fp32)."""
        for name, module in self.modules().items():
            target = torch.float32 if dtype is not None and name in self.fp32_components else dtype
            module.to(device=device, dtype=target)
        if dtype is not None:
            self.compute_dtype = dtype
        return self

    def eval(self) -> FlowModel:
        for module in self.modules().values():
            module.eval()
        return self

    @contextmanager
    def swapped(self, **modules: nn.Module) -> Iterator[FlowModel]:
        """Temporarily replace pipeline components (e.g. by their DDP-wrapped training copies).

        The swap bypasses diffusers' config registration, so a saved pipeline never records it.
        """
        old = {name: getattr(self.pipe, name) for name in modules}
        try:
            for name, module in modules.items():
                object.__setattr__(self.pipe, name, module)
            yield self
        finally:
            for name, module in old.items():
                object.__setattr__(self.pipe, name, module)

    def modules(self) -> dict[str, nn.Module]:
        """The pipeline's nn.Module components by name."""
        return {k: v for k, v in self.pipe.components.items() if isinstance(v, nn.Module)}

    # ------------------------------------------------------------------ family interface
    @abstractmethod
    def encode_prompt(
        self, prompts: list[str], *, negative_prompts: list[str] | None = None, with_uncond: bool = False
    ) -> tuple[PromptEmbeds, PromptEmbeds | None]:
        """Encode prompts; with ``with_uncond`` also the negative (or empty) prompts for CFG.

        Families with :attr:`takes_images` also accept ``images`` (one condition image per prompt)
        and the target ``height``, ``width`` and ``num_frames``: the image fields of the returned
        :class:`PromptEmbeds` (both branches: CFG keeps the image in the unconditional pass too).
        """

    def encode_text(self, prompts: list[str]) -> PromptEmbeds:
        """The text part of the conditioning alone (no image fields), what a prompt cache stores: the
        ``cond`` of :meth:`encode_prompt`. Image-to-video families, whose ``encode_prompt`` requires an
        image, override it; their text embeddings do not depend on the image."""
        cond, _ = self.encode_prompt(list(prompts))
        return cond

    @abstractmethod
    def latent_shape(self, batch_size: int, height: int, width: int, num_frames: int = 1) -> tuple[int, ...]:
        """Canonical latent shape for media of this size."""

    @abstractmethod
    def check_size(self, height: int, width: int, num_frames: int = 1) -> None:
        """Raise ValueError naming the offending value if the family cannot make media of this size."""

    @abstractmethod
    def encode_media(self, media: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Media in [0, 1] -> canonical latents (the latent distribution's mode unless a generator is given)."""

    @abstractmethod
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Canonical latents -> media in [0, 1]."""

    @abstractmethod
    def velocity(
        self,
        x: Tensor,
        t: Tensor,
        cond: PromptEmbeds,
        *,
        guidance: float | Tensor | None = None,
        net: nn.Module | None = None,
    ) -> Tensor:
        """Predicted velocity ``v(x_t, t, c)``, canonical shape of ``x``; ``t`` is ``[B]`` in [0, 1].

        ``net`` replaces the transformer (same architecture: a policy, a reference, a fake score);
        ``guidance`` is the embedded guidance scale for guidance-distilled families. Inputs are cast
        to the network's dtype (:func:`net_dtype`), so a bf16 network takes fp32 latents; the
        output comes back in ``x``'s dtype.
        """

    def combine_guidance(self, v_uncond: Tensor, v_cond: Tensor, scale: float) -> Tensor:
        """Classifier-free guidance ``v_uncond + w (v_cond - v_uncond)``; a family whose pipeline
        also rescales the guided velocity (Qwen-Image) overrides this."""
        return v_uncond + scale * (v_cond - v_uncond)

    # ------------------------------------------------------------------ time grid
    def sampling_scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        """A fresh flow-matching Euler scheduler carrying this model's shift settings."""
        config = dict(self.pipe.scheduler.config)
        if isinstance(self.pipe.scheduler, FlowMatchEulerDiscreteScheduler):
            return FlowMatchEulerDiscreteScheduler.from_config(config)
        # Multistep flow schedulers (e.g. Wan's UniPC) carry the shift as ``flow_shift``.
        shift = config.get("flow_shift") or config.get("shift") or 1.0
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=config.get("num_train_timesteps", 1000), shift=shift
        )

    def time_grid(
        self, num_inference_steps: int, *, height: int, width: int, num_frames: int = 1, device=None
    ) -> Tensor:
        """Decreasing t grid ``[N + 1]`` from ~1 to 0, equal to the family's diffusers pipeline."""
        from flowalign.models.schedules import scheduler_time_grid

        return scheduler_time_grid(self.sampling_scheduler(), num_inference_steps, device=device)

    def prepare_noise(
        self,
        batch_size: int,
        *,
        height: int,
        width: int,
        num_frames: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Initial noise in canonical shape, drawn the way the family's diffusers pipeline draws it."""
        from diffusers.utils.torch_utils import randn_tensor

        shape = self.latent_shape(batch_size, height, width, num_frames)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)


# ---------------------------------------------------------------------- shared VAE conversions
def encode_with_image_vae(vae: nn.Module, media: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Images in [0, 1] -> latents z = (E(2x - 1) - shift_factor) * scaling_factor (SD3 and FLUX VAEs).

    The latent distribution's mode, or a sample when a generator is given.
    """
    dist = vae.encode((media * 2 - 1).to(vae.dtype)).latent_dist
    z = at_least_fp32(dist.sample(generator) if generator is not None else dist.mode())
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def decode_with_image_vae(vae: nn.Module, latents: Tensor) -> Tensor:
    """The inverse of :func:`encode_with_image_vae`: latents -> images in [0, 1] (at least fp32)."""
    z = latents / vae.config.scaling_factor + vae.config.shift_factor
    image = at_least_fp32(vae.decode(z.to(vae.dtype), return_dict=False)[0])
    return (image / 2 + 0.5).clamp(0, 1)


# ---------------------------------------------------------------------- registry and loading
_FAMILIES: dict[str, type[FlowModel]] = {}


def register_family(pipeline_class_name: str):
    """Register a FlowModel class for folders whose model_index.json names ``pipeline_class_name``."""

    def wrap(cls: type[FlowModel]) -> type[FlowModel]:
        _FAMILIES[pipeline_class_name] = cls
        return cls

    return wrap


def read_model_index(path_or_id: str | Path) -> dict:
    """model_index.json of a local folder or a hub id (errors name the path)."""
    path = Path(path_or_id)
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is a file, not a model folder in diffusers' layout")
        index = path / "model_index.json"
        if not index.is_file():
            raise ModelLoadError(f"{path} is not a diffusers model folder: no model_index.json inside")
        try:
            return json.loads(index.read_text())
        except json.JSONDecodeError as err:
            raise ModelLoadError(f"{index} is not valid JSON: {err}") from err
    looks_local = str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") != 1
    if looks_local:
        raise ModelLoadError(f"model folder {path_or_id} does not exist")
    try:
        return DiffusionPipeline.load_config(str(path_or_id))
    except Exception as err:  # hub errors come in many types; one message for all
        raise ModelLoadError(f"cannot read model_index.json of hub model {path_or_id}: {err}") from err
