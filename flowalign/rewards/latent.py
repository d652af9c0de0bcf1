"""A noise-aware latent reward model for Flow-NRG: reads (x_t, t, prompt), returns one score per dimension.

Architecture (docs/algorithms.md 1D; the paper's exact one is not published, this is our design):

    tokens, temb = trunk(x_t, t, c)          the base flow transformer's patch embedding, time/text
                                             embedding and first k blocks (a copy: frozen, LoRA or full)
    r_k(x_t, t, c) = MLP_k( mean_n silu(W_k LN(tokens_n)) + U_k LN(temb) )      one head per dimension

The trunk sees t (through the transformer's own timestep embedding) and the prompt (through its text
attention), so the reward is defined on noisy inputs. Per-dimension normalisation (mean, std) is stored
with the model; guidance uses r = sum_k w_k (r_k - mean_k) / std_k.

Family-specific code is one small entry per transformer class in :mod:`flowalign.rewards.latent_trunks`:
which modules form the embedding, where the blocks live, how to call them (SD3 and Wan 2.1 repeat the
forward up to block k; FLUX.1, FLUX.2, Qwen-Image, Z-Image, HunyuanVideo 1.5, LTX-2 and image-conditioned Wan
run the cut transformer through the family adapter's ``velocity``, which the model is bound to). It is not a
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
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowalign.files import atomic_write, atomic_write_json
from flowalign.models.base import FlowModel, PromptEmbeds
from flowalign.rewards.latent_spec import (
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    LatentRewardLoadError,
    LatentRewardSpec,
    check_dimensions,
    check_spec_compatible,
    check_stats,
    plain_config,
    read_spec,
    supported_transformers,
    trunk_spec,
)
from flowalign.rewards.latent_trunks import (
    AdapterTrunk,
    probe_unused,
    source_transformer,
    trunk_kind,
)

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "LatentRewardLoadError",
    "LatentRewardModel",
    "LatentRewardSpec",
    "supported_transformers",
]


class _Held:
    """The flow model an adapter trunk runs through, kept out of the module tree (never copied or saved)."""

    def __init__(self, model: FlowModel | None) -> None:
        self.model = model

    def __deepcopy__(self, memo: dict) -> _Held:
        return self


def _cut_trunk(
    transformer: nn.Module, class_name: str, num_blocks: int, *, copy_modules: bool, kind: str = "parts"
) -> nn.ModuleDict:
    spec = trunk_spec(class_name, kind)
    if isinstance(spec, AdapterTrunk):
        return nn.ModuleDict({"net": spec.cut(transformer, num_blocks, copy_modules=copy_modules)})
    take = copy.deepcopy if copy_modules else (lambda m: m)
    parts = {name: take(getattr(transformer, name)) for name in spec.embedders}
    parts["blocks"] = nn.ModuleList([take(b) for b in getattr(transformer, spec.blocks)[:num_blocks]])
    return nn.ModuleDict(parts)


# ---------------------------------------------------------------------------------------- heads
class _Head(nn.Module):
    """One dimension: token-wise projection, mean pool, plus the time/text embedding, then an MLP -> [B]."""

    def __init__(self, width: int, hidden: int, temb_width: int | None = None) -> None:
        super().__init__()
        self.token_proj = nn.Linear(width, hidden)
        self.temb_proj = nn.Linear(temb_width or width, hidden)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, tokens: Tensor, temb: Tensor) -> Tensor:
        pooled = F.silu(self.token_proj(tokens)).mean(dim=1)  # [B, H]
        return self.mlp(pooled + self.temb_proj(temb)).squeeze(-1)  # [B]


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
        spec.dimensions = check_dimensions(spec.dimensions)
        self._trunk_spec = trunk_spec(spec.transformer_class, spec.trunk)
        self.spec = spec
        self.trunk = trunk
        self._model = _Held(None)
        self._unused: list[str] | None = None
        cfg = spec.transformer_config
        if isinstance(self._trunk_spec, AdapterTrunk):
            width, temb_width = self._trunk_spec.widths(cfg)
        else:
            width = temb_width = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
        self.token_norm = nn.LayerNorm(width, elementwise_affine=False)
        self.temb_norm = nn.LayerNorm(temb_width, elementwise_affine=False)
        self.heads = nn.ModuleDict({d: _Head(width, spec.head_hidden, temb_width) for d in spec.dimensions})
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
        transformer = source_transformer(model)
        class_name, kind = type(transformer).__name__, trunk_kind(model)
        spec_t = trunk_spec(class_name, kind)
        total = len(getattr(transformer, spec_t.blocks))
        if not 1 <= num_blocks <= total:
            raise ValueError(
                f"latent reward: num_blocks must be in [1, {total}] for this transformer, got {num_blocks}"
            )
        spec = LatentRewardSpec(
            family=model.family,
            transformer_class=class_name,
            transformer_config=plain_config(transformer.config),
            num_blocks=num_blocks,
            dimensions=tuple(dimensions),
            head_hidden=head_hidden,
            trunk=kind,
        )
        trunk = _cut_trunk(transformer, class_name, num_blocks, copy_modules=True, kind=kind)
        devices = {p.device for p in trunk.parameters()}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = cls(spec, trunk)
        out.bind(model)
        return out.to(device=next(iter(devices)), dtype=transformer.dtype)

    @classmethod
    def from_spec(cls, spec: LatentRewardSpec, *, transformer_cls: type | None = None) -> LatentRewardModel:
        """A randomly initialised model with ``spec``'s architecture (weights are loaded afterwards)."""
        spec_t = trunk_spec(spec.transformer_class, spec.trunk)
        if transformer_cls is None:
            import diffusers

            transformer_cls = getattr(diffusers, spec.transformer_class)
        config = dict(spec.transformer_config)
        if isinstance(spec_t, AdapterTrunk):
            config.update(spec_t.layers(spec.num_blocks))
        else:
            config["num_layers"] = spec_t.layers_to_build(spec.num_blocks, int(config["num_layers"]))
        source = transformer_cls.from_config(config)
        trunk = _cut_trunk(
            source, spec.transformer_class, spec.num_blocks, copy_modules=False, kind=spec.trunk
        )
        return cls(spec, trunk)

    def set_attention_backend(self, backend: str) -> None:
        """diffusers' attention-backend switch (``ModelMixin.set_attention_backend``) on the trunk's attention."""
        from diffusers import ModelMixin

        ModelMixin.set_attention_backend(self, backend)

    def bind(self, model: FlowModel) -> None:
        """Run an adapter trunk through ``model``'s ``velocity`` (set by :meth:`from_flow_model` and
        :meth:`from_pretrained`; a parts trunk needs no model)."""
        self._model = _Held(model)

    def _bound(self) -> FlowModel:
        model = self._model.model
        if model is None:
            raise ValueError(
                f"latent reward: a {self.spec.transformer_class} trunk runs through its flow model; "
                "load it with LatentRewardModel.from_pretrained(folder, model=...)"
            )
        return model

    def _probed_unused(self) -> list[nn.Parameter]:
        if self._unused is None:
            self._unused = probe_unused(self.trunk["net"], self._trunk_spec, self._bound())
        named = dict(self.trunk["net"].named_parameters())
        return [named[name] for name in self._unused]

    def unused_parameters(self) -> list[nn.Parameter]:
        """Trunk parameters that cannot affect the scores (freeze them: DDP needs every trainable one used)."""
        if isinstance(self._trunk_spec, AdapterTrunk):
            return self._probed_unused()
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
        self.spec.normalisation = check_stats(stats, self.dimensions, "latent reward")

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
        if isinstance(self._trunk_spec, AdapterTrunk):
            tokens, temb = self._trunk_spec.forward(
                self.trunk["net"], self._bound(), x_t.to(dtype), t.to(dtype), cond
            )
        else:
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
        transformer_cls = type(source_transformer(model)) if model is not None else None
        out = cls.from_spec(spec, transformer_cls=transformer_cls)
        if model is not None:
            out.bind(model)
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
