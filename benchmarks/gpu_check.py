"""One GPU check: B1, B2, B4, B5 and the LoRA memory floor, each flowalign vs its baseline in one run.

    python benchmarks/gpu_check.py --out gpu-check                  # CUDA, real sizes, 480 s budget
    python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/c # every row on tiny configs (CPU)
    bash benchmarks/gpu_check.sh                                    # the same on a bare GPU machine

Rows (definitions in the performance notes, section 8; random weights at the real shapes, nothing
downloaded, text encoders and VAE skipped by feeding random latents and cached random embeddings):

- **B1** Flow-DPO step on an ``SD3Transformer2DModel`` with SD3.5-medium's transformer config
  (2.24B parameters, 24 blocks, width 1536, 13 dual-attention blocks), 1024x1024 latents (4,096 image
  + 333 text tokens), fp32 weights under bf16 autocast, fused AdamW, gradient clipping.
  ours: :class:`flowalign.training.methods.dpo.FlowDPO` (chosen and rejected in one forward, the
  reference = adapters disabled for LoRA, one frozen copy for a full fine-tune);
  baseline: the straightforward step (four forwards: policy and a deep-copied reference, each on
  chosen and rejected separately). LoRA r64 (2 pairs) and full fine-tune (1 pair). s/step,
  samples/s, FLOPs counted with ``FlopCounterMode`` over one step, MFU against the card's dense bf16
  peak, peak GB, and the loss of both at the same weights (parity). Then, at the end and if the budget
  allows, ours with regional ``torch.compile`` (each transformer block compiled on its own).
- **MEM** the LoRA Flow-DPO step at 1024x1024, 1 or 2 pairs, with and without gradient checkpointing,
  and with a bf16 frozen base: peak GB.
- **B2** CLIP ViT-H-14 (open_clip config, random weights, bf16) image-text scores: flowalign's batched
  tensor scorer vs per-image PIL preprocessing at batch 1 (``benchmarks/score.py``): images/s.
- **B4** sampling at 1024x1024, batch 1, bf16 weights: 28 Euler steps with CFG (flowalign's
  FlowPipeline vs diffusers' StableDiffusion3Pipeline on the same embeddings and noise), one step
  vs 28, and 28 steps with latent Flow-NRG guidance (a 2-block latent reward cut from the
  transformer, ``flowalign.sampling.nrg``) vs without: ms/image and the per-step overhead.
- **B5** CDT-small encode/decode frames/s vs diffusers' ``AutoencoderKLWan`` on the same clip
  (``benchmarks/cdt.py``).
- **GRPO** one Flow-GRPO step (LoRA, K SDE samples with CFG at 512x512, then the clipped surrogate and
  KL, forward and backward): a random window of 2 trained steps vs all 10 (``benchmarks/gpu_check_grpo.py``).

Every section is guarded: an exception fills its remaining rows with the error and the run goes on.
``--budget-s`` bounds the whole run: a section (or the compile rows) that would not fit in what is
left is skipped with a note. Rows are printed as they finish; ``--out`` receives ``gpu_check.json``
and ``gpu_check.md`` after every row, so a run stopped from outside still leaves its results.

The transformer is built directly on the target device (``torch.device`` as the default device while
the constructor runs) rather than on the meta device: the weights are initialised in place on the GPU
(no CPU initialisation of 2.24B parameters), and buffers computed in ``__init__`` (SD3's sin-cos
position table) stay correct, which an empty meta build followed by ``to_empty`` would leave
uninitialised.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from gpu_check_grpo import ROW as GRPO_ROW  # noqa: E402
from harness import interleaved, time_fn  # noqa: E402

# ------------------------------------------------------------------------------------------ settings

PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "B200": 2250.0,
}
"""Dense bf16 peak (TFLOP/s) by card name fragment; MFU is counted FLOPs / s / this peak."""


@dataclass(frozen=True)
class Settings:
    """Sizes of one run (``GPU`` for the real check, ``TINY`` for the CPU smoke run)."""

    size: str
    """Key of ``dpo_step.SIZES`` (the transformer config)."""
    resolution: int
    text_tokens: int
    lora_rank: int
    lora_pairs: int
    full_pairs: int
    train_steps: int
    train_warmup: int
    mem_steps: int
    clip_model: str
    score_images: int
    score_ref_images: int
    score_size: int
    score_batch: int
    score_repeats: int
    sample_steps: int
    sample_batch: int
    sample_repeats: int
    nrg_blocks: int
    cdt_preset: str
    cdt_frames: int
    cdt_size: int
    cdt_repeats: int
    compile_min_s: float
    """Budget that must be left to start the regional-compile rows."""


GPU = Settings(
    size="sd35m", resolution=1024, text_tokens=333, lora_rank=64, lora_pairs=2, full_pairs=1,
    train_steps=5, train_warmup=2, mem_steps=2,
    clip_model="ViT-H-14", score_images=256, score_ref_images=32, score_size=1024, score_batch=128,
    score_repeats=3,
    sample_steps=28, sample_batch=1, sample_repeats=3, nrg_blocks=2,
    cdt_preset="small", cdt_frames=17, cdt_size=256, cdt_repeats=3,
    compile_min_s=150.0,
)  # fmt: skip
TINY = Settings(
    size="tiny", resolution=128, text_tokens=8, lora_rank=4, lora_pairs=2, full_pairs=1,
    train_steps=2, train_warmup=1, mem_steps=1,
    clip_model="tiny", score_images=8, score_ref_images=4, score_size=64, score_batch=8, score_repeats=1,
    sample_steps=28, sample_batch=1, sample_repeats=1, nrg_blocks=1,
    cdt_preset="toy", cdt_frames=5, cdt_size=32, cdt_repeats=1,
    compile_min_s=0.0,
)  # fmt: skip

SECTIONS = ("b1", "mem", "b2", "b4", "b5", "grpo", "compile")
"""Run order: the eager rows first, the regional-compile rows (slowest to start) last."""

ROWS: dict[str, list[str]] = {
    "b1": ["B1 Flow-DPO LoRA r{rank}, eager", "B1 Flow-DPO full fine-tune, eager"],
    "mem": [
        "MEM LoRA, 1 pair, no checkpointing",
        "MEM LoRA, 1 pair, gradient checkpointing",
        "MEM LoRA, 2 pairs, gradient checkpointing",
        "MEM LoRA, 1 pair, checkpointing, bf16 frozen base",
    ],
    "b2": ["B2 CLIP {clip} scoring"],
    "b4": [
        "B4 {steps}-step sampling (CFG)",
        "B4 1-step vs {steps}-step",
        "B4 {steps}-step + latent Flow-NRG",
    ],
    "b5": ["B5 CDT encode vs Wan VAE", "B5 CDT decode vs Wan VAE"],
    "grpo": [GRPO_ROW],
    "compile": [
        "B1 Flow-DPO LoRA r{rank}, regional compile",
        "B1 Flow-DPO full fine-tune, regional compile",
    ],
}


# -------------------------------------------------------------------------------------- rows, report


@dataclass
class Row:
    """One line of the table: flowalign's number, the baseline's, their ratio and the target."""

    section: str
    name: str
    unit: str = ""
    ours: float | None = None
    baseline: float | None = None
    ratio: float | None = None
    ratio_is: str = ""
    """What ``ratio`` divides (e.g. "baseline / ours", > 1 = flowalign faster)."""
    target: str = ""
    met: bool | None = None
    details: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"
    """"ok", "error" or "skipped"."""
    error: str = ""


class Skipped(Exception):
    """A section or row left out because the time budget would not cover it."""


class Budget:
    """Wall-clock budget of the whole run."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def need(self, seconds: float, what: str) -> None:
        """Raise :class:`Skipped` when less than ``seconds`` are left."""
        if self.left() < seconds:
            raise Skipped(f"{what}: needs ~{seconds:.0f} s, {max(0.0, self.left()):.0f} s of the budget left")


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if value == 0 or 0.01 <= abs(value) < 1e5:
        text = f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    else:
        text = f"{value:.2e}"
    return f"{text} {unit}".strip()


def _details_text(details: dict[str, Any]) -> str:
    parts = []
    for key, value in details.items():
        if isinstance(value, float):
            value = _fmt(value)
        parts.append(f"{key}={value}")
    return ", ".join(parts)


class Report:
    """Collects rows, prints each as it lands and rewrites the JSON/markdown files every time."""

    def __init__(self, header: dict[str, Any], out: Path | None, budget: Budget) -> None:
        self.header = header
        self.rows: list[Row] = []
        self.out = out
        self.budget = budget
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        state = "" if row.status == "ok" else f"[{row.status}] {row.error}"
        print(
            f"[{self.budget.elapsed():6.1f} s] {row.name}: ours {_fmt(row.ours, row.unit)}, "
            f"baseline {_fmt(row.baseline, row.unit)}, ratio {_fmt(row.ratio)} {state}".rstrip(),
            flush=True,
        )
        self.write()

    def has(self, name: str) -> bool:
        return any(r.name == name for r in self.rows)

    def table(self) -> str:
        head = ["section", "row", "flowalign", "baseline", "ratio", "target", "details"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            ratio = "-" if r.ratio is None else f"{_fmt(r.ratio)} ({r.ratio_is})"
            target = r.target + ("" if r.met is None else (" met" if r.met else " NOT met"))
            details = _details_text(r.details) if r.status == "ok" else f"{r.status.upper()}: {r.error}"
            cells = [
                r.section,
                r.name,
                _fmt(r.ours, r.unit),
                _fmt(r.baseline, r.unit),
                ratio,
                target,
                details,
            ]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        return "\n".join(lines)

    def write(self) -> None:
        if self.out is None:
            return
        data = {
            **self.header,
            "elapsed_s": round(self.budget.elapsed(), 1),
            "rows": [asdict(r) for r in self.rows],
        }
        (self.out / "gpu_check.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
        head = "\n".join(f"- {k}: {v}" for k, v in self.header.items())
        (self.out / "gpu_check.md").write_text(
            f"# flowalign GPU check\n\n{head}\n- elapsed: {self.budget.elapsed():.0f} s\n\n{self.table()}\n"
        )


# ------------------------------------------------------------------------------------------- helpers


@dataclass
class Env:
    device: torch.device
    dtype: torch.dtype
    """Compute dtype: autocast dtype for training, weight dtype for inference."""
    s: Settings
    budget: Budget
    compile_backend: str
    peak_tflops: float | None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def sync(self) -> Callable[[], None] | None:
        return torch.cuda.synchronize if self.cuda else None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float | None:
        """CUDA max allocated since the last reset (GiB); None on CPU (no per-phase peak there)."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**30
        return None


def cleanup(env: Env | None = None) -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_tflops_for(name: str) -> float | None:
    for fragment, peak in PEAK_BF16_TFLOPS.items():
        if fragment in name:
            return peak
    return None


def sd3_forward_flops(cfg: dict, n_img: int, n_txt: int) -> float:
    """Model FLOPs of one SD3 MMDiT forward per sample (performance notes, section 5):

    2 [12 D^2 N L + 4 D^2 N_img L_dual] + 4 N^2 D L + 4 N_img^2 D L_dual,  N = N_img + N_txt,
    with D the width, L the blocks, L_dual the dual-attention blocks (adaLN and embeddings left out).
    """
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    layers = cfg["num_layers"]
    dual = len(cfg.get("dual_attention_layers") or ())
    n = n_img + n_txt
    linear = 2 * (12 * d * d * n * layers + 4 * d * d * n_img * dual)
    attention = 4 * n * n * d * layers + 4 * n_img * n_img * d * dual
    return float(linear + attention)


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call of ``fn`` as counted by ``torch.utils.flop_counter.FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _set_dynamo_limits() -> None:
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))


@contextlib.contextmanager
def blocks_compiled(net: torch.nn.Module, backend: str):
    """Regional compile: each transformer block wrapped by ``torch.compile`` on its own, restored on exit."""
    _set_dynamo_limits()
    originals = list(net.transformer_blocks)
    for i, block in enumerate(originals):
        net.transformer_blocks[i] = torch.compile(block, backend=backend)
    try:
        yield net
    finally:
        for i, block in enumerate(originals):
            net.transformer_blocks[i] = block


# ----------------------------------------------------------------------------- models without text


def build_transformer(cfg: dict, device: torch.device, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """``SD3Transformer2DModel(**cfg)`` with random weights, built directly on ``device``."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    with torch.device(device):
        net = SD3Transformer2DModel(**cfg)
    return net if dtype == torch.float32 else net.to(dtype=dtype)


def build_model(env: Env, *, weights_dtype: torch.dtype = torch.float32, seed: int = 0):
    """An :class:`~flowalign.models.sd3.SD3Model` around the benchmark transformer, prompts -> random embeddings."""
    from dpo_step import SIZES

    from flowalign.models.base import PromptEmbeds
    from flowalign.models.sd3 import SD3Model
    from flowalign.models.tiny import tiny_sd3_pipeline

    cfg = dict(SIZES[env.s.size])
    text_tokens = env.s.text_tokens

    class RandomTextSD3(SD3Model):
        """SD3 whose prompt encoder returns fixed random embeddings per prompt (text encoders skipped)."""

        _cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def _embed(self, prompts: list[str]) -> PromptEmbeds:
            rows = []
            for p in prompts:
                if p not in self._cache:
                    g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
                    e = torch.randn(text_tokens, cfg["joint_attention_dim"], generator=g)
                    pooled = torch.randn(cfg["pooled_projection_dim"], generator=g)
                    dtype = self.transformer.dtype
                    self._cache[p] = (e.to(self.device, dtype), pooled.to(self.device, dtype))
                rows.append(self._cache[p])
            return PromptEmbeds(
                embeds=torch.stack([r[0] for r in rows]), pooled=torch.stack([r[1] for r in rows])
            )

        def encode_prompt(self, prompts, *, negative_prompts=None, with_uncond=False):
            cond = self._embed(list(prompts))
            uncond = None
            if with_uncond:
                uncond = self._embed(list(negative_prompts or [""] * len(prompts)))
            return cond, uncond

    pipe = tiny_sd3_pipeline(0)  # scheduler and (unused) tiny text encoders and VAE
    pipe.transformer = build_transformer(cfg, env.device, seed=seed, dtype=weights_dtype)
    model = RandomTextSD3(pipe)
    model.to(device=env.device)
    return model


def _strip_lora(net: torch.nn.Module) -> torch.nn.Module:
    """Replace every peft LoRA layer of ``net`` by its base layer (no merge): the frozen base model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in [(n, m) for n, m in net.named_modules() if isinstance(m, BaseTunerLayer)]:
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, child, module.get_base_layer())
    return net


# --------------------------------------------------------------------------------------------- B1


@dataclass
class DPOBench:
    """A Flow-DPO setup: flowalign's method and step, and the straightforward step on the same net."""

    env: Env
    model: Any
    method: Any
    params: list
    opt: Any
    batch: dict
    pairs: int
    lora: bool
    autocast_dtype: torch.dtype
    reference: torch.nn.Module | None = None
    """The baseline's frozen full copy (built by :meth:`make_baseline_reference`)."""
    step_index: int = 0

    @property
    def net(self) -> torch.nn.Module:
        return self.model.transformer

    def ctx(self, step: int | None = None):
        from flowalign.training.method import StepContext

        if step is None:
            step, self.step_index = self.step_index, self.step_index + 1
        mp = "no" if self.env.dtype == torch.float32 else "bf16"
        return StepContext(
            step=step, seed=0, device=self.env.device, mixed_precision=mp, modules={"transformer": self.net}
        )

    def _update(self, loss: torch.Tensor) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def autocast(self):
        dtype = self.autocast_dtype
        return torch.autocast(self.env.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def ours_step(self) -> None:
        with self.autocast():
            loss, _ = self.method.compute_loss(self.batch, self.ctx(), "main")
        self._update(loss)

    def make_baseline_reference(self) -> None:
        if self.lora:
            self.reference = _strip_lora(copy.deepcopy(self.net)).requires_grad_(False).eval()
        else:
            self.reference = self.method.reference.copy

    def baseline_loss(self, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Four forwards: policy and reference, each on chosen and on rejected separately."""
        from flowalign.flow import interpolate, velocity_target

        beta = self.method.config.beta
        cond, _ = self.model.encode_prompt(list(self.batch["prompt"]))
        errors = []
        for x0 in (self.batch["latents_w"], self.batch["latents_l"]):
            x_t, target = interpolate(x0, noise, t), velocity_target(x0, noise).float()
            with self.autocast():
                e = (self.model.velocity(x_t, t, cond, net=self.net).float() - target).pow(2)
                with torch.no_grad():
                    r = (self.model.velocity(x_t, t, cond, net=self.reference).float() - target).pow(2)
            errors.append((e.mean(dim=(1, 2, 3)), r.mean(dim=(1, 2, 3))))
        (e_w, r_w), (e_l, r_l) = errors
        return F.softplus(0.5 * beta * ((e_w - r_w) - (e_l - r_l))).mean()

    def baseline_step(self) -> None:
        shape = self.batch["latents_w"].shape
        noise = torch.randn(shape, device=self.env.device)
        t = torch.sigmoid(torch.randn(shape[0], device=self.env.device))  # logit-normal t
        self._update(self.baseline_loss(noise, t))

    def parity(self) -> float:
        """|loss ours - loss baseline| at the current weights on the same noise and t."""
        from flowalign.training.methods.common import sample_training_t

        ctx = self.ctx(step=10_000)
        ids = self.batch["index"]
        with torch.no_grad():
            with self.autocast():
                ours, _ = self.method.compute_loss(self.batch, ctx, "main")
            ctx = self.ctx(step=10_000)
            noise = ctx.randn_like(self.batch["latents_w"], ids, key="noise")
            t = sample_training_t(self.method.config.time, ids, ctx)
            base = self.baseline_loss(noise, t)
        return abs(float(ours) - float(base))


def dpo_bench(
    env: Env, *, lora: bool, pairs: int, weights_dtype: torch.dtype = torch.float32, lr: float = 1e-4
) -> DPOBench:
    from flowalign.config import LoraConfig, OptimConfig
    from flowalign.training.methods.dpo import DPOConfig, FlowDPO
    from flowalign.training.optim import build_optimizer

    model = build_model(env, weights_dtype=weights_dtype)
    lora_cfg = LoraConfig(rank=env.s.lora_rank, alpha=float(env.s.lora_rank)) if lora else None
    method = FlowDPO(model, DPOConfig(beta=500.0), lora=lora_cfg)
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    if weights_dtype != torch.float32:  # trainable LoRA weights stay fp32 over a low-precision frozen base
        for p in params:
            p.data = p.data.float()
    opt = build_optimizer(params, OptimConfig(lr=lr), device=env.device)
    latent = env.s.resolution // 8
    g = torch.Generator().manual_seed(1)
    c = model.transformer.config.in_channels
    batch = {
        "latents_w": torch.randn(pairs, c, latent, latent, generator=g).to(env.device),
        "latents_l": torch.randn(pairs, c, latent, latent, generator=g).to(env.device),
        "prompt": [f"benchmark prompt {i}" for i in range(pairs)],
        "index": torch.arange(pairs),
    }
    # a low-precision base runs under autocast in that precision (also on CPU, where fp32 is the default)
    autocast_dtype = env.dtype if weights_dtype == torch.float32 else weights_dtype
    return DPOBench(env, model, method, params, opt, batch, pairs, lora, autocast_dtype)


def _b1_labels(s: Settings) -> dict[bool, tuple[str, str]]:
    return {
        True: (ROWS["b1"][0].format(rank=s.lora_rank), ROWS["compile"][0].format(rank=s.lora_rank)),
        False: (ROWS["b1"][1], ROWS["compile"][1]),
    }


def _step_metrics(env: Env, seconds: float, flops: float | None, samples: int) -> dict[str, Any]:
    out: dict[str, Any] = {"samples/s": samples / seconds}
    if flops:
        out["TFLOP/step"] = flops / 1e12
        out["TFLOP/s"] = flops / seconds / 1e12
        if env.peak_tflops:
            out["MFU"] = flops / seconds / 1e12 / env.peak_tflops
    return out


def section_b1(env: Env, report: Report, state: dict) -> None:
    s = env.s
    from dpo_step import SIZES

    cfg = SIZES[s.size]
    n_img = (s.resolution // 8 // cfg["patch_size"]) ** 2
    per_sample = sd3_forward_flops(cfg, n_img, s.text_tokens)
    for lora, pairs in ((True, s.lora_pairs), (False, s.full_pairs)):
        name = _b1_labels(s)[lora][0]
        env.budget.need(25 if env.cuda else 1, name)
        try:
            bench = dpo_bench(env, lora=lora, pairs=pairs)
            flops_ours = count_flops(bench.ours_step)
            env.reset_peak()
            ours = time_fn(
                "ours", bench.ours_step, repeats=s.train_steps, warmup=s.train_warmup, sync=env.sync
            )
            peak_ours = env.peak_gb()
            bench.make_baseline_reference()
            diff = bench.parity()
            flops_base = count_flops(bench.baseline_step)
            env.reset_peak()
            base = time_fn(
                "baseline", bench.baseline_step, repeats=s.train_steps, warmup=s.train_warmup, sync=env.sync
            )
            peak_base = env.peak_gb()
            m_ours = _step_metrics(env, ours.median, flops_ours, 2 * pairs)
            m_base = _step_metrics(env, base.median, flops_base, 2 * pairs)
            state[f"b1_baseline_s_{lora}"] = base.median
            state[f"b1_flops_{lora}"] = flops_ours
            details = {
                "pairs": pairs,
                "samples/s ours": m_ours["samples/s"],
                "samples/s base": m_base["samples/s"],
                "TFLOP/step counted": m_ours.get("TFLOP/step"),
                "model TFLOP/step": (8 if not lora else 6) * pairs * per_sample / 1e12,
                "MFU ours": m_ours.get("MFU"),
                "MFU base": m_base.get("MFU"),
                "peak GB ours": peak_ours,
                "peak GB base": peak_base,
                "loss diff": diff,
            }
            mfu = m_ours.get("MFU")
            report.add(
                Row(
                    "B1", name, "s/step", ours.median, base.median, base.median / ours.median,
                    "baseline / ours", "MFU >= 55%", None if mfu is None else mfu >= 0.55,
                    {k: v for k, v in details.items() if v is not None},
                )
            )  # fmt: skip
        finally:
            bench = None  # noqa: F841
            cleanup()


def section_compile(env: Env, report: Report, state: dict) -> None:
    s = env.s
    for lora, pairs in ((True, s.lora_pairs), (False, s.full_pairs)):
        name = _b1_labels(s)[lora][1]
        env.budget.need(s.compile_min_s if lora else s.compile_min_s * 0.7, name)
        try:
            bench = dpo_bench(env, lora=lora, pairs=pairs)
            nets = [bench.net]  # LoRA: the reference is the same net with its adapters off
            if bench.method.reference.copy is not None:  # full fine-tune: the frozen copy too
                nets.append(bench.method.reference.copy)
            with contextlib.ExitStack() as stack:
                for net in nets:
                    stack.enter_context(blocks_compiled(net, env.compile_backend))
                start = time.perf_counter()
                bench.ours_step()  # compiles forward and backward of each distinct block kind
                if env.sync:
                    env.sync()
                compile_s = time.perf_counter() - start
                env.reset_peak()
                ours = time_fn(
                    "ours compiled", bench.ours_step, repeats=s.train_steps, warmup=1, sync=env.sync
                )
                peak = env.peak_gb()
            base_s = state.get(f"b1_baseline_s_{lora}")
            flops = state.get(f"b1_flops_{lora}")
            m = _step_metrics(env, ours.median, flops, 2 * pairs)
            details = {
                "pairs": pairs,
                "compile s": compile_s,
                "backend": env.compile_backend,
                "samples/s": m["samples/s"],
                "MFU": m.get("MFU"),
                "peak GB": peak,
            }
            mfu = m.get("MFU")
            report.add(
                Row(
                    "B1", name, "s/step", ours.median, base_s, None if base_s is None else base_s / ours.median,
                    "eager baseline / ours compiled", "MFU >= 55%", None if mfu is None else mfu >= 0.55,
                    {k: v for k, v in details.items() if v is not None},
                )
            )  # fmt: skip
        finally:
            bench = None  # noqa: F841
            if hasattr(torch, "_dynamo"):
                torch._dynamo.reset()
            cleanup()


# -------------------------------------------------------------------------------------------- MEM


def section_mem(env: Env, report: Report, state: dict) -> None:
    s = env.s
    names = ROWS["mem"]
    options = [
        (names[0], 1, False, torch.float32),
        (names[1], 1, True, torch.float32),
        (names[2], 2, True, torch.float32),
        (names[3], 1, True, torch.bfloat16),
    ]
    reference_peak = None
    bench = None
    for name, pairs, checkpointing, weights_dtype in options:
        env.budget.need(15 if env.cuda else 1, name)
        if bench is None or bench.pairs != pairs or bench.net.dtype != weights_dtype:
            bench = None
            cleanup()
            bench = dpo_bench(env, lora=True, pairs=pairs, weights_dtype=weights_dtype)
        if checkpointing:
            bench.net.enable_gradient_checkpointing()
        else:
            bench.net.disable_gradient_checkpointing()
        env.reset_peak()
        timing = time_fn(name, bench.ours_step, repeats=s.mem_steps, warmup=1, sync=env.sync)
        peak = env.peak_gb()
        if reference_peak is None:
            reference_peak = peak
        details = {"s/step": timing.median, "samples/s": 2 * pairs / timing.median}
        if weights_dtype != torch.float32:
            details["note"] = "bf16 frozen base (not a training-loop option yet)"
        report.add(
            Row(
                "MEM", name, "GB", peak, reference_peak,
                None if peak is None or reference_peak is None else reference_peak / peak,
                "no-checkpointing peak / this peak", "<= 24 GB", None if peak is None else peak <= 24.0,
                details,
            )
        )  # fmt: skip
    bench = None
    cleanup()


# --------------------------------------------------------------------------------------------- B2


def section_b2(env: Env, report: Report, state: dict) -> None:
    from PIL import Image
    from score import TINY_CFG, _reference_scores

    from flowalign.rewards.backbones import load_open_clip
    from flowalign.rewards.clip import ClipSimilarityReward

    s = env.s
    name = ROWS["b2"][0].format(clip=s.clip_model)
    env.budget.need(30 if env.cuda else 1, name)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_name = s.clip_model
        if model_name == "tiny":
            (Path(tmp) / "open_clip_config.json").write_text(json.dumps(TINY_CFG))
            model_name = f"local-dir:{tmp}"
        # built on the GPU (random init there is fast), moved back by open_clip, then placed by load_open_clip
        with torch.device(env.device) if env.cuda else contextlib.nullcontext():
            backbone = load_open_clip(model_name, device=env.device, dtype=env.dtype, allow_random=True)
    reward = ClipSimilarityReward(backbone, name="cos", similarity="cosine", batch_size=s.score_batch)
    g = torch.Generator(env.device).manual_seed(0)
    shape = (s.score_images, 3, s.score_size, s.score_size)
    u8 = torch.randint(0, 256, shape, generator=g, device=env.device, dtype=torch.uint8)
    media = u8.float() / 255  # generated images arrive as float tensors on the device
    prompts = [f"prompt {i % 24}: a photo of something" for i in range(s.score_images)]  # GRPO groups of 24
    n_ref = s.score_ref_images
    pils = [Image.fromarray(img.permute(1, 2, 0).cpu().numpy()) for img in u8[:n_ref]]
    del u8

    def ours():
        reward.clear_text_cache()
        return reward.score(media, prompts)["cos"]

    def baseline():
        return _reference_scores(backbone, pils, prompts[:n_ref], env.device, env.dtype)

    t_ours = time_fn("ours", ours, repeats=s.score_repeats, warmup=1, sync=env.sync)
    t_base = time_fn("baseline", baseline, repeats=1, warmup=1, sync=env.sync)
    got, ref = ours()[:n_ref].float().cpu(), baseline().float().cpu()
    rate_ours, rate_base = s.score_images / t_ours.median, n_ref / t_base.median
    report.add(
        Row(
            "B2", name, "img/s", rate_ours, rate_base, rate_ours / rate_base, "ours / baseline",
            ">= 1500 img/s", rate_ours >= 1500 if env.cuda else None,
            {
                "images": s.score_images, "baseline images": n_ref, "size": s.score_size,
                "batch": s.score_batch, "max score diff": float((got - ref).abs().max()),
                "params M": sum(p.numel() for p in backbone.parameters()) / 1e6,
            },
        )
    )  # fmt: skip


# --------------------------------------------------------------------------------------------- B4


def section_b4(env: Env, report: Report, state: dict) -> None:
    from flowalign.pipelines import FlowPipeline
    from flowalign.rewards.latent import LatentRewardModel
    from flowalign.sampling.nrg import latent_reward_guidance

    s = env.s
    names = [n.format(steps=s.sample_steps) for n in ROWS["b4"]]
    env.budget.need(40 if env.cuda else 1, names[0])
    model = build_model(env, weights_dtype=env.dtype)
    model.transformer.eval().requires_grad_(False)
    guide = LatentRewardModel.from_flow_model(model, dimensions=("vq", "ta"), num_blocks=s.nrg_blocks)
    guide = guide.eval().requires_grad_(False)
    prompts = [f"a benchmark prompt {i}" for i in range(s.sample_batch)]
    nrg = latent_reward_guidance(model, guide, prompts, {"vq": 0.5, "ta": 1.0}, strength=1.0)
    side = s.resolution
    noise = model.prepare_noise(
        s.sample_batch, height=side, width=side, generator=torch.Generator().manual_seed(0)
    ).to(env.device, env.dtype)
    pipe = FlowPipeline(model)
    cfg_scale = 4.5
    kwargs = dict(height=side, width=side, output_type="latent")
    cond, uncond = model.encode_prompt(prompts, with_uncond=True)

    def ours(steps=s.sample_steps, transforms=None):
        return pipe(prompts, latents=noise, num_inference_steps=steps, guidance_scale=cfg_scale,
                    velocity_transforms=transforms, **kwargs).latents  # fmt: skip

    def one_step():
        return pipe(prompts, latents=noise, one_step=True, guidance_scale=1.0, **kwargs).latents

    def diffusers_pipe():
        with torch.no_grad():
            return model.pipe(
                prompt_embeds=cond.embeds, pooled_prompt_embeds=cond.pooled,
                negative_prompt_embeds=uncond.embeds, negative_pooled_prompt_embeds=uncond.pooled,
                latents=noise, num_inference_steps=s.sample_steps, guidance_scale=cfg_scale,
                height=side, width=side, output_type="latent",
            ).images  # fmt: skip

    runs = {"ours": ours, "diffusers": diffusers_pipe, "nrg": lambda: ours(transforms=[nrg]), "one": one_step}
    env.reset_peak()
    times = interleaved(runs, repeats=s.sample_repeats, warmup=1, sync=env.sync)
    peak = env.peak_gb()
    max_diff = float((ours().float() - diffusers_pipe().float()).abs().max())
    ms = {k: 1000 * v.median / s.sample_batch for k, v in times.items()}
    steps = s.sample_steps
    per_step = {k: ms[k] / steps for k in ("ours", "diffusers", "nrg")}
    common = {"batch": s.sample_batch, "side": side}
    if peak is not None:
        common["peak GB"] = peak
    report.add(
        Row(
            "B4", names[0], "ms/img", ms["ours"], ms["diffusers"], ms["diffusers"] / ms["ours"],
            "diffusers / ours", "", None,
            {**common, "ms/step ours": per_step["ours"], "ms/step diffusers": per_step["diffusers"],
             "max latent diff": max_diff},
        )
    )  # fmt: skip
    speedup = ms["ours"] / ms["one"]
    report.add(
        Row(
            "B4", names[1], "ms/img", ms["one"], ms["ours"], speedup, f"{steps}-step / 1-step",
            ">= 25x", speedup >= 25, {**common, "forwards": f"1 vs {2 * steps} (CFG)"},
        )
    )  # fmt: skip
    overhead = per_step["nrg"] / per_step["ours"] - 1
    report.add(
        Row(
            "B4", names[2], "ms/step", per_step["nrg"], per_step["ours"], per_step["nrg"] / per_step["ours"],
            "guided / unguided", "<= 40% overhead", overhead <= 0.40,
            {**common, "overhead": f"{100 * overhead:.1f}%", "trunk blocks": s.nrg_blocks},
        )
    )  # fmt: skip


# --------------------------------------------------------------------------------------------- B5


def section_b5(env: Env, report: Report, state: dict) -> None:
    import io

    import cdt as cdt_bench

    s = env.s
    names = ROWS["b5"]
    env.budget.need(30 if env.cuda else 1, names[0])
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[env.dtype]
    args = SimpleNamespace(
        device=str(env.device), dtype=dtype_name, preset=s.cdt_preset, batch=1, frames=s.cdt_frames,
        size=s.cdt_size, repeats=s.cdt_repeats, chunk_latents=None,
    )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        result = cdt_bench.speed(args)
    fps = result["frames_per_s"]
    common = {
        "clip": "x".join(map(str, result["shape"])),
        "params M cdt": result["params"]["cdt"] / 1e6,
        "params M wan": result["params"]["wan"] / 1e6,
    }
    for name, ours_key, base_key, target in (
        (names[0], "cdt encode", "wan encode", ""),
        (names[1], "cdt decode (1 step)", "wan decode", "faster than Wan"),
    ):
        ratio = fps[ours_key] / fps[base_key]
        report.add(
            Row(
                "B5", name, "frames/s", fps[ours_key], fps[base_key], ratio, "ours / Wan", target,
                (ratio > 1) if target else None, common,
            )
        )  # fmt: skip
    cleanup()


def section_grpo(env: Env, report: Report, state: dict) -> None:
    """The GRPO row (``benchmarks/gpu_check_grpo.py``)."""
    import gpu_check_grpo

    gpu_check_grpo.section_grpo(env, report, state, build_model=build_model, row_cls=Row)


SECTION_FNS = {
    "b1": section_b1,
    "mem": section_mem,
    "b2": section_b2,
    "b4": section_b4,
    "b5": section_b5,
    "grpo": section_grpo,
    "compile": section_compile,
}


def row_names(section: str, s: Settings) -> list[str]:
    return [n.format(rank=s.lora_rank, clip=s.clip_model, steps=s.sample_steps) for n in ROWS[section]]


def run_section(section: str, env: Env, report: Report, state: dict) -> None:
    """Run one section; rows it did not add are filled with its error or skip note."""
    status, message = "ok", ""
    try:
        SECTION_FNS[section](env, report, state)
    except Skipped as skip:
        status, message = "skipped", str(skip)
    except Exception as err:  # guarded: report the error in the row and carry on
        status, message = "error", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        traceback.print_exc()
    finally:
        cleanup()
    for name in row_names(section, env.s):
        if not report.has(name):
            if status == "ok":
                status, message = "error", "row not produced"
            report.add(
                Row(section.upper() if section != "compile" else "B1", name, status=status, error=message)
            )


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny configs (the CPU smoke run)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole run")
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}"
    )
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA")
    parser.add_argument(
        "--compile-backend",
        default=None,
        help="default: inductor on CUDA, eager (dynamo tracing only) on CPU",
    )
    parser.add_argument("--no-compile", action="store_true", help="leave out the regional-compile rows")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a row errored")
    args = parser.parse_args(argv)
    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    args.sections = [x for x in SECTIONS if x in sections and not (x == "compile" and args.no_compile)]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    budget = Budget(args.budget_s)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False (use --device cpu --tiny)")
    settings = TINY if args.tiny else GPU
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    name = device_name(device)
    peak = args.peak_tflops or (peak_tflops_for(name) if device.type == "cuda" else None)
    env = Env(
        device=device, dtype=dtype, s=settings, budget=budget,
        compile_backend=args.compile_backend or ("inductor" if device.type == "cuda" else "eager"),
        peak_tflops=peak,
    )  # fmt: skip
    import diffusers
    import open_clip

    header = {
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "open_clip": getattr(open_clip, "__version__", "?"),
        "python": platform.python_version(),
        "settings": "tiny" if args.tiny else "real sizes",
        "dtype": str(dtype).replace("torch.", ""),
        "peak bf16 TFLOP/s (MFU denominator)": peak,
        "budget_s": args.budget_s,
    }
    print(f"flowalign GPU check on {name} (torch {torch.__version__}, CUDA {torch.version.cuda})", flush=True)
    print(f"settings: {header['settings']}, {header['dtype']}, budget {args.budget_s:.0f} s", flush=True)
    report = Report(header, args.out, budget)
    state: dict[str, Any] = {}
    for section in args.sections:
        run_section(section, env, report, state)
    print(f"\n## flowalign GPU check: {name}, {budget.elapsed():.0f} s of {args.budget_s:.0f} s\n")
    print(report.table())
    report.write()
    errors = [r.name for r in report.rows if r.status == "error"]
    return 1 if (args.strict and errors) else 0


if __name__ == "__main__":
    sys.exit(main())
