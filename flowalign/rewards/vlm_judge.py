"""A vision-language model as judge: one yes/no question per dimension, scored by P(yes).

For each item and dimension the judge (a Qwen2.5-VL-class chat model loaded with transformers) sees the
image or video and a question from that dimension's template, and the score is the probability of
"Yes" against "No" as the first answer token:

    score_d = P(yes | yes or no) = exp(z_yes) / (exp(z_yes) + exp(z_no)) = sigmoid(z_yes - z_no)

where ``z`` are the next-token logits after the chat's assistant prefix. It is a number in (0, 1)
that, unlike a sampled answer, moves smoothly with the model's confidence (the VideoScore and
UnifiedReward recipe of reading a judgement from the logits rather than from generated text).

Templates (:data:`TEMPLATES`) are format strings with ``{prompt}`` (the generation prompt) and
``{media}`` (``image`` or ``video``); give your own as a JSON file ``{dimension: template}``.
Spec: ``vlm_judge:model=/ckpt/Qwen2.5-VL-7B-Instruct,dims=alignment+quality`` (dimensions joined
with ``+``, since ``,`` separates options).

Batching: each dimension is one forward pass over the chunk, the sequences padded on the right and
the logits read at each sequence's last real token, so an item's score does not depend on its
batch-mates (up to float rounding). Videos go to the model's video input, at most ``frames`` frames
evenly spaced. Not differentiable.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from flowalign.rewards.base import RewardModel

__all__ = ["TEMPLATES", "VLMJudgeReward", "load_vlm_judge"]

_ANSWER = " Answer Yes or No."
TEMPLATES: dict[str, str] = {
    "alignment": 'Does this {media} match the description "{prompt}"?' + _ANSWER,
    "quality": "Is this {media} of high visual quality: sharp, well exposed and free of artifacts?" + _ANSWER,
    "aesthetics": "Is this {media} aesthetically pleasing, with good composition, colour and light?"
    + _ANSWER,
    "plausibility": "Is everything in this {media} physically plausible and anatomically correct?" + _ANSWER,
    "motion": "Is the motion in this {media} smooth, natural and consistent from frame to frame?" + _ANSWER,
}


def _answer_token(tokenizer, word: str, model: str) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"vlm_judge: {model}: the answer {word!r} is {len(ids)} tokens, not one; give yes=/no= words"
        )
    return ids[0]


class VLMJudgeReward(RewardModel):
    """P(yes) per dimension from a chat VLM (see the module doc).

    Args:
        model: a ``*ForConditionalGeneration`` VLM (Qwen2.5-VL-class), in eval mode.
        processor: its processor (tokenizer with a chat template, image and video processors).
        templates: ``{dimension: question template}``, in output order.
        yes, no: the answer words (each one token).
        frames: at most this many frames of a video are shown (evenly spaced).
        batch_size: items per forward pass.
    """

    name = "vlm_judge"
    differentiable = False
    media_kind = "both"

    def __init__(
        self,
        model,
        processor,
        templates: dict[str, str],
        *,
        yes: str = "Yes",
        no: str = "No",
        frames: int = 8,
        batch_size: int = 4,
    ) -> None:
        super().__init__(batch_size=batch_size, text_cache_size=0)
        if not templates:
            raise ValueError("vlm_judge: give at least one dimension")
        if frames < 1:
            raise ValueError(f"vlm_judge: frames must be >= 1, got {frames}")
        self.model, self.processor, self.templates, self.frames = model, processor, dict(templates), frames
        self.dimensions = tuple(self.templates)
        self.needs_prompts = any("{prompt}" in t for t in self.templates.values())
        source = getattr(model, "name_or_path", "model")
        self.answer_ids = (
            _answer_token(processor.tokenizer, yes, source),
            _answer_token(processor.tokenizer, no, source),
        )

    def _texts(self, template: str, prompts: list[str] | None, count: int, kind: str) -> list[str]:
        texts = []
        for i in range(count):
            question = template.format(prompt="" if prompts is None else prompts[i], media=kind)
            messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
            texts.append(
                self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            )
        return texts

    def _judge(self, media: list[Tensor], prompts: list[str] | None, kind: str) -> dict[str, Tensor]:
        """P(yes) for each dimension over one chunk; ``media`` are [3, H, W] or [T, 3, H, W] floats."""
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "right"
        key = "images" if kind == "image" else "videos"
        extra = {} if kind == "image" else {"do_sample_frames": False}
        out = {}
        for dim, template in self.templates.items():
            inputs = self.processor(
                text=self._texts(template, prompts, len(media), kind),
                **{key: media},
                padding=True,
                do_rescale=False,
                return_tensors="pt",
                **extra,
            )
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            for name in ("pixel_values", "pixel_values_videos"):
                if name in inputs:
                    inputs[name] = inputs[name].to(self.dtype)
            logits = self.model(**inputs).logits  # [N, L, V]
            last = inputs["attention_mask"].sum(dim=1) - 1  # the last real token of each sequence
            final = logits[torch.arange(len(media), device=logits.device), last].float()  # [N, V]
            yes, no = self.answer_ids
            out[dim] = torch.sigmoid(final[:, yes] - final[:, no])
        return out

    def _score_images(self, images: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        return self._judge([im.float() for im in images], prompts, "image")

    def _score_videos(self, videos: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        t = videos.shape[1]
        keep = torch.linspace(0, t - 1, min(t, self.frames)).round().long().unique()
        return self._judge([v[keep].float() for v in videos], prompts, "video")


def _templates(dims: str | list[str] | tuple[str, ...], template_file: str | None) -> dict[str, str]:
    known = dict(TEMPLATES)
    if template_file is not None:
        try:
            extra = json.loads(Path(template_file).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"vlm_judge: templates file {template_file}: {err}") from err
        if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
            raise ValueError(f"vlm_judge: templates file {template_file} must map dimension names to strings")
        known.update(extra)
    names = [d.strip() for d in (dims.split("+") if isinstance(dims, str) else dims) if d.strip()]
    unknown = [d for d in names if d not in known]
    if unknown:
        raise ValueError(f"vlm_judge: unknown dimension {unknown[0]!r}; known: {', '.join(sorted(known))}")
    for dim in names:
        try:
            known[dim].format(prompt="", media="image")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"vlm_judge: template of {dim!r} has a bad field ({err}); use {{prompt}}, {{media}}"
            ) from err
    return {d: known[d] for d in names}


def load_vlm_judge(
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    model: str,
    dims: str | list[str] = "alignment+quality",
    templates: str | None = None,
    yes: str = "Yes",
    no: str = "No",
    frames: int = 8,
    max_pixels: int | None = 448 * 448,
    batch_size: int = 4,
) -> VLMJudgeReward:
    """Load a Qwen2.5-VL-class judge from a local folder (or hub id) with its processor.

    Args:
        model: the checkpoint folder (config, safetensors weights, processor and chat template).
        dims: dimensions, ``+``-separated or a list: names in :data:`TEMPLATES` or the templates file.
        templates: a JSON file ``{dimension: template}`` adding or replacing templates.
        yes, no: the answer words compared.
        frames: video frames shown at most.
        max_pixels: resize images (and video frames) to at most this many pixels (None: the
            checkpoint's own limit).
        batch_size: items per forward pass.

    Raises:
        ValueError: an unknown dimension, a bad template, or an answer word that is not one token.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    chosen = _templates(dims, templates)
    processor = AutoProcessor.from_pretrained(model)
    if max_pixels is not None:
        for sub in (getattr(processor, "image_processor", None), getattr(processor, "video_processor", None)):
            if (
                sub is not None
                and isinstance(getattr(sub, "size", None), dict)
                and "longest_edge" in sub.size
            ):
                sub.size = {**sub.size, "longest_edge": int(max_pixels)}
    video = getattr(processor, "video_processor", None)
    if video is not None and getattr(video, "cap_pixels_per_frame", False) is None:
        video.cap_pixels_per_frame = True  # each frame within max_pixels, as the model's reference code does
    network = (
        AutoModelForImageTextToText.from_pretrained(model, dtype=dtype)
        .to(device)
        .eval()
        .requires_grad_(False)
    )
    return VLMJudgeReward(network, processor, chosen, yes=yes, no=no, frames=frames, batch_size=batch_size)
