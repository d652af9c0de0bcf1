"""Shared machinery of the one-step distillation methods (f-distill, Diff-Instruct*).

Both methods train a one-step generator G against a frozen flow teacher with an online "fake" score
network that tracks the generator's own distribution, alternating two parameter groups:

    "generator"  every K-th step (K = ``generator_every``): the method's generator loss;
    "critic"     the other steps: the fake-score denoising loss on fresh, detached generator samples
                 (+ the discriminator's GAN loss for f-distill).

Conventions (``flowalign.flow``, docs/algorithms.md 0.1): x_t = (1 - t) x0 + t noise, t = 1 is noise,
v = noise - x0. The generator is the teacher's transformer, copied and fine-tuned, called once at
t = 1 on pure noise z:  x0 = z - v_G(z, 1, c)  (the same formula as ``FlowPipeline(one_step=True)``).
The fake score is a full copy of the teacher (``fake_score="full"``) or LoRA adapters on the teacher
itself (``"lora"``: the teacher is then the same network with adapters disabled, one copy in memory).

Networks not being optimised in a group are called unwrapped with their parameters frozen
(:func:`frozen`), so gradients reach the sample but no parameter of another group, and DDP sees
each wrapped module only in its own group's steps.

The training data and its config block are in ``onestep_data``; the f-distill discriminator's teacher
features and heads in ``onestep_heads``.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from flowalign import flow
from flowalign.config import ConfigError, LoraConfig, OptimConfig
from flowalign.data.batches import MediaBatch, PromptBatch
from flowalign.models.base import FlowModel, PromptEmbeds
from flowalign.objectives.fdistill import fake_score_loss
from flowalign.training.method import Method, StepContext
from flowalign.training.methods.onestep_teachers import refuse_two_experts

__all__ = [
    "TEACHER_DTYPES",
    "OneStepConfig",
    "OneStepDistillation",
    "dist_sum",
    "frozen",
    "generate_x0",
    "load_generator_weights",
    "load_teacher",
    "seeded",
]

GENERATOR_TIME = 1.0  # the generator reads pure noise at t = 1, as FlowPipeline(one_step=True) does
GENERATOR, CRITIC = "generator", "critic"


@dataclass(kw_only=True)
class OneStepConfig:
    """Settings shared by the one-step distillation methods (nested in their own configs)."""

    guidance_scale: float = 1.0
    """Teacher classifier-free guidance omega (f-distill SD1.5: 1.75; DI*: 7.5; the toy teacher: 3)."""
    generator_every: int = 5
    """K: the generator is updated on steps with step % K == 0, the critic on the others (f-distill: 5-10)."""
    t_min: float = 0.02
    t_max: float = 0.98
    """Distillation and critic times in [t_min, t_max] (away from 0 and 1, where the conversions blow up)."""
    t_power: float = 1.0
    """t = t_min + (t_max - t_min) u^p, u ~ U[0, 1]: p = 1 is uniform, p > 1 favours low noise (fine detail)."""
    fake_score: Literal["full", "lora"] = "full"
    """Online score network: a full trainable copy of the teacher, or LoRA adapters on the teacher itself."""
    fake_score_lora: LoraConfig = field(default_factory=lambda: LoraConfig(rank=16, alpha=16.0))
    """Adapters for ``fake_score: lora``."""
    generator_optim: OptimConfig | None = None
    """Optimizer of the generator group (None: the run's ``train.optim``)."""
    critic_optim: OptimConfig | None = None
    """Optimizer of the critic group: fake score (+ discriminator) (None: the run's ``train.optim``)."""
    critic_warmup_steps: int = 0
    """Critic-only steps at the start (lets the fake score catch up with a generator that starts distilled)."""
    regression_steps: int = 0
    """Generator-only steps at the start regressing the teacher's ODE outputs from the same noise
    (``onestep_regression``); the critic warm-up and the alternation follow."""
    regression_teacher_steps: int = 8
    """Euler steps of the teacher ODE that gives the regression targets."""
    generator_init: Path | None = None
    """Start the generator from a one-step checkpoint folder (DI* starts from a DMD2 / f-distill generator)."""
    generator_widen: int = 1
    """Generator width = this x the teacher's (``models.widen``: function-preserving, starts as the teacher).
    With ``generator_init``, the folder's own width is used instead."""
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    """Media size of the generated samples (None: the family's default)."""

    def __post_init__(self) -> None:
        if self.generator_every < 1:
            raise ConfigError(f"must be >= 1, got {self.generator_every}", key="generator_every")
        if not 0 < self.t_min <= self.t_max < 1:
            raise ConfigError(
                f"need 0 < t_min <= t_max < 1, got t_min={self.t_min}, t_max={self.t_max}", key="t_min"
            )
        if self.t_power <= 0:
            raise ConfigError(f"must be > 0, got {self.t_power}", key="t_power")
        if self.regression_steps < 0:
            raise ConfigError(f"must be >= 0, got {self.regression_steps}", key="regression_steps")
        if self.regression_teacher_steps < 1:
            raise ConfigError(
                f"must be >= 1, got {self.regression_teacher_steps}", key="regression_teacher_steps"
            )
        if self.generator_widen < 1:
            raise ConfigError(f"must be >= 1, got {self.generator_widen}", key="generator_widen")
        if self.critic_warmup_steps < 0:
            raise ConfigError(f"must be >= 0, got {self.critic_warmup_steps}", key="critic_warmup_steps")
        if self.guidance_scale < 0:
            raise ConfigError(f"must be >= 0, got {self.guidance_scale}", key="guidance_scale")


# ------------------------------------------------------------------------------------------------ helpers
def dist_sum(x: Tensor) -> Tensor:
    """Elementwise SUM of ``x`` over data-parallel ranks (the ``reduce_fn`` of the f-distill objectives).

    Single process (or no process group): ``x`` itself.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.detach().clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Set ``requires_grad=False`` on every parameter of ``modules`` inside the block, then restore.

    Gradients still flow through the modules to their inputs (the generator's sample), never into their
    weights: the other group's networks act as fixed functions during a step.
    """
    params = [p for m in modules for p in m.parameters()]
    previous = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, previous, strict=True):
            p.requires_grad_(flag)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with the CPU RNG seeded, restoring the global RNG afterwards (deterministic inits)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


TEACHER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_teacher(
    path_or_id: str | Path,
    *,
    method: str,
    dtype: str | dict[str, torch.dtype] = "fp32",
    device: str | torch.device = "cpu",
) -> FlowModel:
    """Load a flow teacher of a supported family; the error names the method and the supported families.

    ``dtype`` ("fp32", "bf16", "fp16", or per-component dtypes as :meth:`FlowModel.component_dtypes`
    takes them) is the teacher's storage precision; the generator and a full fake-score copy are
    always fp32.

    Raises:
        ModelLoadError: missing folder, unreadable index or an unsupported pipeline class.
    """
    from flowalign.models.base import ModelLoadError
    from flowalign.models.loading import load_flow_model, registered_families

    if isinstance(dtype, str) and dtype not in TEACHER_DTYPES:
        raise ValueError(f"{method}: teacher_dtype must be one of {sorted(TEACHER_DTYPES)}, got {dtype!r}")
    try:
        torch_dtype = TEACHER_DTYPES[dtype] if isinstance(dtype, str) else dtype
        return load_flow_model(path_or_id, device=device, torch_dtype=torch_dtype)
    except ModelLoadError as err:
        families = sorted(cls.family for cls in registered_families().values())
        raise ModelLoadError(
            f"{method}: cannot use {path_or_id} as the teacher: {err} ({method} distils rectified-flow "
            f"teachers of the families {families})"
        ) from err


# ------------------------------------------------------------------------------------------------ the method base
class OneStepDistillation(Method):
    """Generator + online fake score + frozen teacher on the shared loop; subclasses add the generator loss.

    Args:
        teacher: the frozen flow teacher (any family; its transformer is copied into the generator).
        config: the shared settings (a subclass's config nests or extends :class:`OneStepConfig`).
    """

    def __init__(self, teacher: FlowModel, config: OneStepConfig) -> None:
        refuse_two_experts(teacher)
        self.teacher, self.common = teacher, config
        for module in teacher.modules().values():
            module.requires_grad_(False).eval()
        # trainable copies are fp32 whatever the teacher's storage dtype (a bf16 teacher halves its memory)
        self.generator = copy.deepcopy(teacher.transformer).float().requires_grad_(True).train()
        widen = config.generator_widen
        if config.generator_init is not None:
            widen = _init_width(teacher.transformer, config.generator_init)
        if widen > 1:
            from flowalign.models.widen import widen_transformer

            self.generator = widen_transformer(self.generator, widen).requires_grad_(True).train()
        if config.generator_init is not None:
            load_generator_weights(self.generator, config.generator_init)
        if config.fake_score == "full":
            self.fake = copy.deepcopy(teacher.transformer).float().requires_grad_(True).train()
        else:
            from flowalign.models.lora import add_lora

            with seeded(0):  # the adapters' random init must not depend on the global RNG (exact resume)
                add_lora(teacher.transformer, config.fake_score_lora)
            self.fake = teacher.transformer
        self.height = config.height or teacher.default_height
        self.width = config.width or teacher.default_width
        self.num_frames = config.num_frames or teacher.default_num_frames
        teacher.check_size(self.height, self.width, self.num_frames)

    def finish_loading(self) -> None:
        """Called once every network is where it trains (after staged placement,
        ``flowalign/training/methods/onestep_cache.py``): builds what needs the teacher's forward on
        the device (f-distill's discriminator heads). Default nothing."""

    def keep_teacher_in(self, dtype: torch.dtype) -> None:
        """Cast the frozen teacher transformer to ``dtype`` (the run's compute dtype); the trainable
        LoRA adapters of a ``fake_score: lora`` on it keep their fp32 values, bit for bit."""
        transformer = self.teacher.transformer
        trainable = [(p, p.data) for p in transformer.parameters() if p.requires_grad]
        transformer.to(dtype)
        for p, data in trainable:
            p.data = data
        self.teacher.compute_dtype = dtype

    # ---------------------------------------------------------------- Method hooks
    def trainable_modules(self) -> dict[str, nn.Module]:
        return {GENERATOR: self.generator, "fake_score": self.fake, **self.extra_critic_modules()}

    def extra_critic_modules(self) -> dict[str, nn.Module]:
        """More critic-group modules (f-distill's discriminator heads). Default none."""
        return {}

    prompt_cache: Any = None
    """The teacher's prompt embeddings encoded once (``flowalign/training/methods/onestep_cache.py``)."""

    def frozen_modules(self) -> dict[str, nn.Module]:
        """The teacher's frozen components, less the text encoders once the prompts are cached and the
        VAE once the real media's latents are (``media_cached``): those stay on the CPU."""
        from flowalign.training.cache import text_encoder_names

        trainable = {id(m) for m in self.trainable_modules().values()}
        dropped = set(text_encoder_names(self.teacher)) if self.prompt_cache is not None else set()
        if getattr(self, "media_cached", False):
            dropped.add("vae")
        return {
            k: v for k, v in self.teacher.modules().items() if id(v) not in trainable and k not in dropped
        }

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        critic = [self.fake, *self.extra_critic_modules().values()]
        return {
            GENERATOR: [p for p in self.generator.parameters() if p.requires_grad],
            CRITIC: [p for m in critic for p in m.parameters() if p.requires_grad],
        }

    def optim_config(self, group: str, base: OptimConfig) -> OptimConfig:
        own = self.common.generator_optim if group == GENERATOR else self.common.critic_optim
        return own if own is not None else base

    def groups_to_update(self, step: int) -> list[str]:
        cfg = self.common
        if step < cfg.regression_steps:
            return [GENERATOR]
        step -= cfg.regression_steps
        if step < cfg.critic_warmup_steps:
            return [CRITIC]
        return [GENERATOR] if (step - cfg.critic_warmup_steps) % cfg.generator_every == 0 else [CRITIC]

    def ema_modules(self) -> list[str]:
        return [GENERATOR]

    def collate(self, items: list[dict]) -> PromptBatch:
        """A :class:`MediaBatch` when the items carry real media (``pixels``/``latents``), else a
        :class:`PromptBatch` (data-free distillation)."""
        return _batch_type(items[0] if items else {}).collate(items)

    def compute_loss(
        self, batch: PromptBatch, ctx: StepContext, group: str
    ) -> tuple[Tensor, dict[str, Tensor]]:
        batch = batch if isinstance(batch, PromptBatch) else _batch_type(batch).coerce(batch)
        if group == GENERATOR and ctx.step < self.common.regression_steps:
            from flowalign.training.methods.onestep_regression import regression_loss

            loss, metrics = regression_loss(self, batch, ctx)
        elif group == GENERATOR:
            loss, metrics = self.generator_loss(batch, ctx)
        elif group == CRITIC:
            loss, metrics = self.critic_loss(batch, ctx)
        else:
            raise ValueError(f"{type(self).__name__}: unknown parameter group {group!r}")
        return loss.mean(), metrics

    def generator_loss(self, batch: PromptBatch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-sample generator loss [B] and metrics (implemented by each method)."""
        raise TypeError(f"{type(self).__name__} must define generator_loss")

    def critic_loss(self, batch: PromptBatch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        """Fake-score denoising loss on fresh detached generator samples (docs/algorithms.md 2.5 / 3.4 (a)),
        plus :meth:`extra_critic_loss` (f-distill's discriminator)."""
        ids = batch.index
        cond, _ = self.encode(batch.prompt, with_uncond=False, images=batch.condition)
        with torch.no_grad():
            x0 = self.sample(ids, ctx, cond, net=self.generator)
        t, noise, x_t = self.noised(x0, ids, ctx, key="critic")
        v_fake = self.velocity(x_t, t, cond, net=ctx.module("fake_score"))
        loss, metrics = fake_score_loss(v_fake, x0, noise)
        out = {"fake_score_loss": metrics["loss"]}
        extra = self.extra_critic_loss(batch, ctx, cond, x0)
        if extra is not None:
            loss = loss + extra[0]
            out.update(extra[1])
        return loss, out

    def extra_critic_loss(
        self, batch: PromptBatch, ctx: StepContext, cond: PromptEmbeds, x0: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]] | None:
        """More per-sample critic loss [B] on the same detached generator samples ``x0``. Default none."""
        return None

    # ---------------------------------------------------------------- building blocks
    @contextlib.contextmanager
    def teacher_mode(self) -> Iterator[None]:
        """Inside the block the teacher transformer is the plain teacher (LoRA fake-score adapters off)."""
        if self.fake is self.teacher.transformer:
            from flowalign.models.lora import adapters_disabled

            with adapters_disabled(self.teacher.transformer):
                yield
        else:
            yield

    @property
    def embedded_guidance(self) -> float | None:
        """Guidance input of guidance-distilled teachers (FLUX.1-dev), used by every network; else None."""
        return self.common.guidance_scale if self.teacher.uses_guidance_embedding else None

    @property
    def uses_cfg(self) -> bool:
        return not self.teacher.uses_guidance_embedding and self.common.guidance_scale != 1.0

    def encode(
        self, prompts: list[str], *, with_uncond: bool, images: Sequence | None = None
    ) -> tuple[PromptEmbeds, PromptEmbeds | None]:
        """Prompt embeddings (no grad; the text encoders stay frozen), read from the prompt cache when
        there is one and no condition image (the unconditional branch is the cached empty prompt);
        with ``images`` (one per prompt, image-conditioned teachers) also the condition images' fields
        for the generator's size."""
        if images is None and self.teacher.requires_images:
            raise ValueError(
                f"{self.teacher.family} is conditioned on an image: give each data row its condition "
                "image (an 'image' column in data.real_manifest or data.prompts_file)"
            )
        if self.prompt_cache is not None and images is None:
            device = self.teacher.device
            uncond = self.prompt_cache.lookup([""] * len(prompts), device) if with_uncond else None
            return self.prompt_cache.lookup(list(prompts), device), uncond
        extra = {}
        if images is not None:
            extra = dict(
                images=list(images), height=self.height, width=self.width, num_frames=self.num_frames
            )
        with torch.no_grad():
            return self.teacher.encode_prompt(list(prompts), with_uncond=with_uncond, **extra)

    def probe_images(self) -> list[Tensor] | None:
        """A mid-grey condition image for one probe forward of an image-conditioned teacher, else None."""
        if not self.teacher.requires_images:
            return None
        return [torch.full((3, self.height, self.width), 0.5)]

    def velocity(self, x: Tensor, t: Tensor, cond: PromptEmbeds, *, net: nn.Module) -> Tensor:
        return self.teacher.velocity(x, t, cond, guidance=self.embedded_guidance, net=net)

    def sample(self, ids: Tensor, ctx: StepContext, cond: PromptEmbeds, *, net: nn.Module) -> Tensor:
        """One-step samples x0 = z - v_G(z, 1, c) [B, ...]; z drawn per sample id (key "z")."""
        shape = self.teacher.latent_shape(len(ids), self.height, self.width, self.num_frames)
        z = ctx.randn(shape[1:], ids, key="z").to(ctx.device)
        return generate_x0(self.teacher, net, z, cond, guidance=self.embedded_guidance)

    def noised(self, x0: Tensor, ids: Tensor, ctx: StepContext, *, key: str) -> tuple[Tensor, Tensor, Tensor]:
        """(t [B] in [t_min, t_max] (see ``t_power``), noise, x_t = (1 - t) x0 + t noise); x_t keeps x0's graph."""
        cfg = self.common
        u = ctx.rand((), ids, key=f"{key}/t").to(ctx.device)
        t = cfg.t_min + (cfg.t_max - cfg.t_min) * (u if cfg.t_power == 1.0 else u.pow(cfg.t_power))
        noise = ctx.randn_like(x0, ids, key=f"{key}/noise").to(x0.dtype)
        return t, noise, flow.interpolate(x0, noise, t)

    def teacher_velocity(
        self, x_t: Tensor, t: Tensor, cond: PromptEmbeds, uncond: PromptEmbeds | None
    ) -> Tensor:
        """Teacher velocity with CFG, v = v(x|0) + omega (v(x|c) - v(x|0)), in one batched forward."""
        with self.teacher_mode():
            net = self.teacher.transformer
            if not self.uses_cfg:
                return self.velocity(x_t, t, cond, net=net)
            assert uncond is not None, "CFG needs the unconditional embeddings"
            both = PromptEmbeds.cat([uncond, cond])
            v = self.velocity(torch.cat([x_t, x_t]), torch.cat([t, t]), both, net=net)
            v_uncond, v_cond = v.chunk(2)
            # written around v_cond so that omega = 1 is exactly the conditional velocity
            return v_cond + (self.common.guidance_scale - 1) * (v_cond - v_uncond)

    # ---------------------------------------------------------------- state and export
    def export(self, out_dir: Path) -> None:
        """The generator as a complete model folder in diffusers' layout plus ``one_step.json``."""
        from flowalign.pipelines.one_step import save_one_step

        save_one_step(
            self.teacher,
            self.generator,
            out_dir,
            method=type(self).__name__,
            guidance_scale=self.embedded_guidance,
            extra=self.export_metadata(),
        )

    def export_metadata(self) -> dict[str, Any]:
        """Method settings recorded in ``one_step.json``."""
        return {}


def _init_width(transformer: nn.Module, folder: str | Path) -> int:
    """How many times wider than ``transformer`` the generator in ``folder`` is (1 without a readable config)."""
    file = Path(folder) / "transformer" / "config.json"
    heads = (
        getattr(transformer.config, "num_attention_heads", None) if hasattr(transformer, "config") else None
    )
    if not heads or not file.is_file():
        return 1
    wide = json.loads(file.read_text()).get("num_attention_heads", heads)
    return max(1, wide // heads)


def load_generator_weights(generator: nn.Module, folder: str | Path) -> None:
    """Copy the transformer weights of a one-step checkpoint folder (diffusers layout) into ``generator``.

    Raises:
        ValueError: no transformer weights in the folder, or names/shapes that do not match.
    """
    from safetensors.torch import load_file

    files = sorted((Path(folder) / "transformer").glob("*.safetensors"))
    if not files:
        raise ValueError(f"generator_init: {folder} has no transformer/*.safetensors (not a model folder)")
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    try:
        generator.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"generator_init: {folder} does not fit the teacher's transformer: {err}") from None


def generate_x0(
    model: FlowModel, net: nn.Module, z: Tensor, cond: PromptEmbeds, *, guidance: float | None = None
) -> Tensor:
    """One-step generation with network ``net``: x0 = z - 1 * v(z, t=1, c) (flow.x0_from_velocity at t = 1).

    Args:
        model: the family adapter.
        net: the generator transformer.
        z: pure noise [B, ...] in canonical latent shape.
        cond: prompt embeddings (B rows).
        guidance: embedded guidance for guidance-distilled families.

    Returns:
        x0 [B, ...], differentiable w.r.t. ``net`` when grad is enabled.
    """
    t = torch.full((z.shape[0],), GENERATOR_TIME, device=z.device, dtype=torch.float32)
    v = model.velocity(z, t, cond, guidance=guidance, net=net)
    return flow.x0_from_velocity(z, v, t)


def _batch_type(item: Mapping[str, Any]) -> type[PromptBatch]:
    """The batch class of items (or a batch mapping) like ``item``: media or prompts only."""
    return MediaBatch if ("pixels" in item or "latents" in item) else PromptBatch
