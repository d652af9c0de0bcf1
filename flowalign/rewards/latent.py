"""A noise-aware latent reward model for Flow-NRG: reads (x_t, t, prompt), returns one score per dimension.

Architecture (docs/algorithms.md 1D; the paper's exact one is not published, this is our design):

    tokens, temb = trunk(x_t, t, c)          the base flow transformer's patch embedding, time/text
                                             embedding and first k blocks (a copy: frozen, LoRA or full)
    r_k(x_t, t, c) = MLP_k( mean_n silu(W_k LN(tokens_n)) + U_k LN(temb) )      one head per dimension

The trunk sees t (through the transformer's own timestep embedding) and the prompt (through its text
attention), so the reward is defined on noisy inputs. Per-dimension normalisation (mean, std) is stored
with the model; guidance uses r = sum_k w_k (r_k - mean_k) / std_k.

Family-specific code is one small table (:data:`_TRUNKS`), keyed by the transformer class: which
modules form the embedding, where the blocks live, how to call them. It is not a ``flowalign.models``
family adapter because it reaches inside the transformer's forward; supported: ``SD3Transformer2DModel``
(toy images, SD3/SD3.5) and ``WanTransformer3DModel`` (toy videos, Wan). It is not a
:class:`~flowalign.rewards.base.RewardModel` either: that contract takes clean media in [0, 1], this one
takes noisy canonical latents, a time and encoded prompts.

Files (``save_pretrained``): ``latent_reward.json`` (family, transformer class and config, trunk
depth, dimensions, head width, normalisation) and ``model.safetensors`` (trunk with any LoRA merged,
plus heads). Loading checks the family and transformer class against the flow model it will guide.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowalign.files import atomic_write, atomic_write_json
from flowalign.flow import t_to_timesteps
from flowalign.formats import read_tagged_json
from flowalign.models.base import FlowModel, PromptEmbeds

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "LatentRewardLoadError",
    "LatentRewardModel",
    "LatentRewardSpec",
    "supported_transformers",
]

CONFIG_NAME = "latent_reward.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "flowalign.latent_reward"
FORMAT_VERSION = 1


class LatentRewardLoadError(ValueError):
    """A latent reward folder that cannot be read, or that belongs to another model family."""


# ---------------------------------------------------------------------------------------- trunks
def _sd3_forward(trunk: nn.ModuleDict, x: Tensor, t: Tensor, cond: PromptEmbeds) -> tuple[Tensor, Tensor]:
    # same calls as SD3Transformer2DModel.forward up to block k (diffusers 0.42)
    if cond.pooled is None:
        raise ValueError(
            "latent reward (SD3-type trunk): cond.pooled is None; encode prompts with the flow model"
        )
    tokens = trunk["pos_embed"](x).contiguous()  # [B, N, D]
    temb = trunk["time_text_embed"](t_to_timesteps(t), cond.pooled)  # [B, D]; SD3 takes t * 1000
    context = trunk["context_embedder"](cond.embeds)  # [B, L, D]
    for block in trunk["blocks"]:
        context, tokens = block(hidden_states=tokens, encoder_hidden_states=context, temb=temb)
    return tokens, temb


def _wan_forward(trunk: nn.ModuleDict, x: Tensor, t: Tensor, cond: PromptEmbeds) -> tuple[Tensor, Tensor]:
    # same calls as WanTransformer3DModel.forward up to block k (diffusers 0.42)
    rotary = trunk["rope"](x)
    tokens = trunk["patch_embedding"](x).flatten(2).transpose(1, 2).contiguous()  # [B, N, D]
    temb, timestep_proj, context, _ = trunk["condition_embedder"](t_to_timesteps(t), cond.embeds, None)
    timestep_proj = timestep_proj.unflatten(1, (6, -1))  # [B, 6, D]
    for block in trunk["blocks"]:
        tokens = block(tokens, context, timestep_proj, rotary)
    return tokens, temb


@dataclass(frozen=True)
class _TrunkSpec:
    embedders: tuple[str, ...]
    """Attributes of the transformer copied into the trunk before the blocks."""
    blocks: str
    """Attribute holding the block list."""
    forward: Callable[[nn.ModuleDict, Tensor, Tensor, PromptEmbeds], tuple[Tensor, Tensor]]
    layers_to_build: Callable[[int, int], int]
    """(trunk depth k, base depth L) -> num_layers of a from-config build whose first k blocks match."""
    unused_in_last: Callable[[nn.Module], tuple[str, ...]] = lambda block: ()
    """Submodules of the last trunk block whose output the trunk never reads (frozen when training)."""


def _sd3_unused(block: nn.Module) -> tuple[str, ...]:
    # a joint block updates the text stream too; the trunk's last text-stream update is never read
    return (
        () if getattr(block, "context_pre_only", True) else ("attn.to_add_out", "ff_context", "norm2_context")
    )


_TRUNKS: dict[str, _TrunkSpec] = {
    # SD3's last block is context_pre_only; building k + 1 layers keeps block k - 1 a full joint block.
    "SD3Transformer2DModel": _TrunkSpec(
        ("pos_embed", "time_text_embed", "context_embedder"),
        "transformer_blocks",
        _sd3_forward,
        lambda k, n: min(k + 1, n),
        _sd3_unused,
    ),
    "WanTransformer3DModel": _TrunkSpec(
        ("rope", "patch_embedding", "condition_embedder"), "blocks", _wan_forward, lambda k, n: k
    ),
}


def supported_transformers() -> list[str]:
    """Transformer classes a latent reward trunk can be cut from."""
    return sorted(_TRUNKS)


def _trunk_spec(class_name: str) -> _TrunkSpec:
    if class_name not in _TRUNKS:
        raise ValueError(
            f"latent reward: no trunk for transformer class {class_name!r}; supported: {supported_transformers()}"
        )
    return _TRUNKS[class_name]


def _cut_trunk(
    transformer: nn.Module, class_name: str, num_blocks: int, *, copy_modules: bool
) -> nn.ModuleDict:
    spec = _trunk_spec(class_name)
    take = copy.deepcopy if copy_modules else (lambda m: m)
    parts = {name: take(getattr(transformer, name)) for name in spec.embedders}
    parts["blocks"] = nn.ModuleList([take(b) for b in getattr(transformer, spec.blocks)[:num_blocks]])
    return nn.ModuleDict(parts)


def _plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-normalised public transformer config (tuples -> lists, private ``_`` keys dropped)."""
    return json.loads(
        json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, default=list)
    )


# ---------------------------------------------------------------------------------------- heads
class _Head(nn.Module):
    """One dimension: token-wise projection, mean pool, plus the time/text embedding, then an MLP -> [B]."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.token_proj = nn.Linear(width, hidden)
        self.temb_proj = nn.Linear(width, hidden)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, tokens: Tensor, temb: Tensor) -> Tensor:
        pooled = F.silu(self.token_proj(tokens)).mean(dim=1)  # [B, H]
        return self.mlp(pooled + self.temb_proj(temb)).squeeze(-1)  # [B]


@dataclass
class LatentRewardSpec:
    """Everything needed to rebuild a :class:`LatentRewardModel` (written as ``latent_reward.json``)."""

    family: str
    """``FlowModel.family`` of the base model (e.g. "toy", "sd3", "wan")."""
    transformer_class: str
    """Class name of the base transformer the trunk was cut from."""
    transformer_config: dict[str, Any]
    """The base transformer's public diffusers config."""
    num_blocks: int
    """Trunk depth k (first k transformer blocks)."""
    dimensions: tuple[str, ...]
    """Reward dimensions, e.g. ("vq", "ta") for images, ("vq", "mq", "ta") for videos."""
    head_hidden: int = 128
    """Hidden width of each per-dimension head."""
    normalisation: dict[str, tuple[float, float]] | None = None
    """Per-dimension (mean, std) of raw scores; None = not calibrated (then (0, 1))."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (training time range, steps, ...)."""


def _check_dimensions(dimensions: Sequence[str]) -> tuple[str, ...]:
    dims = tuple(dimensions)
    if not dims or not all(isinstance(d, str) and d for d in dims):
        raise ValueError(f"latent reward: dimensions must be non-empty names, got {list(dims)}")
    if len(set(dims)) != len(dims):
        raise ValueError(f"latent reward: dimensions must be unique, got {list(dims)}")
    return dims


def _check_stats(stats: Mapping[str, Sequence[float]], dims: tuple[str, ...], source: str) -> dict:
    unknown = sorted(set(stats) - set(dims))
    if unknown:
        raise ValueError(
            f"{source}: normalisation names unknown dimension(s) {unknown}; dimensions are {list(dims)}"
        )
    out = {}
    for dim, pair in stats.items():
        mean, std = (float(v) for v in pair)
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise ValueError(
                f"{source}: normalisation of {dim!r} needs finite mean and std > 0, got {tuple(pair)}"
            )
        out[dim] = (mean, std)
    return out


class LatentRewardModel(nn.Module):
    """Noise-aware multi-dimensional reward on canonical latents (the guide of Flow-NRG).

    ``forward(x_t [B, ...], t [B], cond) -> {dim: float32 [B]}`` (raw scores); :meth:`weighted` gives
    sum_k w_k (r_k - mean_k) / std_k. Build one with :meth:`from_flow_model`, load with
    :meth:`from_pretrained`.

    Attributes:
        spec: the :class:`LatentRewardSpec` (family, trunk, dimensions, normalisation).
        trunk: the embedders and first k blocks of the base transformer.
        heads: one head per dimension.
    """

    input_kind = "latents"
    differentiable = True

    def __init__(self, spec: LatentRewardSpec, trunk: nn.ModuleDict) -> None:
        super().__init__()
        spec.dimensions = _check_dimensions(spec.dimensions)
        self._trunk_spec = _trunk_spec(spec.transformer_class)
        self.spec = spec
        self.trunk = trunk
        cfg = spec.transformer_config
        width = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
        self.token_norm = nn.LayerNorm(width, elementwise_affine=False)
        self.temb_norm = nn.LayerNorm(width, elementwise_affine=False)
        self.heads = nn.ModuleDict({d: _Head(width, spec.head_hidden) for d in spec.dimensions})
        self.set_normalisation(spec.normalisation or {})

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_flow_model(
        cls,
        model: FlowModel,
        *,
        dimensions: Sequence[str],
        num_blocks: int = 2,
        head_hidden: int = 128,
        seed: int = 0,
    ) -> LatentRewardModel:
        """Cut a reward model from ``model``'s transformer: a copy of its embedders and first k blocks.

        Args:
            model: the base flow model (its transformer is copied, never modified).
            dimensions: reward dimension names.
            num_blocks: trunk depth k, 1 <= k <= the transformer's block count.
            head_hidden: width of each head.
            seed: seed of the heads' initialisation.

        Raises:
            ValueError: unsupported transformer class (names the supported ones) or k out of range.
        """
        transformer = model.transformer
        class_name = type(transformer).__name__
        spec_t = _trunk_spec(class_name)
        total = len(getattr(transformer, spec_t.blocks))
        if not 1 <= num_blocks <= total:
            raise ValueError(
                f"latent reward: num_blocks must be in [1, {total}] for this transformer, got {num_blocks}"
            )
        spec = LatentRewardSpec(
            family=model.family,
            transformer_class=class_name,
            transformer_config=_plain_config(transformer.config),
            num_blocks=num_blocks,
            dimensions=tuple(dimensions),
            head_hidden=head_hidden,
        )
        trunk = _cut_trunk(transformer, class_name, num_blocks, copy_modules=True)
        devices = {p.device for p in trunk.parameters()}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = cls(spec, trunk)
        return out.to(device=next(iter(devices)), dtype=transformer.dtype)

    @classmethod
    def from_spec(cls, spec: LatentRewardSpec, *, transformer_cls: type | None = None) -> LatentRewardModel:
        """A randomly initialised model with ``spec``'s architecture (weights are loaded afterwards)."""
        spec_t = _trunk_spec(spec.transformer_class)
        if transformer_cls is None:
            import diffusers

            transformer_cls = getattr(diffusers, spec.transformer_class)
        config = dict(spec.transformer_config)
        total = int(config["num_layers"])
        config["num_layers"] = spec_t.layers_to_build(spec.num_blocks, total)
        source = transformer_cls.from_config(config)
        return cls(spec, _cut_trunk(source, spec.transformer_class, spec.num_blocks, copy_modules=False))

    def unused_parameters(self) -> list[nn.Parameter]:
        """Trunk parameters that cannot affect the scores (freeze them: DDP needs every trainable one used)."""
        last = self.trunk["blocks"][-1]
        names = self._trunk_spec.unused_in_last(last)
        return [
            p
            for name in names
            if hasattr(last, name.split(".")[0])
            for p in last.get_submodule(name).parameters()
        ]

    # ------------------------------------------------------------------ normalisation
    @property
    def dimensions(self) -> tuple[str, ...]:
        return self.spec.dimensions

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def normalisation(self) -> dict[str, tuple[float, float]]:
        """Per-dimension (mean, std) used by :meth:`normalise` ((0, 1) where not calibrated)."""
        return {d: self.spec.normalisation.get(d, (0.0, 1.0)) for d in self.dimensions}

    def set_normalisation(self, stats: Mapping[str, Sequence[float]]) -> None:
        """Store per-dimension (mean, std) (e.g. from :func:`flowalign.rewards.stats_from_scores`).

        Raises:
            ValueError: an unknown dimension, a non-finite mean or std, or std <= 0.
        """
        self.spec.normalisation = _check_stats(stats, self.dimensions, "latent reward")

    def normalise(self, scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """(r_k - mean_k) / std_k for each dimension in ``scores``."""
        stats = self.normalisation
        return {d: (r - stats[d][0]) / stats[d][1] for d, r in scores.items()}

    # ------------------------------------------------------------------ scoring
    def check_weights(self, weights: Mapping[str, float]) -> dict[str, float]:
        """Validate guidance weights: every name a dimension of this model, every value finite.

        Raises:
            ValueError: naming the unknown dimension(s) and the available ones, or a non-finite weight.
        """
        unknown = [d for d in weights if d not in self.dimensions]
        if unknown:
            raise ValueError(
                f"reward weights name unknown dimension(s) {unknown}; this latent reward model has {list(self.dimensions)}"
            )
        out = {}
        for dim, w in weights.items():
            if not math.isfinite(float(w)):
                raise ValueError(f"reward weight of {dim!r} must be finite, got {w}")
            out[dim] = float(w)
        return out

    def forward(self, x_t: Tensor, t: Tensor, cond: PromptEmbeds) -> dict[str, Tensor]:
        """Raw scores of noisy latents.

        Args:
            x_t: canonical noisy latents [B, C, H, W] (images) or [B, C, T, H, W] (videos).
            t: times [B] in [0, 1] (1 = noise), or a scalar.
            cond: the flow model's prompt embeddings for the B rows.

        Returns:
            ``{dim: [B]}``, float32 (float64 for a float64 model).
        """
        dtype = self.dtype
        b = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32)
        t = t.expand(b) if t.ndim == 0 else t
        if len(cond) != b or t.shape != (b,):
            raise ValueError(
                f"latent reward: x_t has batch {b} but cond has {len(cond)} rows and t shape {tuple(t.shape)}"
            )
        cond = cond.to(device=x_t.device, dtype=dtype)
        tokens, temb = self._trunk_spec.forward(self.trunk, x_t.to(dtype), t.to(dtype), cond)
        tokens, temb = self.token_norm(tokens), self.temb_norm(temb)  # [B, N, D], [B, D]
        out_dtype = torch.promote_types(dtype, torch.float32)  # fp32 scores, fp64 for a fp64 model
        return {d: head(tokens, temb).to(out_dtype) for d, head in self.heads.items()}

    @property
    def dtype(self) -> torch.dtype:
        """The trunk's parameter dtype (inputs are cast to it)."""
        return next(self.trunk.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.trunk.parameters()).device

    def weighted(self, x_t: Tensor, t: Tensor, cond: PromptEmbeds, weights: Mapping[str, float]) -> Tensor:
        """r = sum_k w_k (r_k - mean_k) / std_k, [B] in the scores' dtype (weight-0 dimensions add nothing)."""
        weights = {d: w for d, w in self.check_weights(weights).items() if w != 0}
        scores = self.normalise(self(x_t, t, cond))
        total = torch.zeros_like(next(iter(scores.values())))
        for dim, w in weights.items():
            total = total + w * scores[dim]
        return total

    # ------------------------------------------------------------------ compatibility and files
    def check_compatible(self, model: FlowModel) -> None:
        """Raise :class:`LatentRewardLoadError` unless ``model`` is the family/architecture this reward reads."""
        check_spec_compatible(self.spec, model, source="latent reward model")

    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Write ``latent_reward.json`` and ``model.safetensors`` (LoRA merged) atomically into ``out_dir``."""
        from safetensors.torch import save_file

        from flowalign.models.lora import has_lora, merge_lora

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        module: nn.Module = self
        if has_lora(self):
            module = copy.deepcopy(self)
            merge_lora(module.trunk)
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self.spec)}
        config["dimensions"] = list(self.spec.dimensions)
        config["dtype"] = str(self.dtype).removeprefix("torch.")
        with atomic_write(out_dir / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        atomic_write_json(out_dir / CONFIG_NAME, config)
        return out_dir

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        model: FlowModel | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> LatentRewardModel:
        """Load a saved latent reward model (eval mode, frozen).

        Args:
            path: folder written by :meth:`save_pretrained`.
            model: the flow model it will guide; its family, transformer class and config are checked.
            device: where to put it.
            dtype: parameter dtype (default: the saved one).

        Raises:
            LatentRewardLoadError: missing/invalid files, or a guide of another family or architecture
                (the message names both).
        """
        from safetensors.torch import load_file

        path = Path(path)
        spec = read_spec(path)
        if model is not None:
            check_spec_compatible(spec, model, source=str(path))
        transformer_cls = type(model.transformer) if model is not None else None
        out = cls.from_spec(spec, transformer_cls=transformer_cls)
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise LatentRewardLoadError(f"{path}: no {WEIGHTS_NAME} beside {CONFIG_NAME}")
        try:
            state = load_file(str(weights))
        except Exception as err:  # safetensors raises several types for damaged files
            raise LatentRewardLoadError(f"{weights}: cannot read safetensors ({err})") from err
        expected = out.state_dict()
        missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
        reshaped = [k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape]
        if missing or unexpected or reshaped:
            raise LatentRewardLoadError(
                f"{weights}: weights do not match {CONFIG_NAME}: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                f"shape differs for {sorted(reshaped)[:3]}"
            )
        out.load_state_dict(state)
        saved = json.loads((path / CONFIG_NAME).read_text()).get("dtype", "float32")
        out = out.to(device=device, dtype=dtype or getattr(torch, saved, torch.float32))
        return out.eval().requires_grad_(False)


def read_spec(path: str | os.PathLike) -> LatentRewardSpec:
    """Read and validate ``latent_reward.json`` of a saved model folder."""
    path = Path(path)
    file = path / CONFIG_NAME
    data = read_tagged_json(
        file,
        FORMAT,
        error=LatentRewardLoadError,
        version=FORMAT_VERSION,
        missing=f"no {CONFIG_NAME} inside ({path} is not a latent reward model folder)",
    )
    try:
        norm = data.get("normalisation")
        spec = LatentRewardSpec(
            family=str(data["family"]),
            transformer_class=str(data["transformer_class"]),
            transformer_config=dict(data["transformer_config"]),
            num_blocks=int(data["num_blocks"]),
            dimensions=_check_dimensions(data["dimensions"]),
            head_hidden=int(data.get("head_hidden", 128)),
            normalisation=None if norm is None else {d: (float(m), float(s)) for d, (m, s) in norm.items()},
            metadata=dict(data.get("metadata") or {}),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise LatentRewardLoadError(f"{file}: invalid entry ({type(err).__name__}: {err})") from err
    if spec.transformer_class not in _TRUNKS:
        raise LatentRewardLoadError(
            f"{file}: transformer_class {spec.transformer_class!r} is not supported; supported: {supported_transformers()}"
        )
    return spec


def check_spec_compatible(spec: LatentRewardSpec, model: FlowModel, *, source: str) -> None:
    """Raise :class:`LatentRewardLoadError` if ``spec`` was built for another family or transformer."""
    if spec.family != model.family:
        raise LatentRewardLoadError(
            f"{source}: latent reward was trained for family {spec.family!r}, but the model is family {model.family!r}"
        )
    class_name = type(model.transformer).__name__
    if spec.transformer_class != class_name:
        raise LatentRewardLoadError(
            f"{source}: latent reward reads a {spec.transformer_class} trunk, but the model's transformer is a "
            f"{class_name} (an image guide for a video model or the reverse)"
        )
    current = _plain_config(model.transformer.config)
    for key, value in spec.transformer_config.items():
        if key != "num_layers" and key in current and current[key] != value:
            raise LatentRewardLoadError(
                f"{source}: transformer config {key!r} is {value!r} in the latent reward but {current[key]!r} "
                "in the model"
            )
