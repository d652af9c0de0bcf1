"""Speed switches: regional ``torch.compile`` of transformer blocks and the attention backend.

``train.compile`` compiles each repeated block of a trainable module on its own instead of the
whole model ("regional" compilation): the blocks share one compiled graph, so compile time is
that of one block, and the code between the blocks (embeddings, LoRA toggles of the reference
pass, the method's loss) stays eager. A diffusers model that declares its blocks
(``_repeated_blocks``: FLUX, Wan) goes through its own ``compile_repeated_blocks``; any other
module (SD3, whose class declares none, the package's own heads) has every element of its
``nn.ModuleList`` block containers compiled. The compiled forward computes the same function;
only the order of floating-point operations inside fused kernels may differ.

``train.attention_backend`` (and ``generate --attention-backend``) picks the attention kernel:

- ``sdpa`` (default): torch's ``scaled_dot_product_attention``, which chooses its own kernel;
- a name of diffusers' attention dispatcher (``flash``, ``flash_varlen``, ``_flash_3``, ``sage``,
  ``flex``, ``xformers``, ``_native_flash``, ``_native_efficient``, ``_native_cudnn``,
  ``_native_math``, the ``*_hub`` kernels, ...), for models whose attention goes through the
  dispatcher (FLUX, Wan). The dispatcher's choice is process-wide in diffusers, so every model of
  the process follows it;
- ``xformers`` also for SD3, whose joint attention has its own xformers processor.

An unknown name, a backend whose package is missing, or one the model's attention cannot use is
refused with one ``ValueError`` naming the setting and the choices.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from torch import nn

__all__ = [
    "DEFAULT_ATTENTION",
    "apply_speed_switches",
    "attention_backend_choices",
    "check_attention_backend",
    "compile_blocks",
    "set_attention_backend",
]

logger = logging.getLogger(__name__)

DEFAULT_ATTENTION = "sdpa"


def attention_backend_choices() -> list[str]:
    """Every accepted ``attention_backend`` name: ``sdpa`` and diffusers' dispatcher backends."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return [DEFAULT_ATTENTION] + sorted(b.value for b in AttentionBackendName)


def check_attention_backend(name: str, *, key: str = "train.attention_backend") -> str:
    """``name`` lower-cased if it is a known backend whose package is installed, else one ValueError."""
    choices = attention_backend_choices()
    backend = str(name).strip().lower()
    if backend not in choices:
        raise ValueError(f"{key}: unknown attention backend {name!r}; choose one of {', '.join(choices)}")
    if backend == DEFAULT_ATTENTION:
        return backend
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _check_attention_backend_requirements,
    )

    try:  # diffusers' own availability check (installed package and version)
        _check_attention_backend_requirements(AttentionBackendName(backend))
    except (RuntimeError, ImportError) as err:
        hint = " (the 'xformers' extra installs it)" if backend == "xformers" else ""
        raise ValueError(f"{key}: attention backend {backend!r} is not available here: {err}{hint}") from None
    return backend


def _attention_modules(module: nn.Module) -> list[nn.Module]:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return [m for m in module.modules() if isinstance(m, Attention | AttentionModuleMixin)]


def set_attention_backend(module: nn.Module, name: str, *, key: str = "train.attention_backend") -> int:
    """Switch every attention layer of ``module`` to backend ``name``; returns how many were switched.

    ``sdpa`` leaves (or puts back) torch's SDPA. Raises ValueError (naming ``key``) for an unknown or
    missing backend, or one that the module's attention does not route through.
    """
    backend = check_attention_backend(name, key=key)
    layers = _attention_modules(module)
    dispatched = [m for m in layers if hasattr(getattr(m, "processor", None), "_attention_backend")]
    kind = type(module).__name__
    if dispatched:  # sdpa is the dispatcher's "native" backend (set, since the choice is process-wide)
        quiet = logging.getLogger("diffusers.models.modeling_utils")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # diffusers warns on every call that the API is experimental
        try:
            module.set_attention_backend("native" if backend == DEFAULT_ATTENTION else backend)
        finally:
            quiet.setLevel(level)
        return len(dispatched)
    if backend in (
        DEFAULT_ATTENTION,
        "native",
    ):  # other attention runs torch's SDPA unless switched to xformers
        return len(layers)
    if backend == "xformers" and layers:  # attention outside the dispatcher (SD3's joint attention)
        try:
            for layer in layers:
                layer.set_use_memory_efficient_attention_xformers(True)
        except (ValueError, ModuleNotFoundError) as err:  # e.g. no CUDA device: diffusers refuses
            raise ValueError(f"{key}: xformers cannot run {kind}'s attention here: {err}") from None
        return len(layers)
    offered = "sdpa, xformers" if layers else "sdpa"
    raise ValueError(
        f"{key}: {kind}'s attention does not go through diffusers' attention dispatcher, so backend "
        f"{backend!r} does not apply to it; choose one of {offered}"
    )


def _block_lists(module: nn.Module) -> list[nn.ModuleList]:
    """The ``nn.ModuleList`` containers below ``module`` (not searched inside them)."""
    found = []
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            found.append(child)
        else:
            found.extend(_block_lists(child))
    return found


def compile_blocks(module: nn.Module, name: str, *, backend: str = "inductor") -> int:
    """Regional ``torch.compile``: compile each repeated block of ``module`` in place; returns how
    many blocks were compiled. Parameter names and state dicts do not change.

    Raises:
        ValueError: the module has no repeated blocks to compile (names the module).
    """
    blocks = getattr(module, "_repeated_blocks", None)
    if blocks and callable(getattr(module, "compile_repeated_blocks", None)):
        module.compile_repeated_blocks(backend=backend)
        return sum(type(m).__name__ in blocks for m in module.modules())
    count = 0
    for container in _block_lists(module):
        for block in container:
            block.compile(backend=backend)
            count += 1
    if count == 0:
        raise ValueError(
            f"train.compile: module {name!r} ({type(module).__name__}) has no repeated blocks "
            "(no _repeated_blocks and no ModuleList of blocks) to compile"
        )
    return count


def _dispatched(module: nn.Module) -> bool:
    return any(
        hasattr(getattr(m, "processor", None), "_attention_backend") for m in _attention_modules(module)
    )


def apply_speed_switches(
    trainable: Mapping[str, nn.Module], frozen: Iterable[nn.Module], *, compile: bool, compile_backend: str,
    attention_backend: str,
) -> None:  # fmt: skip
    """The run's speed settings on its modules: the attention backend on every trainable module with
    attention layers (refused where it does not apply) and on the frozen ones whose attention goes
    through the dispatcher (a reference copy; a VAE's plain attention keeps SDPA), then regional
    compilation of the trainable modules."""
    backend = check_attention_backend(attention_backend)
    for module in trainable.values():  # sdpa too: the dispatcher's choice outlives a previous run
        if backend != DEFAULT_ATTENTION and _attention_modules(module) or _dispatched(module):
            set_attention_backend(module, backend)
    for module in frozen:
        if _dispatched(module):
            set_attention_backend(module, backend)
    if compile:
        for name, module in trainable.items():
            count = compile_blocks(module, name, backend=compile_backend)
            logger.info("train.compile: %d blocks of %s compiled (%s)", count, name, compile_backend)
