"""Image preprocessing for reward backbones, on tensors, batched, on the media's device.

The reference scorers preprocess one PIL image at a time (open_clip's ``preprocess`` transform,
transformers' ``CLIPImageProcessor``, HPSv2's ``ResizeMaxSize``). :func:`preprocess_images` does
the same steps on a float ``[B, 3, H, W]`` batch in ``[0, 1]`` so no image leaves the device:

1. resize (bicubic or bilinear, antialiased like PIL: ``torch.nn.functional.interpolate(...,
   antialias=True)`` uses PIL's kernel, a = -0.5, widened by the downscale factor);
2. center crop (``"shortest"``) or pad to a square (``"longest_pad"``);
3. normalise: ``(x - mean) / std`` per channel.

Remaining difference from the PIL/uint8 references (``tests/rewards/test_preprocess.py``): they
round the resized image to uint8 after each of PIL's two resampling passes, we stay in float. On
the test images the largest difference is 0.0158 in normalised units (about 1.1 uint8 levels) and
the mean 0.004, for open_clip's transform and both transformers ``CLIPImageProcessor`` backends;
HPSv2's float-tensor transform is matched to 1e-5. The steps are differentiable, so reward
guidance can backpropagate through them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ImagePreprocess",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "preprocess_images",
    "preprocess_from_open_clip",
    "preprocess_from_hf_image_processor",
    "resized_shortest_side",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ResizeMode = Literal["shortest", "longest_pad", "squash"]


@dataclass(frozen=True)
class ImagePreprocess:
    """How a backbone wants its pixels.

    Attributes:
        resize_size: ``"shortest"``: target of the shortest side; ``"longest_pad"``: target of the
            longest side (and of the padded square); ``"squash"``: unused (the crop size is used).
        crop_size: final ``(height, width)`` fed to the backbone.
        mean: per-channel mean subtracted after resizing (in [0, 1] units).
        std: per-channel std divided after subtracting the mean.
        resize_mode: ``"shortest"`` = resize the shortest side then center crop (open_clip,
            transformers CLIP); ``"longest_pad"`` = resize the longest side then pad to a square
            (HPSv2's ``ResizeMaxSize``); ``"squash"`` = resize straight to ``crop_size``.
        interpolation: ``"bicubic"`` or ``"bilinear"``.
        antialias: low-pass when downscaling, as PIL does (True for every reference here).
        crop_rounding: where the crop starts when the margin is odd: ``"round"`` =
            ``int(round(margin / 2))`` (torchvision ``CenterCrop``, used by open_clip);
            ``"floor"`` = ``margin // 2`` (transformers' image processors).
        clamp: emulate a uint8 resize as PIL does it: resample the width first, clip to [0, 1],
            then the height, clip again (PIL's two passes each store uint8). Without the clip
            between passes, bicubic overshoot on sharp edges leaves errors of up to ~20/255.
            False for references that resize float tensors in one 2-D pass (HPSv2).
        fill: pad value in [0, 1] units, before normalisation (``"longest_pad"`` only).
    """

    resize_size: int
    crop_size: tuple[int, int]
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resize_mode: ResizeMode = "shortest"
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    antialias: bool = True
    crop_rounding: Literal["round", "floor"] = "round"
    clamp: bool = True
    fill: float = 0.0

    def __post_init__(self) -> None:
        if self.resize_mode not in ("shortest", "longest_pad", "squash"):
            raise ValueError(
                f"ImagePreprocess.resize_mode: expected 'shortest', 'longest_pad' or 'squash', "
                f"got {self.resize_mode!r}"
            )
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(
                f"ImagePreprocess.interpolation: expected 'bicubic' or 'bilinear', got {self.interpolation!r}"
            )
        if self.crop_rounding not in ("round", "floor"):
            raise ValueError(
                f"ImagePreprocess.crop_rounding: expected 'round' or 'floor', got {self.crop_rounding!r}"
            )
        if len(self.crop_size) != 2 or min(self.crop_size) < 1 or self.resize_size < 1:
            raise ValueError(
                f"ImagePreprocess: resize_size and crop_size must be positive, got resize_size="
                f"{self.resize_size}, crop_size={self.crop_size}"
            )
        if self.resize_mode == "shortest" and min(self.crop_size) > self.resize_size:
            raise ValueError(
                f"ImagePreprocess: crop_size {self.crop_size} is larger than the resized shortest side "
                f"{self.resize_size}; the crop would need padding, which no supported reference does"
            )
        if self.resize_mode == "longest_pad" and tuple(self.crop_size) != (
            self.resize_size,
            self.resize_size,
        ):
            raise ValueError(
                f"ImagePreprocess: 'longest_pad' pads to a square of resize_size={self.resize_size}, "
                f"so crop_size must be ({self.resize_size}, {self.resize_size}), got {self.crop_size}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(
                f"ImagePreprocess: mean and std need 3 values and std > 0, got mean={self.mean}, std={self.std}"
            )


def resized_shortest_side(height: int, width: int, size: int) -> tuple[int, int]:
    """Output size when the shortest side becomes ``size`` (torchvision and transformers rule).

    The long side is ``int(size * long / short)`` (truncated, not rounded), as in torchvision's
    ``Resize(int)`` and transformers' ``get_resize_output_image_size(default_to_square=False)``.
    """
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def _interpolate(images: Tensor, size: tuple[int, int], spec: ImagePreprocess) -> Tensor:
    return F.interpolate(
        images, size=size, mode=spec.interpolation, align_corners=False, antialias=spec.antialias
    )


def _resize(images: Tensor, size: tuple[int, int], spec: ImagePreprocess) -> Tensor:
    height, width = images.shape[-2:]
    if (height, width) == tuple(size):
        return images  # the references return the image untouched at the target size
    if not spec.clamp:
        return _interpolate(images, size, spec)  # one 2-D pass on floats, like torchvision on tensors
    out = images
    if width != size[1]:
        out = _interpolate(out, (height, size[1]), spec).clamp(0.0, 1.0)  # [B, 3, H, w']: PIL's first pass
    if height != size[0]:
        out = _interpolate(out, size, spec).clamp(0.0, 1.0)  # [B, 3, h', w']
    return out


def _crop_offset(margin: int, rounding: str) -> int:
    return int(round(margin / 2.0)) if rounding == "round" else margin // 2


def preprocess_images(images: Tensor, spec: ImagePreprocess) -> Tensor:
    """Resize, crop or pad, and normalise a batch of images for a backbone.

    Args:
        images: float tensor [B, 3, H, W] with values in [0, 1], on any device.
        spec: the backbone's preprocessing (see :class:`ImagePreprocess`).

    Returns:
        Float32 tensor [B, 3, crop_h, crop_w] on the images' device, normalised with the spec's
        mean/std. Differentiable with respect to ``images``.
    """
    assert images.ndim == 4 and images.shape[1] == 3, f"expected [B, 3, H, W], got {tuple(images.shape)}"
    x = images.float()
    height, width = x.shape[-2:]
    crop_h, crop_w = spec.crop_size
    if spec.resize_mode == "shortest":
        x = _resize(x, resized_shortest_side(height, width, spec.resize_size), spec)
        rh, rw = x.shape[-2:]
        top = _crop_offset(rh - crop_h, spec.crop_rounding)
        left = _crop_offset(rw - crop_w, spec.crop_rounding)
        x = x[..., top : top + crop_h, left : left + crop_w]  # [B, 3, crop_h, crop_w]
    elif spec.resize_mode == "longest_pad":
        side = spec.resize_size
        scale = side / float(max(height, width))
        # Python's round() (half to even) as in HPSv2's ResizeMaxSize.
        new_h, new_w = round(height * scale), round(width * scale)
        x = _resize(x, (new_h, new_w), spec)
        pad_h, pad_w = side - new_h, side - new_w
        # [left, right, top, bottom]; the odd pixel goes right/bottom like torchvision's F.pad call.
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=spec.fill)
    else:
        x = _resize(x, (crop_h, crop_w), spec)
    mean = torch.tensor(spec.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def _as_hw(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    if len(size) == 1:
        return size[0], size[0]
    return size[0], size[1]


def preprocess_from_open_clip(preprocess_cfg: dict[str, Any]) -> ImagePreprocess:
    """Build the spec that matches open_clip's inference transform for a model.

    Args:
        preprocess_cfg: ``model.visual.preprocess_cfg`` of an open_clip model (keys ``size``,
            ``mean``, ``std``, ``interpolation``, ``resize_mode``, ``fill_color``).

    Returns:
        The equivalent spec. open_clip's ``"shortest"`` mode is ``Resize(size)`` +
        ``CenterCrop(size)`` on a PIL image (torchvision rounding, uint8 clamp).

    Raises:
        ValueError: for open_clip's ``"longest"`` mode (resize + ``CenterCropOrPad``), which no
            supported scorer uses, or a non-square ``"shortest"`` size.
    """
    height, width = _as_hw(preprocess_cfg.get("size", 224))
    mode = preprocess_cfg.get("resize_mode", "shortest") or "shortest"
    interpolation = preprocess_cfg.get("interpolation", "bicubic") or "bicubic"
    if interpolation == "random":  # open_clip maps 'random' to bicubic at inference
        interpolation = "bicubic"
    mean = tuple(preprocess_cfg.get("mean") or OPENAI_CLIP_MEAN)
    std = tuple(preprocess_cfg.get("std") or OPENAI_CLIP_STD)
    if len(mean) == 1:
        mean = mean * 3
    if len(std) == 1:
        std = std * 3
    if mode == "shortest":
        if height != width:
            raise ValueError(
                f"open_clip preprocess_cfg: non-square size {(height, width)} with resize_mode 'shortest' "
                f"is not supported"
            )
        return ImagePreprocess(
            resize_size=height,
            crop_size=(height, width),
            mean=mean,
            std=std,
            resize_mode="shortest",
            interpolation=interpolation,
            crop_rounding="round",
            clamp=True,
        )
    if mode == "squash":
        return ImagePreprocess(
            resize_size=height,
            crop_size=(height, width),
            mean=mean,
            std=std,
            resize_mode="squash",
            interpolation=interpolation,
            clamp=True,
        )
    raise ValueError(
        f"open_clip preprocess_cfg: resize_mode {mode!r} is not supported (expected 'shortest' or 'squash')"
    )


_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values


def preprocess_from_hf_image_processor(processor: Any) -> ImagePreprocess:
    """Build the spec matching a transformers ``CLIPImageProcessor`` (or its config dict).

    Args:
        processor: a transformers image processor, or the dict from ``preprocessor_config.json``.

    Returns:
        The equivalent spec (shortest-edge resize, ``floor`` center crop, clamp like uint8).

    Raises:
        ValueError: naming the config key when the processor does something this path does not
            reproduce (no resize, no center crop, no normalisation, or another resample filter).
    """
    get = processor.get if isinstance(processor, dict) else (lambda k, d=None: getattr(processor, k, d))
    size = get("size") or {}
    if hasattr(size, "items") and not isinstance(size, dict):
        size = {k: v for k, v in size.items() if v is not None}
    if isinstance(size, int):
        size = {"shortest_edge": size}
    crop = get("crop_size") or {}
    if hasattr(crop, "items") and not isinstance(crop, dict):
        crop = {k: v for k, v in crop.items() if v is not None}
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    for key, default in (("do_resize", True), ("do_normalize", True), ("do_rescale", True)):
        if not get(key, default):
            raise ValueError(f"image processor: {key}=False is not supported (expected True)")
    resample = get("resample", 3)
    resample = int(getattr(resample, "value", resample))
    if resample not in _PIL_RESAMPLE:
        raise ValueError(f"image processor: resample={resample} is not supported (expected 2 or 3)")
    mean = tuple(float(v) for v in (get("image_mean") or OPENAI_CLIP_MEAN))
    std = tuple(float(v) for v in (get("image_std") or OPENAI_CLIP_STD))
    rescale = float(get("rescale_factor", 1 / 255))
    if abs(rescale - 1 / 255) > 1e-9:
        raise ValueError(f"image processor: rescale_factor={rescale} is not supported (expected 1/255)")
    if size.get("shortest_edge"):
        if not get("do_center_crop", True) or not crop.get("height"):
            raise ValueError(
                "image processor: 'shortest_edge' resize needs do_center_crop=True and crop_size "
                "{'height', 'width'} so a batch has one shape"
            )
        return ImagePreprocess(
            resize_size=int(size["shortest_edge"]),
            crop_size=(int(crop["height"]), int(crop["width"])),
            mean=mean,
            std=std,
            resize_mode="shortest",
            interpolation=_PIL_RESAMPLE[resample],
            crop_rounding="floor",
            clamp=True,
        )
    if size.get("height") and size.get("width"):
        if get("do_center_crop", False) and crop.get("height"):
            if (int(crop["height"]), int(crop["width"])) != (int(size["height"]), int(size["width"])):
                raise ValueError(
                    f"image processor: crop_size {crop} after a fixed resize {size} is not supported"
                )
        return ImagePreprocess(
            resize_size=int(size["height"]),
            crop_size=(int(size["height"]), int(size["width"])),
            mean=mean,
            std=std,
            resize_mode="squash",
            interpolation=_PIL_RESAMPLE[resample],
            clamp=True,
        )
    raise ValueError(
        f"image processor: size={size} is not supported (expected shortest_edge or height/width)"
    )
