"""``flowalign demo``: the toy world end to end on a fresh machine with nothing downloaded.

Stages (each writes its part of ``summary.json`` / ``summary.md`` / ``index.html`` as soon as it ends,
so an interrupted demo keeps what it finished):

- ``base``: train (or reuse from the cache) the toy image base model with flow-matching SFT, sample
  the held-out prompts at fixed seeds and score them with the exact oracles;
- ``dpo``: build preference pairs from the base model's own samples ranked by the oracle reward,
  fine-tune with Flow-DPO (LoRA), and evaluate on the same held-out prompts and seeds.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from flowalign.data.media import save_image
from flowalign.evals.grid import image_grid, upscale_nearest
from flowalign.experiments.toy_base import ToyBaseRecipe, ToyEvaluation, evaluate_toy, toy_base_model

DIMENSIONS = ("ta", "vq", "ta_shape", "ta_colour", "ta_size", "ta_position", "all_correct")
LABELS = {
    "ta": "text alignment",
    "vq": "visual quality",
    "ta_shape": "shape right",
    "ta_colour": "colour right",
    "ta_size": "size right",
    "ta_position": "position right",
    "all_correct": "all four right",
}


@dataclass
class DemoConfig:
    """Settings of the demo (the defaults fit in about ten minutes on two CPU cores)."""

    out_dir: Path = Path("runs/demo")
    stages: tuple[str, ...] = ("base",)
    """"base" (about 6 minutes on 2 CPU cores with a fresh cache), optionally "dpo" (about 3 more) and
    "onestep" (f-distill and Diff-Instruct* on the toy teacher, about 7 more)."""
    base_steps: int = 900
    """Flow-matching steps of the demo's toy base model. The experiment tables in docs/results.md use the
    1,500-step base (``ToyBaseRecipe()``); the demo trains a shorter one so that a fresh machine
    finishes within ten minutes. Each step count is cached separately."""
    num_samples: int = 256
    """Held-out samples per evaluated model (sample i uses seed 1000 + i for every model)."""
    guidance_scale: float = 3.0
    num_inference_steps: int = 20
    dpo_prompts: int = 320
    """Training prompts used to build DPO pairs (4 candidates each)."""
    dpo_steps: int = 300
    dpo_beta: float = 5000.0
    dpo_lr: float = 3e-4
    dpo_baseline_guidance: float | None = 4.0
    """The dpo stage also evaluates the base at this guidance scale: more guidance buys text alignment
    with visual quality, so this is the trade-off Flow-DPO has to beat (None skips it)."""
    nrg_strength: float = 1.0
    """Flow-NRG guidance strength w of the "nrg" stage."""
    nrg_counterfactual_pairs: int = 1024
    """Rendered (true vs wrong shape/colour) pairs added to the latent reward's training pairs."""


STAGES = ("base", "dpo", "nrg", "onestep")


class DemoReport:
    """Accumulates stage results and rewrites summary.json, summary.md and index.html after each."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.rows: dict[str, dict] = {}
        self.notes: list[str] = []
        self.grids: dict[str, str] = {}

    def add(self, name: str, evaluation: ToyEvaluation, *, seconds: float, note: str = "") -> None:
        self.rows[name] = {"summary": evaluation.summary(), "seconds": round(seconds, 1)}
        grid = upscale_nearest(image_grid(evaluation.media[:64], nrow=8), 3)
        file = f"grid_{name}.png"
        save_image(grid, self.out_dir / file)
        self.grids[name] = file
        if note:
            self.notes.append(f"{name}: {note}")
        self.write()

    def table_md(self) -> str:
        header = "| model | " + " | ".join(LABELS[d] for d in DIMENSIONS) + " |"
        lines = [header, "|---" * (len(DIMENSIONS) + 1) + "|"]
        for name, row in self.rows.items():
            cells = [f"{row['summary'][d]['mean']:.3f} ± {row['summary'][d]['se']:.3f}" for d in DIMENSIONS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def write(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "summary.json").write_text(
            json.dumps({"models": self.rows, "notes": self.notes}, indent=2)
        )
        n = next(iter(self.rows.values()))["summary"]["ta"]["n"] if self.rows else 0
        md = [
            "# flowalign toy demo",
            "",
            f"Held-out prompts, {n} samples per model at the same seeds; mean ± standard error of the exact oracles.",
            "",
            self.table_md(),
            "",
            *[f"- {note}" for note in self.notes],
            "",
            *[f"![{name}]({file})" for name, file in self.grids.items()],
        ]
        (self.out_dir / "summary.md").write_text("\n".join(md) + "\n")
        rows_html = "".join(
            "<tr><td>"
            + html.escape(name)
            + "</td>"
            + "".join(
                f"<td>{r['summary'][d]['mean']:.3f} ± {r['summary'][d]['se']:.3f}</td>" for d in DIMENSIONS
            )
            + "</tr>"
            for name, r in self.rows.items()
        )
        grids_html = "".join(
            f"<figure><img src='{file}' alt='{html.escape(name)}'><figcaption>{html.escape(name)}</figcaption></figure>"
            for name, file in self.grids.items()
        )
        page = (
            "<!doctype html><meta charset='utf-8'><title>flowalign toy demo</title>"
            "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 8px;border-bottom:1px solid #ddd}"
            "figure{display:inline-block;margin:1em}img{image-rendering:pixelated}</style>"
            "<h1>flowalign toy demo</h1><p>Held-out prompts; mean ± standard error of the exact oracles.</p>"
            "<table><tr><th>model</th>"
            + "".join(f"<th>{LABELS[d]}</th>" for d in DIMENSIONS)
            + "</tr>"
            + rows_html
            + "</table>"
            + "".join(f"<p>{html.escape(note)}</p>" for note in self.notes)
            + grids_html
        )
        (self.out_dir / "index.html").write_text(page)


def _timed(fn: Callable, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def _evaluate(config: DemoConfig, model_dir: Path, *, guidance_scale: float | None = None):
    """Held-out evaluation with the demo's sampling settings; returns (evaluation, seconds)."""
    return _timed(
        evaluate_toy,
        model_dir,
        num_samples=config.num_samples,
        guidance_scale=config.guidance_scale if guidance_scale is None else guidance_scale,
        num_inference_steps=config.num_inference_steps,
    )


def stage_base(config: DemoConfig, report: DemoReport, *, progress: bool) -> Path:
    recipe = ToyBaseRecipe(kind="image", steps=config.base_steps)
    base_dir, train_seconds = _timed(toy_base_model, "image", recipe=recipe, progress=progress)
    evaluation, seconds = _evaluate(config, base_dir)
    report.add(
        "base",
        evaluation,
        seconds=train_seconds + seconds,
        note=f"toy base model ({config.base_steps} flow-matching steps) from {base_dir} "
        f"(training or cache: {train_seconds:.0f} s)",
    )
    return base_dir


def stage_dpo(config: DemoConfig, report: DemoReport, base_dir: Path, *, progress: bool) -> Path:
    from flowalign.experiments.toy_alignment import AlignBudget, toy_pairs_cached, train_toy_dpo
    from flowalign.training.methods.dpo import DPOConfig

    start = time.perf_counter()
    out = config.out_dir / "dpo"
    pairs = toy_pairs_cached(
        base_dir,
        out / "pairs",
        num_prompts=config.dpo_prompts,
        guidance_scale=config.guidance_scale,
        num_inference_steps=config.num_inference_steps,
        progress=progress,
    )
    budget = AlignBudget(steps=config.dpo_steps, lr=config.dpo_lr)
    model_dir = train_toy_dpo(
        base_dir, pairs, out / "run", budget, DPOConfig(beta=config.dpo_beta), progress=progress
    )
    evaluation, _ = _evaluate(config, model_dir)
    report.add(
        "flow-dpo",
        evaluation,
        seconds=time.perf_counter() - start,
        note=f"Flow-DPO: {len(pairs.chosen)} pairs (best vs worst of 4 base samples by oracle ta+vq on "
        f"{config.dpo_prompts} training prompts), {config.dpo_steps} LoRA steps, constant beta "
        f"{config.dpo_beta:g}, lr {config.dpo_lr:g}",
    )
    if config.dpo_baseline_guidance is not None:
        baseline, seconds = _evaluate(config, base_dir, guidance_scale=config.dpo_baseline_guidance)
        report.add(
            f"base-guidance-{config.dpo_baseline_guidance:g}",
            baseline,
            seconds=seconds,
            note=f"the base sampled with guidance {config.dpo_baseline_guidance:g} instead of "
            f"{config.guidance_scale:g}: what more guidance alone buys, the baseline Flow-DPO has to beat",
        )
    return model_dir


NRG_SETTINGS = {"vq": {"vq": 1.0}, "vq+ta": {"vq": 0.5, "ta": 0.5}, "ta": {"ta": 1.0}}


def stage_nrg(config: DemoConfig, report: DemoReport, base_dir: Path) -> dict:
    """Flow-NRG on the base model: latent rewards distilled from the oracles, guidance per weight set.

    Writes ``nrg/summary.md`` (every setting, and each reward's pairwise accuracy on noised held-out
    samples) and ``nrg/gains.svg``: the paired oracle gain over unguided sampling (same noise and
    caption, ± 2 s.e.) as the weight moves from visual quality to text alignment, and for the
    clean-input reward used on noisy inputs.
    """
    from flowalign.evals.plots import forest_plot
    from flowalign.experiments.toy_nrg import run_toy_nrg_experiment

    start = time.perf_counter()
    out = config.out_dir / "nrg"
    results = run_toy_nrg_experiment(
        base_dir,
        out,
        num_eval=config.num_samples,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        strength=config.nrg_strength,
        settings=NRG_SETTINGS,
        counterfactual_pairs=config.nrg_counterfactual_pairs,
    )
    guided = [name for name in results if name.startswith(("noisy_rm:", "clean_rm:"))]
    plots = [
        forest_plot(
            [(name, results[name][f"{m}_gain"][0], *_two_se(results[name][f"{m}_gain"])) for name in guided],
            title=f"{LABELS[m]}: gain over unguided (± 2 s.e.)",
        )
        for m in ("vq", "ta")
    ]
    (out / "gains.svg").write_text(_stack_svgs(plots))
    report.notes.append(
        f"flow-nrg: guidance strength {config.nrg_strength:g} with weights "
        + ", ".join(f"{n} = {w}" for n, w in NRG_SETTINGS.items())
        + "; paired gains over unguided: "
        + "; ".join(
            f"{name}: vq {results[name]['vq_gain'][0]:+.3f} ± {results[name]['vq_gain'][1]:.3f}, "
            f"ta {results[name]['ta_gain'][0]:+.3f} ± {results[name]['ta_gain'][1]:.3f}"
            for name in guided
        )
        + f" ({time.perf_counter() - start:.0f} s; details in nrg/summary.md, plot nrg/gains.svg)"
    )
    report.write()
    return results


def _two_se(mean_se: tuple[float, float]) -> tuple[float, float]:
    mean, se = mean_se
    return mean - 2 * se, mean + 2 * se


def _stack_svgs(svgs: list[str]) -> str:
    """Several SVG elements one below the other in one SVG document."""
    import re

    heights = [float(re.search(r'height="([0-9.]+)"', s).group(1)) for s in svgs]
    widths = [float(re.search(r'width="([0-9.]+)"', s).group(1)) for s in svgs]
    parts, y = [], 0.0
    for svg, h in zip(svgs, heights, strict=True):
        parts.append(f'<g transform="translate(0,{y:.0f})">{svg}</g>')
        y += h
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{max(widths):.0f}" height="{y:.0f}">'
        + "".join(parts)
        + "</svg>\n"
    )


def run_demo(config: DemoConfig, *, progress: bool = True) -> DemoReport:
    """Run the chosen stages; returns the report (also written to ``config.out_dir``)."""
    unknown = [s for s in config.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown demo stage(s) {unknown}; available: {', '.join(STAGES)}")
    report = DemoReport(Path(config.out_dir))
    (Path(config.out_dir)).mkdir(parents=True, exist_ok=True)
    (Path(config.out_dir) / "config.json").write_text(json.dumps(asdict(config), indent=2, default=str))
    models = {"base": stage_base(config, report, progress=progress)}
    if "dpo" in config.stages:
        models["flow-dpo"] = stage_dpo(config, report, models["base"], progress=progress)
    if "nrg" in config.stages:
        stage_nrg(config, report, models["base"])
    if "onestep" in config.stages:
        from flowalign.experiments.toy_onestep import one_step_demo

        result = one_step_demo(config.out_dir / "onestep", teacher_dir=models["base"])
        (config.out_dir / "onestep.md").write_text(result["text"] + "\n")
        report.notes.append(
            f"one-step stage (f-distill JS/rKL/fKL, Diff-Instruct* vs KL): {config.out_dir}/onestep.md"
        )
        report.write()
    stage_report(config, report, models, progress=progress)
    return report


def stage_report(config: DemoConfig, report: DemoReport, models: dict[str, Path], *, progress: bool) -> None:
    """The evaluation report (``report/report.html``): every model on every held-out prompt, side by side."""
    from flowalign.evals.runner import run_eval
    from flowalign.evals.types import EvalOptions
    from flowalign.pipelines.generate_files import GenerationSettings

    settings = GenerationSettings(
        num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale
    )
    result = run_eval(
        {name: str(path) for name, path in models.items()},
        "toy-heldout",
        ["toy"],
        out_dir=config.out_dir / "report",
        samples_per_prompt=1,
        seeds=(0,),
        options=EvalOptions(settings=settings, base="base"),
        progress=progress,
    )
    report.notes.append(
        f"evaluation report: {result.html_path}"
        + (f" ({len(result.failures)} failures)" if result.failures else "")
    )
    report.write()
