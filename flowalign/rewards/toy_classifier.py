"""The toy world's differentiable text-alignment reward ("toy_classifier" in the reward registry).

:class:`ToyAttributeClassifier` is a small CNN trained on toy renders to predict the four attributes; its
reward ta = mean_k p_k(stated attribute k | image) is a differentiable stand-in for the exact (not
differentiable) oracle's text alignment. Diff-Instruct* optimises it; evaluations use the exact oracles.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowalign.rewards.base import RewardModel
from flowalign.toy.metrics import ATTRIBUTES
from flowalign.toy.world import parse_caption

CLASSIFIER_VERSION = "1"


class ToyAttributeClassifier(RewardModel):
    """Differentiable toy text-alignment reward: ta = mean over attributes of p(stated value | image).

    A 4-layer CNN on 32x32 images with one softmax head per attribute (shape, colour, size, position).

    Args:
        width: channels of the first conv layer (doubling after each stride-2 layer).
        size: input side in pixels.
    """

    name = "toy_classifier"
    dimensions = ("ta",)
    differentiable = True
    media_kind = "image"

    def __init__(self, *, width: int = 32, size: int = 32, batch_size: int = 256) -> None:
        super().__init__(batch_size=batch_size, text_cache_size=0)
        self.width, self.size = width, size
        c1, c2, c3 = width, 2 * width, 4 * width
        self.net = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1),
            nn.SiLU(),  # [B, c2, 16, 16]
            nn.Conv2d(c2, c2, 3, stride=2, padding=1),
            nn.SiLU(),  # [B, c2, 8, 8]
            nn.Conv2d(c2, c3, 3, stride=2, padding=1),
            nn.SiLU(),  # [B, c3, 4, 4]
            nn.Flatten(),
        )
        feat = c3 * (size // 8) ** 2
        self.heads = nn.ModuleDict({name: nn.Linear(feat, len(vocab)) for name, vocab in ATTRIBUTES})

    def logits(self, images: Tensor) -> dict[str, Tensor]:
        """Per-attribute logits ``{name: [B, V]}`` of images [B, 3, H, W] in [0, 1]."""
        if images.shape[-1] != self.size or images.shape[-2] != self.size:
            raise ValueError(
                f"{self.name}: trained on {self.size}x{self.size} images, got {list(images.shape[-2:])}"
            )
        h = self.net(images.to(self.dtype) * 2 - 1)
        return {name: head(h) for name, head in self.heads.items()}

    def _score_images(self, images: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        assert prompts is not None
        targets = _targets(prompts, images.device)
        logits = self.logits(images)
        probs = [
            F.softmax(logits[n].float(), dim=1).gather(1, targets[n][:, None])[:, 0] for n, _ in ATTRIBUTES
        ]
        return {"ta": torch.stack(probs, dim=1).mean(dim=1)}


def _targets(prompts: Sequence[str], device: torch.device) -> dict[str, Tensor]:
    attrs = [parse_caption(p) for p in prompts]
    return {
        name: torch.tensor([vocab.index(getattr(a, name)) for a in attrs], device=device)
        for name, vocab in ATTRIBUTES
    }


@dataclass
class ClassifierRecipe:
    """How the toy classifier is trained (its cache key is a hash of this)."""

    num_items: int = 20_000
    steps: int = 600
    batch_size: int = 128
    lr: float = 2e-3
    width: int = 32
    max_noise: float = 0.15
    """Augmentation: Gaussian pixel noise with std ~ U[0, max_noise], and blur on a quarter of the batch."""
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({"recipe": asdict(self), "version": CLASSIFIER_VERSION}, sort_keys=True)
        return f"toy-classifier-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def _augment(x: Tensor, g: torch.Generator, max_noise: float) -> Tensor:
    b = x.shape[0]
    blur = torch.rand(b, generator=g) < 0.25
    if blur.any():
        kernel = torch.tensor([1.0, 2.0, 1.0])
        k2 = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
        x = torch.where(blur[:, None, None, None], F.conv2d(x, k2, padding=1, groups=3), x)
    std = torch.rand(b, 1, 1, 1, generator=g) * max_noise
    return (x + std * torch.randn(x.shape, generator=g)).clamp(0, 1)


def train_toy_classifier(recipe: ClassifierRecipe, out_dir: str | Path) -> Path:
    """Train the attribute classifier on train-split renders; writes config.json + model.safetensors."""
    from safetensors.torch import save_file

    from flowalign.toy.data import PrerenderedToy, ToyDataset

    out_dir = Path(out_dir)
    torch.manual_seed(recipe.seed)
    data = PrerenderedToy(ToyDataset("train", num=recipe.num_items, seed=recipe.seed + 17))
    targets = _targets(data.prompts, torch.device("cpu"))
    model = ToyAttributeClassifier(width=recipe.width).train()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps)
    g = torch.Generator().manual_seed(recipe.seed)
    for _ in range(recipe.steps):
        idx = torch.randint(0, len(data), (recipe.batch_size,), generator=g)
        logits = model.logits(_augment(data.pixels[idx], g, recipe.max_noise))
        loss = sum(F.cross_entropy(logits[n], targets[n][idx]) for n, _ in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(
        json.dumps({"width": recipe.width, "size": 32, "recipe": asdict(recipe)})
    )
    return out_dir


def load_toy_classifier(
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    path: str | None = None,
    recipe: ClassifierRecipe | None = None,
) -> ToyAttributeClassifier:
    """The toy classifier reward from ``path``, or the cached one for ``recipe`` (trained now if missing)."""
    from safetensors.torch import load_file

    from flowalign.toy.data import cache_root

    if path is None:
        recipe = recipe or ClassifierRecipe()
        folder = cache_root() / recipe.key()
        if not (folder / "model.safetensors").is_file():
            tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            train_toy_classifier(recipe, tmp)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        path = str(folder)
    folder = Path(path)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise ValueError(f"toy_classifier: {folder} has no {name}")
    config = json.loads((folder / "config.json").read_text())
    model = ToyAttributeClassifier(width=int(config["width"]), size=int(config["size"]))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.to(device=device, dtype=dtype).requires_grad_(False).eval()
