"""The Inception-v3 features that published FIDs use, as clean-fid computes them ("clean" mode).

Papers report FID with the TensorFlow Inception graph of 2015-12-05. Its PyTorch port is the
TorchScript file ``inception-2015-12-05.pt`` (StyleGAN2-ADA's metrics file, the one clean-fid and
torch-fidelity load). This module runs that file from a **local** path and resizes exactly as
clean-fid's default "clean" mode: each uint8 image is resized to 299x299 per channel with PIL's
bicubic filter in float (no re-quantisation), then fed in [0, 255] with the network's own
``(x - 128) / 128`` normalisation. Features are therefore clean-fid's features, and an FID computed on
them (:func:`flowalign.evals.fid.fid_from_features`) is comparable with papers that use clean-fid
(``tests/evals/test_comparable_metrics.py`` checks the features and the distance against clean-fid's
own code). The resizer is clean-fid's (``cleanfid.resize.build_resizer``), so the ``metrics`` extra
(``clean-fid``) is needed.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["CleanInception", "is_torchscript_archive", "load_clean_inception"]

STANDARD_NAME = "inception-2015-12-05.pt"


def is_torchscript_archive(path: Path) -> bool:
    """True for a TorchScript file (a zip archive holding a ``code/`` folder), False for state dicts."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


class CleanInception(nn.Module):
    """2048-d pool features of the TF-ported Inception-v3 for images [B, 3, H, W] in [0, 1]."""

    def __init__(self, scripted: torch.jit.ScriptModule) -> None:
        super().__init__()
        from cleanfid.resize import build_resizer

        self.layers = scripted.layers
        self._resize = build_resizer("clean")

    def _resized(self, images: Tensor) -> Tensor:
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, 3] uint8, as clean-fid reads files
        resized = np.stack([self._resize(a) for a in arrays])  # [B, 299, 299, 3] float32 in [0, 255]
        return torch.from_numpy(resized).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [0, 1] -> [B, 2048] float32."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"CleanInception expects images [B, 3, H, W], got {tuple(images.shape)}")
        x = self._resized(images).to(images.device)
        return self.layers.forward((x - 128) / 128).reshape(images.shape[0], -1).float()


def load_clean_inception(
    weights: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> CleanInception:
    """Load ``inception-2015-12-05.pt`` (a file, or a folder holding it) onto ``device``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a TorchScript archive with a ``layers`` module.
        ImportError: clean-fid is not installed (``pip install 'flowalign[metrics]'``).
    """
    path = Path(weights)
    if path.is_dir():
        path = path / STANDARD_NAME
    if not path.is_file():
        raise FileNotFoundError(f"Inception TorchScript file not found: {path}")
    if not is_torchscript_archive(path):
        raise ValueError(f"{path}: not a TorchScript archive (expected the standard {STANDARD_NAME})")
    try:
        import cleanfid.resize  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "the standard FID Inception needs clean-fid: pip install 'flowalign[metrics]'"
        ) from err
    scripted = torch.jit.load(str(path), map_location="cpu").eval()
    if not hasattr(scripted, "layers"):
        raise ValueError(f"{path}: TorchScript file without a 'layers' module; not {STANDARD_NAME}")
    return CleanInception(scripted).to(device).eval()
