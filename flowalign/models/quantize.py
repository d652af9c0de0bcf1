"""A frozen transformer base quantized by bitsandbytes, for LoRA runs that must fit a smaller GPU.

``int8`` stores every Linear weight of the transformer as int8 with one scale per output row
(LLM.int8: ``W ~= s_row * W_int8``, activations multiplied in 8 bits with the outlier columns kept
in 16 bits); ``nf4`` stores it as 4-bit NormalFloat codes with one absmax scale per block of 64
weights (``W ~= absmax_block * q_nf4``) and dequantizes to the compute dtype for each matmul. The
LoRA adapters on top stay fp32 (peft wraps bitsandbytes' Linear layers), so the trained update
``(alpha / r) B A x`` is exact; only the frozen base is rounded. With adapters disabled the network
is the quantized base itself, which is then the DPO reference.

diffusers' bitsandbytes loader quantizes on a CUDA GPU only; on any other device the run stops
with one error before anything is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

QuantizeBase = Literal["int8", "nf4"]
QUANTIZE_BASE_CHOICES: tuple[str, ...] = ("int8", "nf4")
EXTRA_HINT = "pip install 'flowalign[bitsandbytes]'"


def check_quantize_base(kind: str | None, *, lora: object | None) -> None:
    """Refuse ``quantize_base`` where it cannot apply: an unknown kind, a full fine-tune (no LoRA:
    the transformer's own weights are trained, so they cannot be frozen integers), or a merged
    export (merging into rounded weights would ship the rounding; the LoRA file is written alone)."""
    if kind is None:
        return
    if kind not in QUANTIZE_BASE_CHOICES:
        raise ValueError(f"quantize_base must be null, 'int8' or 'nf4', got {kind!r}")
    if lora is None:
        raise ValueError(
            f"quantize_base={kind} needs a LoRA run: a full fine-tune (lora: null) trains the "
            "transformer's own weights, which cannot be quantized"
        )
    if getattr(lora, "export_merged", False):
        raise ValueError(
            f"quantize_base={kind} needs lora.export_merged=false: merging the adapters into a quantized "
            "base would round them; the run writes the LoRA file, to be applied to the full-precision base"
        )


def bnb_quantization_config(kind: str, compute_dtype: torch.dtype):
    """diffusers' ``BitsAndBytesConfig`` for ``kind`` (``int8`` or ``nf4``; nf4 computes in ``compute_dtype``).

    Raises:
        ValueError: bitsandbytes is not installed (names the extra) or cannot load here.
    """
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"quantize_base={kind} needs bitsandbytes: {EXTRA_HINT}") from exc
    except Exception as exc:  # a broken native library fails at import with various errors
        raise ValueError(f"quantize_base={kind}: bitsandbytes cannot load here ({exc})") from exc
    from diffusers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
    )


def load_quantized_transformer(
    path_or_id: str | Path, kind: str, *, compute_dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """The ``transformer`` component of a saved model, its Linear weights quantized to ``kind`` on
    ``device`` (a CUDA GPU); every other weight (norms, embeddings) in ``compute_dtype``.

    Raises:
        ValueError: bitsandbytes is missing, ``device`` is not a CUDA GPU, or the model has no
            diffusers transformer component.
    """
    import diffusers

    from flowalign.models.base import _DTYPE_KWARG, ModelLoadError, read_model_index

    config = bnb_quantization_config(kind, compute_dtype)
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(
            f"quantize_base={kind} needs a CUDA GPU with bitsandbytes; this run's device is {device} "
            "(set quantize_base: null to train the base in the compute dtype)"
        )
    library, class_name = (read_model_index(path_or_id).get("transformer") or [None, None])[:2]
    transformer_class = getattr(diffusers, str(class_name), None) if library == "diffusers" else None
    if transformer_class is None:
        raise ModelLoadError(
            f"quantize_base={kind}: {path_or_id} has no diffusers transformer component "
            f"(model_index.json names {library!r}, {class_name!r})"
        )
    index = 0 if device.index is None else device.index
    try:
        return transformer_class.from_pretrained(
            str(path_or_id),
            subfolder="transformer",
            quantization_config=config,
            **{_DTYPE_KWARG: compute_dtype},
            device_map={"": index},
        )
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ModelLoadError(
            f"quantize_base={kind}: cannot load the transformer of {path_or_id}: {err}"
        ) from err


def is_quantized_weight(param: torch.Tensor) -> bool:
    """Whether ``param`` is a bitsandbytes-quantized weight (int8 rows or packed 4-bit codes)."""
    return type(param).__name__ in ("Int8Params", "Params4bit") or param.dtype in (torch.int8, torch.uint8)
