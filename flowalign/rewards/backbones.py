"""CLIP image/text backbones behind one interface, loaded from open_clip or transformers.

Two published formats are supported:

- **open_clip**: a built-in model name with a ``pretrained`` tag or a checkpoint file
  (``"ViT-H-14"`` + ``"laion2B-s32B-b79K"``), ``"hf-hub:org/repo"``, or a folder holding
  ``open_clip_config.json`` + weights (``"local-dir:/path"`` or the plain folder path).
- **transformers**: a ``CLIPModel`` folder or hub id (``config.json`` + ``model.safetensors``)
  with its tokenizer and ``preprocessor_config.json``, or those taken from a ``processor`` folder/id.

A backbone pairs the network with the tensor preprocessing that reproduces its reference
transform (see :mod:`flowalign.rewards.preprocess`). Checkpoint files are read with
``torch.load(weights_only=True)`` or safetensors, never with pickle's full power.
"""

from __future__ import annotations

import json
from abc import ABCMeta, abstractmethod
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowalign.rewards.preprocess import (
    ImagePreprocess,
    preprocess_from_hf_image_processor,
    preprocess_from_open_clip,
    preprocess_images,
)

__all__ = [
    "ClipBackbone",
    "HFClipBackbone",
    "OpenClipBackbone",
    "load_clip_backbone",
    "load_hf_clip",
    "load_open_clip",
    "load_state_dict_file",
    "load_state_dict_strict",
]


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``).

    Accepts a bare state dict or a dict holding it under ``"state_dict"`` (HPSv2 and
    open_clip training checkpoints); a ``"module."`` prefix on every key (DDP) is removed.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a mapping of names to tensors (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path), device="cpu")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling refused or corrupt file
            raise ValueError(f"{path}: cannot be read as a weights-only torch checkpoint ({err})") from err
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        kind = type(obj).__name__
        raise ValueError(
            f"{path}: expected a state dict (name -> tensor) or {{'state_dict': ...}}, got {kind}"
        )
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, Tensor], *, source: str | Path) -> None:
    """Load every parameter/buffer of ``module`` from ``state_dict``, or explain the mismatch.

    Raises:
        ValueError: missing keys, unexpected keys or shape mismatches, naming ``source`` and up to
            five offending keys of each kind.
    """
    own = module.state_dict()
    state_dict = dict(state_dict)
    # open_clip stores logit_scale as a 0-d parameter; older checkpoints may hold it as [1].
    for key in ("logit_scale", "logit_bias"):
        if key in state_dict and key in own and state_dict[key].numel() == own[key].numel():
            state_dict[key] = state_dict[key].reshape(own[key].shape)
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: expected {tuple(own[k].shape)}, got {tuple(state_dict[k].shape)}"
        for k in own
        if k in state_dict and own[k].shape != state_dict[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:5]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:5]})")
        if shapes:
            parts.append(f"{len(shapes)} with another shape (e.g. {shapes[:5]})")
        raise ValueError(f"{source}: weights do not fit {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)


def _features(out: Any) -> Tensor:
    # transformers >= 5 returns a ModelOutput whose pooler_output is the projected embedding.
    return out if isinstance(out, Tensor) else out.pooler_output


class ClipBackbone(nn.Module, metaclass=ABCMeta):
    """A CLIP-style dual encoder with its preprocessing.

    Attributes:
        preprocess: the tensor preprocessing matching the model's reference transform.
        source: where the weights came from (for reports and errors).
    """

    preprocess: ImagePreprocess
    source: str

    def __init__(self, model: nn.Module, tokenizer: Any, preprocess: ImagePreprocess, *, source: str) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.source = source

    def image_features(self, images: Tensor) -> Tensor:
        """Unnormalised image embeddings [N, D] for images [N, 3, H, W] in [0, 1] (any device)."""
        pixels = preprocess_images(images, self.preprocess)  # [N, 3, h, w] float32, normalised
        param = next(self.parameters())
        return self._encode_pixels(pixels.to(device=param.device, dtype=param.dtype))

    @abstractmethod
    def text_features(self, prompts: list[str]) -> Tensor:
        """Unnormalised text embeddings [N, D]."""

    @abstractmethod
    def _encode_pixels(self, pixels: Tensor) -> Tensor:
        """Unnormalised image embeddings [N, D] for preprocessed pixels on the model's device/dtype."""

    @property
    @abstractmethod
    def embed_dim(self) -> int:
        """Width D of the joint embedding space."""

    @property
    @abstractmethod
    def logit_scale(self) -> Tensor:
        """The learned temperature ``log(1/tau)`` (CLIP's ``logit_scale``), a 0-d tensor."""

    @staticmethod
    def cosine(image_features: Tensor, text_features: Tensor) -> Tensor:
        """Row-wise cosine similarity [N] in float32."""
        return (F.normalize(image_features.float(), dim=-1) * F.normalize(text_features.float(), dim=-1)).sum(
            -1
        )


class OpenClipBackbone(ClipBackbone):
    """An ``open_clip`` CLIP model, its tokenizer and preprocessing."""

    def _encode_pixels(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels)

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    def text_features(self, prompts: list[str]) -> Tensor:
        tokens = self.tokenizer(prompts).to(next(self.parameters()).device)  # [N, context_length]
        return self.model.encode_text(tokens)

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.reshape(())


class HFClipBackbone(ClipBackbone):
    """A transformers ``CLIPModel``, its tokenizer and ``CLIPImageProcessor``-equivalent preprocessing."""

    def __init__(self, model: nn.Module, tokenizer: Any, preprocess: ImagePreprocess, *, source: str) -> None:
        super().__init__(model, tokenizer, preprocess, source=source)
        self.max_length = int(model.config.text_config.max_position_embeddings)

    def _encode_pixels(self, pixels: Tensor) -> Tensor:
        return _features(self.model.get_image_features(pixel_values=pixels))

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    def text_features(self, prompts: list[str]) -> Tensor:
        # As PickScore's reference: padding=True, truncation=True, max_length=77.
        enc = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        device = next(self.parameters()).device
        return _features(
            self.model.get_text_features(
                input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)
            )
        )

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.reshape(())


def _freeze(module: nn.Module, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    module.to(device=device, dtype=dtype)
    module.eval()
    module.requires_grad_(False)
    return module


def load_open_clip(
    model: str,
    *,
    pretrained: str | None = None,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_random: bool = False,
) -> OpenClipBackbone:
    """Load an open_clip model with its tokenizer and preprocessing.

    Args:
        model: built-in architecture name (``"ViT-H-14"``), ``"hf-hub:org/repo"``, or
            ``"local-dir:/folder"`` (``open_clip_config.json`` + weights in the folder).
        pretrained: open_clip pretrained tag (``"laion2B-s32B-b79K"``) or weights file, for
            built-in names only.
        checkpoint: a state dict file loaded after creation (HPSv2's ``{"state_dict": ...}``
            ``.pt`` format or ``.safetensors``), overriding whatever weights the model had.
        device, dtype: where and in what precision the model runs.
        allow_random: permit a model without any weights (benchmarks only).

    Raises:
        ValueError: no weights would be loaded and ``allow_random`` is False, or the checkpoint does
            not fit the architecture.
    """
    import open_clip

    is_schema = model.startswith(("local-dir:", "hf-hub:"))
    has_weights = bool(pretrained or checkpoint) or model.startswith("hf-hub:")
    if model.startswith("local-dir:"):
        folder = Path(model[len("local-dir:") :])
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"{folder}: no open_clip_config.json in this folder")
        has_weights = has_weights or any(
            p.suffix in (".safetensors", ".bin", ".pth", ".pt") for p in folder.iterdir()
        )
    if not (has_weights or allow_random):
        raise ValueError(
            f"open_clip model {model!r}: no weights given; pass pretrained=<tag or file>, "
            f"checkpoint=<file>, or a 'local-dir:' folder holding weights, or an 'hf-hub:' model"
        )
    try:
        net = open_clip.create_model(model, pretrained=pretrained if not is_schema else None)
    except Exception as err:  # refused unpickling (a pickle that would run code), a corrupt or missing file
        raise ValueError(
            f"open_clip model {model!r}: cannot load its weights ({type(err).__name__}: {err})"
        ) from err
    if checkpoint is not None:
        load_state_dict_strict(net, load_state_dict_file(checkpoint), source=checkpoint)
    tokenizer = open_clip.get_tokenizer(model)
    preprocess = preprocess_from_open_clip(dict(net.visual.preprocess_cfg))
    source = (
        f"open_clip:{model}"
        + (f"@{pretrained}" if pretrained else "")
        + (f"+{checkpoint}" if checkpoint else "")
    )
    return OpenClipBackbone(_freeze(net, device, dtype), tokenizer, preprocess, source=source)


def load_hf_clip(
    path: str | Path,
    *,
    processor: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> HFClipBackbone:
    """Load a transformers ``CLIPModel`` with its tokenizer and image-processor settings.

    Args:
        path: folder or hub id of the ``CLIPModel`` (``config.json`` + weights).
        processor: folder or hub id holding the tokenizer and ``preprocessor_config.json``
            when ``path`` lacks them (PickScore's reference uses
            ``"laion/CLIP-ViT-H-14-laion2B-s32B-b79K"``); defaults to ``path``.
        device, dtype: where and in what precision the model runs.

    Raises:
        ValueError: the tokenizer is empty (transformers returns a 2-token tokenizer when offline
            and the files are missing) or the image processor is not reproducible on tensors.
    """
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    try:
        net = CLIPModel.from_pretrained(str(path))
    except Exception as err:  # refused unpickling (a pickle that would run code), missing or corrupt files
        raise ValueError(
            f"{path}: cannot load a transformers CLIPModel ({type(err).__name__}: {err})"
        ) from err
    proc_src = str(processor if processor is not None else path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(proc_src)
        image_processor = CLIPImageProcessor.from_pretrained(proc_src)
    except OSError as err:
        raise ValueError(
            f"{proc_src}: no tokenizer/preprocessor_config.json found; pass processor=<folder or hub id> "
            f"that has them ({err})"
        ) from err
    if len(tokenizer) <= 2:
        raise ValueError(
            f"{proc_src}: tokenizer has {len(tokenizer)} tokens; the tokenizer files are missing"
        )
    preprocess = preprocess_from_hf_image_processor(image_processor)
    source = f"transformers:{path}" + (f" (processor {processor})" if processor is not None else "")
    return HFClipBackbone(_freeze(net, device, dtype), tokenizer, preprocess, source=source)


def _is_transformers_folder(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        return "clip" in str(json.loads(config.read_text()).get("model_type", "")).lower()
    except (OSError, json.JSONDecodeError):
        return False


def load_clip_backbone(
    model: str | Path,
    *,
    pretrained: str | None = None,
    checkpoint: str | Path | None = None,
    processor: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ClipBackbone:
    """Load a CLIP backbone from whichever published format ``model`` names.

    Resolution order: ``local-dir:``/``hf-hub:`` prefixes and folders with
    ``open_clip_config.json`` -> open_clip; folders with a CLIP ``config.json`` -> transformers;
    open_clip built-in names (``open_clip.list_models()``) -> open_clip with ``pretrained``;
    anything else is treated as a transformers hub id.
    """
    import open_clip

    text = str(model)
    if text.startswith(("local-dir:", "hf-hub:")):
        return load_open_clip(text, checkpoint=checkpoint, device=device, dtype=dtype)
    folder = Path(text)
    if folder.is_dir():
        if (folder / "open_clip_config.json").is_file():
            return load_open_clip(f"local-dir:{folder}", checkpoint=checkpoint, device=device, dtype=dtype)
        if _is_transformers_folder(folder):
            return _maybe_checkpoint(
                load_hf_clip(folder, processor=processor, device=device, dtype=dtype), checkpoint
            )
        raise ValueError(f"{folder}: neither open_clip_config.json nor a CLIP config.json in this folder")
    if text in open_clip.list_models():
        return load_open_clip(text, pretrained=pretrained, checkpoint=checkpoint, device=device, dtype=dtype)
    return _maybe_checkpoint(load_hf_clip(text, processor=processor, device=device, dtype=dtype), checkpoint)


def _maybe_checkpoint(backbone: HFClipBackbone, checkpoint: str | Path | None) -> HFClipBackbone:
    if checkpoint is not None:
        param = next(backbone.parameters())
        state = {k: v.to(param.dtype) for k, v in load_state_dict_file(checkpoint).items()}
        load_state_dict_strict(backbone.model, state, source=checkpoint)
    return backbone
