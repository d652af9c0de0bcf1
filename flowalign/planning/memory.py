"""Peak memory per GPU of a training recipe, from the real model configuration.

    peak = max(load, resident + max(step, VAE encode, text encode))

resident (alive for the whole run, divided by the strategy where it shards them):
    frozen weights       the base transformer (LoRA) in ``base_dtype``; the DPO reference of a full
                         fine-tune is a frozen copy in the compute dtype; LoRA needs no copy (adapters off)
    trainable weights    LoRA adapters in fp32, or the fp32 master weights of a full fine-tune
    gradients            fp32, one per trainable parameter
    optimizer            AdamW: two fp32 moments (8 B/param); 8-bit AdamW: two 8-bit moments (2 B/param)
    EMA                  an fp32 shadow of the trainable weights
    text encoders / VAE  only when kept on the device (bf16 encoders; the VAE in its family's dtype)
step (one forward with gradient on every sample of the micro-batch, then backward):
    activations          ``activations.transformer_activations`` (per-block formula; checkpointing
                         keeps block inputs only), plus one block's working set for the transient
                         gradients of backward (or the no-grad reference forward), plus the autocast
                         bf16 weight copies of a full fine-tune, plus the flow tensors of the loss

load (before any gradient or optimizer state exists: the model is read and the caches are built)
                         the larger of prompt caching (the text encoders, the VAE and one batch of
                         :data:`CACHE_BATCH` prompts through the largest encoder) and latent caching
                         (the VAE and one batch of :data:`CACHE_BATCH` images through it), on top of
                         the transformer's weights, unless the run loads in stages (:attr:`Recipe.staged`,
                         ``flowalign/training/placement.py``): then the transformer waits on the CPU
                         and joins the device only after the caches are built. An FSDP run always
                         stages and shards its networks on the CPU: they reach the device as one
                         shard per GPU plus one unsharded block at a time (the ``sharding`` moment).
                         A run that is not staged holds every component at once, unsharded even
                         under ZeRO-3 (each process loads the whole model before it is sharded).

Strategies: ``ddp`` replicates everything (and keeps a bucket copy of the gradients); ``zero2``
shards gradients and optimizer state; ``fsdp`` (full shard) and ``zero3`` shard weights too, and
gather two blocks at a time in the compute dtype. On ``cuda`` a fixed reserve covers the CUDA context
and cuBLAS workspace; on ``cpu`` (the measured check) there is none.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from flowalign.planning.activations import BF16, FP32, transformer_activations
from flowalign.planning.architectures import (
    TEXT_ENCODERS,
    Architecture,
    buffer_count,
    get_architecture,
    lora_param_count,
    param_count,
    vae_param_count,
)

GIB = 1024**3
CUDA_RESERVE = 1 * GIB
"""CUDA context (about 0.5 GiB on recent cards) plus cuBLAS / attention workspaces."""
BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "nf4": 0.5 + 4 / 64}
"""Bytes per weight; nf4 carries one fp32 scale per block of 64 weights."""
STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
CACHE_BATCH = 8
"""Prompts (or images) per encoder pass while a run builds its caches (the caches' default batch)."""
QUANTIZED = ("int8", "nf4")


@dataclass(frozen=True)
class Recipe:
    """What is trained, at what size, with which memory savers."""

    model: str | Architecture
    """A name from ``architectures.ARCHITECTURES`` or an :class:`Architecture` (e.g. a shrunk one)."""
    method: Literal["dpo", "sft", "fdistill"] = "dpo"
    height: int = 1024
    width: int = 1024
    frames: int = 1
    batch: int = 1
    """Per GPU and micro-step: pairs for DPO (2 samples each), samples otherwise."""
    text_tokens: int | None = None
    """Text tokens per sample (default: the pipeline's padding length)."""
    lora_rank: int | None = 16
    """None = full fine-tune."""
    lora_targets: tuple[str, ...] = LORA_TARGETS
    base_dtype: str = "bf16"
    """Frozen base of a LoRA run: bf16, fp16, fp32, int8 or nf4."""
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    gradient_checkpointing: bool = True
    text_encoders: Literal["cached", "device"] = "cached"
    drop_t5: bool = False
    """SD3 / SD3.5 without the T5 encoder (run config ``drop_t5: true``): its weights are never loaded."""
    vae: Literal["cached", "device"] = "device"
    cpu_offload: bool = False
    """``train.offload_frozen``: frozen modules (a full fine-tune's reference copy, f-distill's teacher,
    text encoders and VAE kept for the step) stay on the CPU and are streamed to the device layer by
    layer (counted as two blocks of the transformer). A LoRA base is part of the trained transformer
    and stays on the device."""
    ema: bool = False
    fake_score: Literal["full", "lora"] = "full"
    """f-distill's online score network."""
    num_gpus: int = 1
    strategy: str = "ddp"
    device: Literal["cuda", "cpu"] = "cuda"

    @property
    def arch(self) -> Architecture:
        return self.model if isinstance(self.model, Architecture) else get_architecture(self.model)

    @property
    def text_encoder_keys(self) -> tuple[str, ...]:
        """The text encoders the run loads (keys of ``TEXT_ENCODERS``): T5 left out under ``drop_t5``."""
        keys = self.arch.text_encoders
        return tuple(k for k in keys if k != "t5-xxl") if self.drop_t5 else keys

    def __post_init__(self) -> None:
        self.arch  # noqa: B018 - raises ValueError for an unknown name
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.base_dtype not in BYTES:
            raise ValueError(f"base_dtype must be one of {', '.join(BYTES)}, got {self.base_dtype!r}")
        if self.num_gpus < 1 or self.batch < 1:
            raise ValueError("num_gpus and batch must be >= 1")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1 or None, got {self.lora_rank}")
        if self.method not in ("dpo", "sft", "fdistill"):
            raise ValueError(f"method must be dpo, sft or fdistill, got {self.method!r}")
        if self.drop_t5 and self.arch.family != "sd3":
            raise ValueError(f"drop_t5 applies to SD3 / SD3.5, not to {self.arch.name} (it needs its T5)")

    @property
    def staged(self) -> bool:
        """Whether the run loads in stages (``flowalign/training/placement.py``): a DPO (or RWR), SFT or
        one-step (f-distill, DI*: ``flowalign/training/methods/onestep_cache.py``) run with cached
        prompts whose base is not quantized (bitsandbytes quantizes on the way to the GPU), launched
        with DDP (DeepSpeed prepares modules already on the device); and a DPO (RWR) or SFT run under
        FSDP, cached prompts or not, which then shards its networks on the CPU (one-step runs keep the
        one-phase load under FSDP)."""
        if self.base_dtype in QUANTIZED:
            return False
        if self.strategy == "fsdp":
            return self.method in ("dpo", "sft")
        return (
            self.method in ("dpo", "sft", "fdistill")
            and self.text_encoders == "cached"
            and self.strategy == "ddp"
        )

    def replace(self, **changes) -> Recipe:
        return dataclasses.replace(self, **changes)


@dataclass
class Plan:
    """Predicted bytes per GPU, by item; ``peak`` = the larger of the load phase and resident + the
    largest training phase."""

    recipe: Recipe
    resident: dict[str, float] = field(default_factory=dict)
    phases: dict[str, dict[str, float]] = field(default_factory=dict)
    """Training phases, each on top of ``resident``."""
    load: dict[str, float] = field(default_factory=dict)
    """The device's whole content at the worst moment of loading and cache building (not on top of
    ``resident``: no gradient or optimizer state exists yet)."""
    load_phase: str = "load"
    """Which moment ``load`` describes (e.g. ``load: prompt caching (staged)``)."""

    @property
    def training_phase(self) -> str:
        """The largest training phase."""
        return max(self.phases, key=lambda k: sum(self.phases[k].values()))

    @property
    def step_peak(self) -> float:
        """Resident plus the largest training phase: the peak once training runs."""
        return sum(self.resident.values()) + sum(self.phases[self.training_phase].values())

    @property
    def load_peak(self) -> float:
        return sum(self.load.values())

    @property
    def peak_phase(self) -> str:
        return self.load_phase if self.load_peak > self.step_peak else self.training_phase

    @property
    def peak(self) -> float:
        return max(self.step_peak, self.load_peak)

    def fits(self, gpu_gib: float) -> bool:
        return self.peak <= gpu_gib * GIB


def _shards(recipe: Recipe, item: str) -> int:
    """How many ways ``item`` ("weights", "grads", "optim") is split across the GPUs."""
    sharded = {"ddp": (), "zero2": ("grads", "optim"), "fsdp": ("weights", "grads", "optim")}
    sharded["zero3"] = sharded["fsdp"]
    return recipe.num_gpus if item in sharded[recipe.strategy] else 1


def _vae_encode_peak(arch: Architecture, recipe: Recipe, samples: int) -> float:
    """No-grad encoder peak: at the first (full-resolution) stage a ResNet block holds its input, its
    hidden state and the output being written, each ``first channels x pixels``; Wan's causal VAE encodes
    one chunk of 4 frames at a time (plus a 2-frame cache per conv)."""
    first = arch.vae["config"].get("block_out_channels", [None])[0] or arch.vae["config"]["base_dim"]
    frames = min(recipe.frames, 4 + 2) if arch.temporal_stride > 1 else 1
    return 3 * samples * first * frames * recipe.height * recipe.width * BYTES[arch.vae_dtype]


def _text_encode_peak(arch: Architecture, recipe: Recipe, samples: int) -> float:
    """No-grad encoder peak: the largest encoder's hidden state, its MLP hidden and attention output."""
    best = 0.0
    for key in recipe.text_encoder_keys:
        cfg = TEXT_ENCODERS[key]["config"]
        cfg = cfg.get("text_config", cfg)  # multimodal encoders (Qwen2.5-VL, Mistral 3, Gemma 3): the LLM
        width = cfg.get("hidden_size", cfg.get("d_model"))
        ffn = cfg.get("intermediate_size", cfg.get("d_ff"))
        if width is None or ffn is None:  # not a language model (LTX-2's text connectors)
            continue
        tokens = 77 if key.startswith("clip") else (recipe.text_tokens or arch.text_tokens)
        best = max(best, samples * tokens * (3 * width + 2 * ffn) * BF16)
    return best


def _trainable_params(recipe: Recipe) -> tuple[int, int]:
    """(trainable parameters, frozen transformer parameters kept for the forward)."""
    total = param_count(recipe.arch)
    lora = lora_param_count(recipe.arch, recipe.lora_rank, recipe.lora_targets) if recipe.lora_rank else 0
    if recipe.method == "fdistill":
        rank = recipe.lora_rank or 16  # the fake score's adapters (f-distill's default rank)
        fake = (
            lora_param_count(recipe.arch, rank, recipe.lora_targets) if recipe.fake_score == "lora" else total
        )
        return total + fake, total  # generator (full) + fake score; the teacher stays frozen
    if recipe.lora_rank is not None:
        return lora, total
    return total, total if recipe.method == "dpo" else 0  # full DPO keeps a frozen reference copy


def _separate_frozen_transformer(recipe: Recipe) -> bool:
    """Whether the frozen transformer weights are a module of their own (a full fine-tune's DPO
    reference, f-distill's teacher), which ``train.offload_frozen`` can offload; a LoRA base is not."""
    return recipe.method == "fdistill" or (recipe.lora_rank is None and recipe.method == "dpo")


def _frozen_dtype(recipe: Recipe) -> str:
    """The frozen transformer weights' dtype: the base of a LoRA run (or f-distill's teacher), else the
    bf16 reference copy of a full fine-tune."""
    return recipe.base_dtype if (recipe.lora_rank is not None or recipe.method == "fdistill") else "bf16"


def _block_count(arch: Architecture) -> int:
    """Transformer blocks of one expert (Z-Image names its count ``n_layers``)."""
    t = arch.transformer
    return t.get("num_layers", t.get("n_layers", 0)) + t.get("num_single_layers", 0)


def _resident(recipe: Recipe, arch: Architecture) -> dict[str, float]:
    trainable, frozen = _trainable_params(recipe)
    n_blocks = _block_count(arch)
    frozen_bytes = frozen * BYTES[_frozen_dtype(recipe)] / _shards(recipe, "weights")
    if recipe.cpu_offload and _separate_frozen_transformer(recipe):
        frozen_bytes = 2 * frozen * BYTES[_frozen_dtype(recipe)] / n_blocks
    optim = 8.0 if recipe.optimizer == "adamw" else 2.0
    out = {
        "frozen weights": frozen_bytes,
        "buffers (bf16 position tables)": buffer_count(arch) * BF16,
        "trainable weights (fp32)": trainable * FP32 / _shards(recipe, "weights"),
        "gradients (fp32)": trainable * FP32 / _shards(recipe, "grads"),
        f"optimizer ({recipe.optimizer})": trainable * optim / _shards(recipe, "optim"),
    }
    if recipe.ema:
        out["EMA (fp32)"] = trainable * FP32 / _shards(recipe, "weights")
    if recipe.strategy == "ddp" and recipe.num_gpus > 1:
        out["DDP gradient buckets"] = trainable * FP32
    if recipe.text_encoders == "device" and not recipe.cpu_offload:  # offloaded: streamed per layer
        out["text encoders (bf16)"] = sum(param_count(k) for k in recipe.text_encoder_keys) * BF16
    if recipe.vae == "device" and not recipe.cpu_offload:
        out[f"VAE ({arch.vae_dtype})"] = vae_param_count(arch) * BYTES[arch.vae_dtype]
    if recipe.device == "cuda":
        out["CUDA context reserve"] = CUDA_RESERVE
    return out


def _step(recipe: Recipe, arch: Architecture, samples: int) -> dict[str, float]:
    img = arch.image_tokens(recipe.height, recipe.width, recipe.frames)
    txt = recipe.text_tokens or arch.text_tokens
    trainable, _ = _trainable_params(recipe)
    full = recipe.lora_rank is None or recipe.method == "fdistill"
    acts = transformer_activations(
        arch, img, txt, samples, lora_rank=None if full else recipe.lora_rank,
        checkpointing=recipe.gradient_checkpointing,
    )  # fmt: skip
    step = {
        "activations": float(acts.saved),
        "backward working set (one block)": float(acts.working),
    }
    if recipe.method == "fdistill":
        # the generator's loss also differentiates through the frozen teacher up to its middle block
        n_blocks = _block_count(arch)
        teacher = transformer_activations(
            arch, img, txt, samples, lora_rank=0, checkpointing=recipe.gradient_checkpointing,
            depth=n_blocks // 2,
        )  # fmt: skip
        step["teacher activations (to the feature block)"] = float(teacher.saved)
    if full and recipe.strategy in ("ddp", "zero2"):
        step["autocast bf16 weight copies"] = param_count(recipe.arch) * BF16
    if recipe.strategy in ("fsdp", "zero3") and recipe.num_gpus > 1:
        n_blocks = _block_count(arch)
        step["gathered blocks (2, bf16)"] = 2 * param_count(recipe.arch) * BF16 / n_blocks
    latent = samples * 1.0
    for size in arch.latent_shape(recipe.height, recipe.width, recipe.frames):
        latent *= size
    step["flow tensors (x0, noise, x_t, targets, outputs)"] = 6 * latent * FP32
    return step


def _load(recipe: Recipe, arch: Architecture) -> tuple[str, dict[str, float]]:
    """The worst moment of loading and cache building, and the device's content then (see the module
    docstring): prompt caching or latent caching, with or without the transformer."""
    base: dict[str, float] = {}
    if not recipe.staged:  # every process holds the whole transformer, sharded or not
        trainable, frozen = _trainable_params(recipe)
        base["frozen weights"] = frozen * BYTES[_frozen_dtype(recipe)]
        base["buffers (bf16 position tables)"] = buffer_count(arch) * BF16
        base["trainable weights (fp32)"] = trainable * FP32
    encoders = {"text encoders (bf16)": sum(param_count(k) for k in recipe.text_encoder_keys) * BF16}
    vae = {f"VAE ({arch.vae_dtype})": vae_param_count(arch) * BYTES[arch.vae_dtype]}
    reserve = {"CUDA context reserve": CUDA_RESERVE} if recipe.device == "cuda" else {}
    prompts = base | encoders | vae | reserve
    if recipe.text_encoders == "cached":
        prompts["text encode (cache batch)"] = _text_encode_peak(arch, recipe, CACHE_BATCH)
    moments = {"prompt caching": prompts}
    if recipe.vae == "cached":  # after the prompt cache: the encoders left when it was built
        latents = base | (encoders if recipe.text_encoders == "device" else {}) | vae | reserve
        latents["VAE encode (cache batch)"] = _vae_encode_peak(arch, recipe, CACHE_BATCH)
        moments["latent caching"] = latents
    if recipe.staged and recipe.strategy == "fsdp":
        moments["sharding"] = _sharding(recipe, arch) | reserve
    worst = max(moments, key=lambda k: sum(moments[k].values()))
    how = "staged" if recipe.staged else "every component on the device"
    if recipe.staged and recipe.strategy == "fsdp":
        how = "staged, sharded on the CPU"
    return f"load: {worst}, {how}", moments[worst]


def _sharding(recipe: Recipe, arch: Architecture) -> dict[str, float]:
    """The device while FSDP shards a staged run's networks from the CPU (``fully_shard`` moves one
    unit at a time and keeps this GPU's shard): the shards so far, one whole block (fp32 master
    weights of a full fine-tune, else the frozen dtype), and the encoders / VAE the step keeps."""
    trainable, frozen = _trainable_params(recipe)
    n = recipe.num_gpus
    out = {
        "frozen weights (shard)": frozen * BYTES[_frozen_dtype(recipe)] / n,
        "buffers (bf16 position tables)": buffer_count(arch) * BF16,
        "trainable weights (fp32, shard)": trainable * FP32 / n,
    }
    block_bytes = FP32 if recipe.lora_rank is None else BYTES[_frozen_dtype(recipe)]
    out["one unsharded block"] = param_count(arch) * block_bytes / max(_block_count(arch), 1)
    if recipe.text_encoders == "device":
        out["text encoders (bf16)"] = sum(param_count(k) for k in recipe.text_encoder_keys) * BF16
    if recipe.vae == "device":
        out[f"VAE ({arch.vae_dtype})"] = vae_param_count(arch) * BYTES[arch.vae_dtype]
    return out


def plan(recipe: Recipe) -> Plan:
    """Predict the peak memory per GPU of ``recipe``."""
    arch = recipe.arch
    samples = 2 * recipe.batch if recipe.method == "dpo" else recipe.batch
    result = Plan(recipe, resident=_resident(recipe, arch))
    result.load_phase, result.load = _load(recipe, arch)
    result.phases["training step"] = _step(recipe, arch, samples)
    if recipe.vae == "device":
        result.phases["VAE encode"] = {"VAE encode": _vae_encode_peak(arch, recipe, samples)}
    if recipe.text_encoders == "device":
        result.phases["text encode"] = {"text encode": _text_encode_peak(arch, recipe, samples)}
    return result


SWITCHES: tuple[tuple[str, dict], ...] = (
    ("gradient checkpointing", {"gradient_checkpointing": True}),
    ("cached text embeddings (encoders off the GPU)", {"text_encoders": "cached"}),
    ("cached VAE latents", {"vae": "cached"}),
    ("8-bit AdamW", {"optimizer": "adamw8bit"}),
    ("LoRA fake score (f-distill)", {"fake_score": "lora"}),
    ("LoRA rank 8", {"lora_rank": 8}),
    ("8-bit frozen base (run config quantize_base: int8)", {"base_dtype": "int8"}),
    ("4-bit frozen base (run config quantize_base: nf4)", {"base_dtype": "nf4"}),
    ("CPU offload of frozen modules (train.offload_frozen: true)", {"cpu_offload": True}),
)


def _applies(recipe: Recipe, changes: dict) -> bool:
    if "cpu_offload" in changes:  # what train.offload_frozen offloads; sharded launches refuse it
        offloadable = _separate_frozen_transformer(recipe) or "device" in (recipe.text_encoders, recipe.vae)
        if recipe.strategy != "ddp" or not offloadable:
            return False
    if "fake_score" in changes and recipe.method != "fdistill":
        return False
    if "lora_rank" in changes or "base_dtype" in changes:
        if recipe.lora_rank is None:
            return False
        if "lora_rank" in changes and recipe.lora_rank <= changes["lora_rank"]:
            return False
        if changes.get("base_dtype") == "int8" and recipe.base_dtype in ("int8", "nf4"):
            return False
    return any(getattr(recipe, k) != v for k, v in changes.items())


def suggest(recipe: Recipe, gpu_gib: float) -> tuple[list[str], Plan]:
    """Switches of :data:`SWITCHES` that make ``recipe`` fit ``gpu_gib``.

    They are tried in the order of :data:`SWITCHES` (those that cost the least speed first), each kept if
    it lowers the peak, until the recipe fits; then every kept switch the fit does not need is dropped.
    Returns the switches and the final plan, which may still not fit (then the recipe needs sharding
    over more GPUs, or a smaller size).
    """
    chosen: dict[str, dict] = {}
    current = plan(recipe)
    for name, changes in SWITCHES:
        if current.fits(gpu_gib):
            break
        if _applies(current.recipe, changes):
            candidate = plan(current.recipe.replace(**changes))
            if candidate.peak < current.peak:
                chosen[name], current = changes, candidate
    if current.fits(gpu_gib):
        for name in list(chosen):
            rest = [c for n, c in chosen.items() if n != name]
            trial = plan(recipe.replace(**{k: v for c in rest for k, v in c.items()}))
            if trial.fits(gpu_gib):
                del chosen[name]
                current = trial
    return list(chosen), current
