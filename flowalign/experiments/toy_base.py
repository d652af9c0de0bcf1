"""The toy world's base models: flow-matching SFT recipes, a reusable cache, and held-out evaluation.

``toy_base_model(kind)`` returns the folder of a trained toy base model from the cache
(``$FLOWALIGN_CACHE``, default ``~/.cache/flowalign``), filling the cache on first use: the package
ships the default image recipe's trained weights (``flowalign/assets/toy_base_image``, made by
:func:`train_toy_base` from ``ToyBaseRecipe()``), which are copied there; any other recipe is trained
once (the image recipe takes about twelve minutes on 2 CPU cores). ``evaluate_toy`` samples held-out prompts at
fixed seeds and scores them with the exact oracles; every alignment stage of the demo compares
against it on the same seeds.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from flowalign.config import CheckpointConfig, EMAConfig, OptimConfig, TrainConfig
from flowalign.evals.stats import summarise
from flowalign.models import load_flow_model
from flowalign.models.base import FlowModel
from flowalign.models.toy import ToyModel, build_toy_pipeline
from flowalign.pipelines import FlowPipeline
from flowalign.toy.data import PrerenderedToy, ToyDataset, cache_root
from flowalign.toy.language import pretrain_on_captions
from flowalign.toy.oracles import score_images, score_videos
from flowalign.toy.world import toy_prompts
from flowalign.training.loop import train
from flowalign.training.methods.sft import FlowMatchingSFT, SFTConfig

TOY_WORLD_VERSION = "1"


@dataclass
class ToyBaseRecipe:
    """How a toy base model is trained (the cache key is a hash of this)."""

    kind: str = "image"
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50
    ema_decay: float = 0.995
    num_items: int = 60_000
    seed: int = 0
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(train_text_encoder=True, caption_dropout=0.1))
    text_encoder_from: ToyBaseRecipe | None = None
    """Start from the text encoder of the toy image base model of this recipe (None: a fresh one)."""
    absolute_positions: bool = False
    """Videos: give the Wan transformer absolute sin-cos token positions (``ToyWanTransformer3DModel``)."""
    language_pretraining_steps: int = 0
    """Pretrain the text encoder on the toy captions first, this many steps (:mod:`flowalign.toy.language`)."""

    def key(self) -> str:
        recipe = asdict(self)
        for added_later in ("text_encoder_from", "absolute_positions", "language_pretraining_steps"):
            if not recipe[added_later]:  # off (None, False, 0): recipes from before the field keep their key
                del recipe[added_later]
        blob = json.dumps({"recipe": recipe, "world": TOY_WORLD_VERSION}, sort_keys=True, default=str)
        return f"toy-{self.kind}-{self.steps}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def default_recipe(kind: str) -> ToyBaseRecipe:
    """The toy base recipe of ``kind``.

    Images: 1,500 steps of 64 images, the text encoder trained jointly. Videos: 9,000 steps of 16 clips
    with a frozen, pretrained text encoder (the 900-step image base's, the demo's), as video models keep
    their pretrained text encoder frozen: trained jointly through cross-attention only, the tiny encoder
    collapses (prompts become indistinguishable and the model ignores them). That encoder is first
    pretrained on the toy language (:mod:`flowalign.toy.language`; image captions alone leave its
    motion words meaningless), and the video transformer gets absolute token positions
    (:class:`~flowalign.models.toy.ToyWanTransformer3DModel`): with Wan's relative RoPE alone it never
    learns the position words. The motion words are learnt between 3,000 and 6,000 steps, the
    shapes between 6,000 and 9,000 (held-out motion accuracy 0.19 / 0.98 / 1.00 and shape accuracy
    0.34 / 0.46 / 0.93 at 3,000 / 6,000 / 9,000 steps).
    """
    if kind == "image":
        return ToyBaseRecipe(kind="image")
    if kind == "video":
        return ToyBaseRecipe(
            kind="video",
            steps=9000,
            batch_size=16,
            num_items=24_000,
            sft=SFTConfig(train_text_encoder=False, caption_dropout=0.1),
            text_encoder_from=ToyBaseRecipe(kind="image", steps=900),
            absolute_positions=True,
            language_pretraining_steps=600,
        )
    raise ValueError(f"kind must be 'image' or 'video', got {kind!r}")


def train_toy_base(recipe: ToyBaseRecipe, out_dir: str | Path, *, progress: bool = True) -> Path:
    """Train a toy base model from scratch with flow-matching SFT; returns the EMA model folder."""
    out_dir = Path(out_dir)
    torch.manual_seed(recipe.seed)
    pipe = build_toy_pipeline(recipe.kind, absolute_positions=recipe.absolute_positions, seed=recipe.seed)
    if recipe.text_encoder_from is not None:
        image_base = toy_base_model("image", recipe=recipe.text_encoder_from, progress=progress)
        # the toy tokenizer covers both kinds' captions, so an image model's text encoder reads clip captions
        pretrained = type(pipe.text_encoder).from_pretrained(image_base / "text_encoder")
        pipe.text_encoder.load_state_dict(pretrained.state_dict())
    if recipe.language_pretraining_steps:
        pretrain_on_captions(
            pipe.text_encoder, pipe.tokenizer, steps=recipe.language_pretraining_steps, seed=recipe.seed
        )
    model = ToyModel(pipe)
    method = FlowMatchingSFT(model, recipe.sft)
    data = PrerenderedToy(ToyDataset("train", kind=recipe.kind, num=recipe.num_items, seed=recipe.seed))
    config = TrainConfig(
        output_dir=out_dir / "run",
        seed=recipe.seed,
        max_steps=recipe.steps,
        batch_size=recipe.batch_size,
        grad_clip=1.0,
        log_every=50,
        trackers=[],
        cpu=not torch.cuda.is_available(),
        optim=OptimConfig(lr=recipe.lr, warmup_steps=recipe.warmup_steps, weight_decay=0.0),
        ema=EMAConfig(use=True, decay=recipe.ema_decay),
        checkpoint=CheckpointConfig(every=500, keep_last=1),
    )
    result = train(method, data, config, resume=True, progress=progress)
    if result.export_dir is None:
        raise RuntimeError(f"toy base training in {out_dir} stopped at step {result.step} before finishing")
    return Path(str(result.export_dir) + "-ema")


SHIPPED_BASES = Path(__file__).resolve().parent.parent / "assets"
"""Where the package keeps trained toy base models: ``toy_base_<kind>/`` with a ``recipe.json``."""


def shipped_toy_base(recipe: ToyBaseRecipe) -> Path | None:
    """The package's trained copy of ``recipe`` (a diffusers folder), or None if it ships none."""
    folder = SHIPPED_BASES / f"toy_base_{recipe.kind}"
    meta = folder / "recipe.json"
    if not meta.is_file():
        return None
    try:
        key = json.loads(meta.read_text())["key"]
    except (json.JSONDecodeError, KeyError) as err:
        raise ValueError(f"{meta}: not a shipped-base record with a 'key' ({err})") from None
    return folder if key == recipe.key() else None


SHIPPED_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
)
"""The files of a toy model folder that loading it reads (what the package ships)."""


def write_shipped_toy_base(
    model_dir: str | Path, recipe: ToyBaseRecipe, out_dir: str | Path | None = None
) -> Path:
    """Copy a model trained by ``recipe`` into the package (default ``assets/toy_base_<kind>``).

    Keeps only :data:`SHIPPED_FILES` and records the recipe and its cache key in ``recipe.json``. The
    weights are stored as float16 (half the size); :func:`fetch_toy_base` casts them back to float32.
    For the 1,500-step image base this changes no held-out score beyond 1e-4 (256 samples: ta 0.875
    either way, vq 0.83493 float32 vs 0.83498 float16, standard error 0.004).
    """
    from safetensors.torch import load_file, save_file

    model_dir = Path(model_dir)
    out_dir = Path(out_dir) if out_dir is not None else SHIPPED_BASES / f"toy_base_{recipe.kind}"
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name in SHIPPED_FILES:
        if not (model_dir / name).is_file():
            raise ValueError(f"{model_dir}: not a toy model folder, {name} is missing")
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".safetensors"):
            tensors = load_file(model_dir / name)
            half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
            save_file(half, tmp / name, metadata={"format": "pt"})
        else:
            shutil.copyfile(model_dir / name, tmp / name)
    meta = {"key": recipe.key(), "recipe": asdict(recipe)}
    (tmp / "recipe.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def _install_shipped(shipped: Path, dest: Path) -> None:
    """Copy a shipped base into ``dest`` with its weights stored as float32 (how training exports them)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(shipped, dest, ignore=shutil.ignore_patterns("recipe.json"))
    for weights in dest.rglob("*.safetensors"):
        tensors = {k: v.float() if v.is_floating_point() else v for k, v in load_file(weights).items()}
        save_file(tensors, weights, metadata={"format": "pt"})


def fetch_toy_base(
    kind: str = "image", *, recipe: ToyBaseRecipe | None = None, progress: bool = True
) -> tuple[Path, str]:
    """:func:`toy_base_model` and where the model came from this time.

    Returns:
        (model folder, source): source is "cached" (found in the cache), "shipped" (copied now from
        the package's trained copy) or "trained" (trained now from the recipe).
    """
    recipe = recipe or default_recipe(kind)
    folder = cache_root() / recipe.key()
    model_dir = folder / "model"
    if (model_dir / "model_index.json").is_file():
        return model_dir, "cached"
    folder.mkdir(parents=True, exist_ok=True)
    # One trainer per cache entry: a second caller waits for the first instead of training twice.
    with open(folder / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (model_dir / "model_index.json").is_file():
            return model_dir, "cached"
        tmp = folder / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shipped = shipped_toy_base(recipe)
        if shipped is not None:
            _install_shipped(shipped, tmp)
            source = "shipped"
        else:
            shutil.copytree(train_toy_base(recipe, folder / "work", progress=progress), tmp)
            source = "trained"
        os.replace(tmp, model_dir)  # atomic: a half-copied model is never taken for a finished one
        (folder / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2, default=str))
    return model_dir, source


def toy_base_model(
    kind: str = "image", *, recipe: ToyBaseRecipe | None = None, progress: bool = True
) -> Path:
    """Folder of the trained toy base model for ``recipe``: cached, copied from the package's trained
    copy (the default image recipe), or trained now."""
    return fetch_toy_base(kind, recipe=recipe, progress=progress)[0]


@dataclass
class ToyEvaluation:
    """Held-out samples and their oracle scores."""

    prompts: list[str]
    media: Tensor
    scores: dict[str, Tensor]

    def summary(self) -> dict[str, dict[str, float]]:
        return summarise(self.scores)


def heldout_prompts(kind: str, num_samples: int) -> list[str]:
    """``num_samples`` held-out prompts, cycling through the held-out split in order."""
    prompts = toy_prompts("heldout", kind)
    return [prompts[i % len(prompts)] for i in range(num_samples)]


@torch.no_grad()
def evaluate_toy(
    model: FlowModel | str | Path,
    *,
    num_samples: int = 256,
    seed: int = 1000,
    guidance_scale: float = 3.0,
    num_inference_steps: int = 20,
    batch_size: int = 128,
    one_step: bool = False,
    velocity_transforms_factory=None,
) -> ToyEvaluation:
    """Sample held-out prompts (sample i with seed ``seed + i``) and score them with the oracles."""
    if not isinstance(model, FlowModel):
        model = load_flow_model(model)
    kind = "video" if model.is_video else "image"
    prompts = heldout_prompts(kind, num_samples)
    pipe = FlowPipeline(model)
    media = []
    for start in range(0, num_samples, batch_size):
        chunk = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        transforms = velocity_transforms_factory(chunk) if velocity_transforms_factory else None
        out = pipe(
            chunk,
            generator=generators,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            one_step=one_step,
            velocity_transforms=transforms,
        )
        media.append(out.media.float().cpu())
    media = torch.cat(media)
    scores = (score_videos if kind == "video" else score_images)(media, prompts)
    return ToyEvaluation(prompts=prompts, media=media, scores=scores)
