r"""Flow-NRG: inference-time reward guidance as a velocity transform (docs/algorithms.md 1D).

Tilting each marginal by the reward, p~_t(x) ∝ p_t(x) exp(w r(x, t)), adds w ∇r to the score; with
v = -(x + t s) / (1 - t) (flow.py) the guided velocity is

    v~(x_t, t, c) = v(x_t, t, c) - w * t / (1 - t) * ∇_{x_t} r(x_t, t, c),      r = sum_k λ_k r~_k

An Euler step x_{t'} = x_t + (t' - t) v~ with t' < t therefore moves x along +∇r. The factor
t / (1 - t) is 0 at t = 0 and diverges at t = 1, so t is clamped to ``t_max`` (0.98: factor 49) inside
it. Usage with the pipeline::

    guide = LatentRewardModel.from_pretrained(guide_dir, model=model)
    nrg = latent_reward_guidance(model, guide, prompts, {"ta": 1.0}, strength=0.5)
    FlowPipeline(model)(prompts, velocity_transforms=[nrg])

The transform wraps the velocity it is given — in :class:`~flowalign.pipelines.FlowPipeline` the
CFG-combined one — so guidance is applied after CFG, once per velocity evaluation (twice per Heun step).
Gradients are computed in fp32 under ``torch.enable_grad`` (the pipeline samples under ``no_grad``) from
a detached copy of x: when sampling with ``enable_grad=True`` the guidance term is a constant for
backpropagation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from flowalign.flow import expand_t, x0_from_velocity
from flowalign.models.base import FlowModel, PromptEmbeds
from flowalign.rewards.base import RewardModel
from flowalign.rewards.latent import LatentRewardModel
from flowalign.sampling.guidance import VelocityTransform
from flowalign.sampling.samplers import VelocityFn

__all__ = [
    "RewardFn",
    "guidance_factor",
    "latent_reward_fn",
    "latent_reward_guidance",
    "pixel_reward_guidance",
    "reward_gradient",
    "reward_guidance",
]

RewardFn = Callable[[Tensor, Tensor], Tensor]
"""(x_t [B, ...], t [B]) -> r [B]: the weighted sum over normalised reward dimensions."""

# (v_fn, x [B, ...], t [B]) -> (v [B, ...], grad_x r [B, ...] fp32)
_GradFn = Callable[[VelocityFn, Tensor, Tensor], tuple[Tensor, Tensor]]


def guidance_factor(t: Tensor, *, t_max: float = 0.98) -> Tensor:
    """The NRG time factor t / (1 - t) with t clamped to [0, t_max] (0 at t = 0, t_max / (1 - t_max) near 1).

    Args:
        t: times [B] (or any shape) in [0, 1], 1 = noise.
        t_max: clamp, in (0, 1).

    Returns:
        tensor of ``t``'s shape, float32 (float64 for float64 t).
    """
    tc = t.to(torch.promote_types(t.dtype, torch.float32)).clamp(0.0, t_max)
    return tc / (1 - tc)


def _check_common(strength: float, t_max: float, step_range: tuple[float, float] | None) -> None:
    if not (isinstance(strength, int | float) and math.isfinite(strength) and strength >= 0):
        raise ValueError(f"reward guidance: strength must be a finite number >= 0, got {strength!r}")
    if not 0 < t_max < 1:
        raise ValueError(f"reward guidance: t_max must be in (0, 1), got {t_max!r}")
    if step_range is not None:
        lo, hi = step_range
        if not (0 <= lo <= hi <= 1):
            raise ValueError(
                f"reward guidance: step_range must be (a, b) with 0 <= a <= b <= 1 (t values, 1 = noise), "
                f"got {tuple(step_range)!r}"
            )


def reward_gradient(reward_fn: RewardFn, x: Tensor, t: Tensor) -> Tensor:
    """∇_x sum_b r(x, t)_b in fp32 (fp64 for fp64 x), with grad enabled whatever the caller's mode.

    The gradient is taken at a detached copy of x, so it never joins the caller's graph.

    Raises:
        ValueError: ``reward_fn`` does not return a [B] tensor.
    """
    dtype = _compute_dtype(x)
    with torch.enable_grad():
        x_in = x.detach().to(dtype).requires_grad_(True)
        r = reward_fn(x_in, t.detach().to(dtype))
        if r.shape != (x.shape[0],):
            raise ValueError(
                f"reward_fn must return one value per sample [B={x.shape[0]}], got {tuple(r.shape)}"
            )
        (grad,) = torch.autograd.grad(r.to(dtype).sum(), x_in)
    return grad


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _guidance_transform(
    grad_fn: _GradFn, *, strength: float, t_max: float, step_range: tuple[float, float] | None
) -> VelocityTransform:
    _check_common(strength, t_max, step_range)

    def transform(v_fn: VelocityFn) -> VelocityFn:
        if strength == 0:
            return v_fn  # the unguided sampler, bit for bit

        def guided(x: Tensor, t: Tensor) -> Tensor:
            active = torch.ones_like(t, dtype=torch.bool)
            if step_range is not None:
                active = (t >= step_range[0]) & (t <= step_range[1])
            if not bool(active.any()):
                return v_fn(x, t)
            v, grad = grad_fn(v_fn, x, t)
            scale = strength * guidance_factor(t, t_max=t_max) * active  # [B]
            dtype = _compute_dtype(v)
            return (v.to(dtype) - expand_t(scale.to(dtype), grad) * grad.to(dtype)).to(v.dtype)

        return guided

    return transform


def reward_guidance(
    reward_fn: RewardFn,
    *,
    strength: float,
    t_max: float = 0.98,
    step_range: tuple[float, float] | None = None,
) -> VelocityTransform:
    """Velocity transform v -> v - w * t / (1 - t) * ∇_x r(x, t)  (Flow-NRG, docs/algorithms.md 1D).

    Args:
        reward_fn: (x_t [B, ...], t [B]) -> [B], differentiable in x_t (already the weighted sum of
            normalised dimensions; see :func:`latent_reward_fn`).
        strength: w >= 0; 0 returns the wrapped velocity function itself.
        t_max: t is clamped to t_max inside the factor (t / (1 - t) diverges at t = 1).
        step_range: (a, b): guide only when a <= t <= b; other steps are the unguided velocity.

    Returns:
        A :data:`~flowalign.sampling.guidance.VelocityTransform` for ``FlowPipeline(velocity_transforms=...)``.

    Raises:
        ValueError: negative or non-finite strength, t_max outside (0, 1), or a bad step_range.
    """

    def grad_fn(v_fn: VelocityFn, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return v_fn(x, t), reward_gradient(reward_fn, x, t)

    return _guidance_transform(grad_fn, strength=strength, t_max=t_max, step_range=step_range)


def _encode(model: FlowModel, prompts: Sequence[str], num_samples_per_prompt: int) -> PromptEmbeds:
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"reward guidance: prompts must be a non-empty list of str, got {prompts!r}")
    if num_samples_per_prompt < 1:
        raise ValueError(
            f"reward guidance: num_samples_per_prompt must be >= 1, got {num_samples_per_prompt}"
        )
    with torch.no_grad():
        cond, _ = model.encode_prompt(list(prompts))
    return cond.repeat_interleave(num_samples_per_prompt) if num_samples_per_prompt > 1 else cond


def latent_reward_fn(
    reward_model: LatentRewardModel,
    cond: PromptEmbeds | Sequence[str],
    weights: Mapping[str, float],
    *,
    model: FlowModel | None = None,
) -> RewardFn:
    """r(x_t, t) = sum_k w_k (r_k(x_t, t, c) - mean_k) / std_k from a latent reward model.

    Args:
        reward_model: the noise-aware latent reward model.
        cond: prompt embeddings with one row per sample, or prompts (then ``model`` encodes them).
        weights: {dimension: w_k}; dimensions left out get 0.
        model: the flow model, needed to encode prompts; also checked for compatibility when given.

    Raises:
        ValueError: a weight names an unknown dimension (named in the message) or is not finite;
            prompts given without a model.
        LatentRewardLoadError: ``model`` is of another family or architecture than the reward's trunk.
    """
    weights = reward_model.check_weights(weights)
    if model is not None:
        reward_model.check_compatible(model)
    if not isinstance(cond, PromptEmbeds):
        if model is None:
            raise ValueError("latent_reward_fn: pass model= to encode prompts (or pass PromptEmbeds)")
        cond = _encode(model, cond, 1)

    def reward_fn(x: Tensor, t: Tensor) -> Tensor:
        if len(cond) != x.shape[0]:
            raise ValueError(
                f"latent reward guidance: {len(cond)} prompt rows for a batch of {x.shape[0]} samples "
                "(repeat the prompts once per sample)"
            )
        return reward_model.weighted(x, t, cond, weights)

    return reward_fn


def latent_reward_guidance(
    model: FlowModel,
    reward_model: LatentRewardModel,
    prompts: Sequence[str],
    weights: Mapping[str, float],
    *,
    strength: float,
    num_samples_per_prompt: int = 1,
    t_max: float = 0.98,
    step_range: tuple[float, float] | None = None,
    cond: PromptEmbeds | None = None,
) -> VelocityTransform:
    """Flow-NRG with a latent reward model, ready for ``FlowPipeline(..., velocity_transforms=[...])``.

    Pass the same ``prompts`` and ``num_samples_per_prompt`` as to the pipeline. With strength 0 or
    all weights 0 the transform is the identity (the unguided sampler exactly). ``cond`` (one row per
    sample) replaces encoding the prompts: an image-conditioned family's embeddings with their images.

    Raises:
        ValueError: bad strength, t_max, step_range, or a weight naming an unknown dimension.
        LatentRewardLoadError: the reward model belongs to another family or architecture.
    """
    _check_common(strength, t_max, step_range)
    weights = reward_model.check_weights(weights)
    reward_model.check_compatible(model)
    if strength == 0 or all(w == 0 for w in weights.values()):
        return lambda v_fn: v_fn
    if cond is None:
        cond = _encode(model, prompts, num_samples_per_prompt)
    reward_fn = latent_reward_fn(reward_model, cond, weights)
    return reward_guidance(reward_fn, strength=strength, t_max=t_max, step_range=step_range)


def pixel_reward_guidance(
    model: FlowModel,
    reward_model: RewardModel | Sequence[RewardModel],
    weights: Mapping[str, float],
    prompts: Sequence[str],
    *,
    strength: float,
    normalisation: Mapping[str, Sequence[float]] | None = None,
    num_samples_per_prompt: int = 1,
    t_max: float = 0.98,
    step_range: tuple[float, float] | None = None,
    backprop_through_model: bool = False,
) -> VelocityTransform:
    r"""Reward guidance with a clean-media reward on the decoded one-step estimate (the comparison baseline).

        x0_hat = x_t - t v(x_t, t),   r(x_t, t) = sum_k w_k (R_k(decode(x0_hat), c) - mean_k) / std_k
        v~ = v - w * t / (1 - t) * ∇_{x_t} r

    The transform needs the base velocity to form x0_hat: it uses the very velocity function it wraps
    (in FlowPipeline, the CFG-combined one), so it costs no extra model call. With
    ``backprop_through_model=False`` (default) v is held constant, so ∇_{x_t} r = ∇_{x0_hat} r (no
    backward through the flow model); with True the gradient goes through v as well (DPS-style, one
    extra backward through the transformer per step; the returned velocity is then detached, so this
    mode does not support backpropagation through sampling).

    Args:
        model: the flow model (decodes latents, encodes nothing).
        reward_model: a differentiable :class:`~flowalign.rewards.base.RewardModel` (pixels in [0, 1]),
            or a list of them.
        weights: {dimension: w_k}; every name must be a dimension of the reward model(s).
        prompts: the pipeline's prompts (repeated ``num_samples_per_prompt`` times per sample).
        strength, t_max, step_range: as in :func:`reward_guidance`.
        normalisation: {dimension: (mean, std)}; default: stored with the reward, else (0, 1).
        num_samples_per_prompt: as given to the pipeline.
        backprop_through_model: differentiate through the velocity too.

    Raises:
        ValueError: a weight naming an unknown dimension (named), a non-differentiable reward, bad
            strength/t_max/step_range.
    """
    from flowalign.rewards.combine import OVERALL, RewardCombiner

    rewards = list(reward_model) if isinstance(reward_model, list | tuple) else [reward_model]
    combiner = RewardCombiner(rewards, weights=dict(weights), normalisation=normalisation)
    for reward in rewards:
        if not reward.differentiable:
            raise ValueError(f"pixel reward guidance: reward {reward.name!r} is not differentiable")
    _check_common(strength, t_max, step_range)
    if strength == 0 or all(w == 0 for w in combiner.weights.values()):
        return lambda v_fn: v_fn
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"pixel reward guidance: prompts must be a non-empty list of str, got {prompts!r}")
    per_sample = [p for p in prompts for _ in range(num_samples_per_prompt)]

    def reward_of_x0(x0: Tensor) -> Tensor:
        if len(per_sample) != x0.shape[0]:
            raise ValueError(f"pixel reward guidance: {len(per_sample)} prompts for a batch of {x0.shape[0]}")
        media = model.decode_latents(x0)
        return combiner.score(media, per_sample, differentiable=True)[OVERALL]

    def grad_fn(v_fn: VelocityFn, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        dtype = _compute_dtype(x)
        t32 = t.detach().to(dtype)
        if backprop_through_model:
            with torch.enable_grad():
                x_in = x.detach().to(dtype).requires_grad_(True)
                v = v_fn(x_in.to(x.dtype), t)
                r = reward_of_x0(x0_from_velocity(x_in, v.to(dtype), t32))
                (grad,) = torch.autograd.grad(r.sum(), x_in)
            return v.detach(), grad
        v = v_fn(x, t)  # in the caller's grad mode
        with torch.enable_grad():
            x0 = x0_from_velocity(x.detach().to(dtype), v.detach().to(dtype), t32)
            x0.requires_grad_(True)
            (grad,) = torch.autograd.grad(reward_of_x0(x0).sum(), x0)
        return v, grad

    return _guidance_transform(grad_fn, strength=strength, t_max=t_max, step_range=step_range)
