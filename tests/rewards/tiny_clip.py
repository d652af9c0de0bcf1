"""Tiny CLIP backbones written to disk in their published formats, for the reward tests.

open_clip: ``open_clip_config.json`` + ``open_clip_model.safetensors`` (loaded with ``local-dir:``).
transformers: ``CLIPModel.save_pretrained`` + a real CLIP BPE tokenizer built offline from the
merges file shipped inside open_clip (truncated to 1000 merges) + ``preprocessor_config.json``.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_OPEN_CLIP_CFG = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
    },
}


def make_clip_tokenizer(num_merges: int | None = 1000, model_max_length: int = 77):
    """A real CLIP BPE tokenizer from open_clip's shipped merges (no hub access)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1][:num_merges]]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=model_max_length
    )


def write_open_clip_dir(folder: Path, *, seed: int = 0, with_weights: bool = True) -> Path:
    """Write a tiny open_clip model as ``open_clip_config.json`` (+ safetensors weights)."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(TINY_OPEN_CLIP_CFG))
    torch.manual_seed(seed)
    net = open_clip.create_model(f"local-dir:{folder}")
    if with_weights:
        save_file(
            {k: v.contiguous() for k, v in net.state_dict().items()},
            str(folder / "open_clip_model.safetensors"),
        )
    return folder


def write_hf_clip_dir(folder: Path, *, seed: int = 0, with_processor: bool = True) -> Path:
    """Write a tiny transformers CLIPModel (+ tokenizer and image processor) with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    tokenizer = make_clip_tokenizer()
    vocab = len(tokenizer)
    text = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=16,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=32,
        patch_size=8,
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    if with_processor:
        tokenizer.save_pretrained(folder)
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
            folder
        )
    return folder


PROMPTS = ["a red circle", "a blue square on grass", "a red circle", "two green triangles"]
