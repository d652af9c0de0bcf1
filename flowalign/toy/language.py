"""Language pretraining of the toy text encoder: the toy world's stand-in for a pretrained T5.

Real video models (Wan's umT5) cross-attend to a text encoder that was pretrained on language and is
kept frozen, so every word of a prompt already has a distinct meaning. The toy image base trains its
encoder through SD3 on image captions, which never say how a scene moves: its motion words keep
their random embeddings, sit at token positions it never saw, and come out of it almost the same
("... moving left" and "... moving right" differ by 5 % in relative norm, a colour change by 33 %).
A video model cross-attending to that encoder cannot learn the motion words, however long it trains.

:func:`pretrain_on_captions` fixes that the way language pretraining does, from text alone: the
encoder learns to make every attribute of the training captions of both kinds (shape, colour, size,
position, and motion or none) readable by a linear head from its pooled output. The heads are thrown
away afterwards; the encoder is what is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowalign.toy.world import COLOURS, MOTIONS, POSITIONS, SHAPES, SIZES, parse_caption, toy_prompts

ATTRIBUTE_CLASSES: dict[str, tuple[str | None, ...]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "size": SIZES,
    "position": POSITIONS,
    "motion": (*MOTIONS, None),  # None: an image caption, which says nothing of motion
}


def caption_labels(captions: list[str]) -> Tensor:
    """Class index of each attribute (columns in ``ATTRIBUTE_CLASSES`` order) of each caption: long [N, 5]."""
    rows = []
    for caption in captions:
        attrs = parse_caption(caption).as_dict()
        rows.append([classes.index(attrs[name]) for name, classes in ATTRIBUTE_CLASSES.items()])
    return torch.tensor(rows)


def pretrain_on_captions(
    text_encoder: nn.Module,
    tokenizer,
    *,
    steps: int = 600,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
) -> dict[str, float]:
    """Train ``text_encoder`` (in place) until its pooled output tells every caption attribute apart.

    Loss: sum over attributes a of CE(W_a z + b_a, y_a), z = the encoder's pooled ``text_embeds`` of a
    training caption, y_a its attribute; the linear heads (W_a, b_a) are trained with it and dropped.
    Only training captions are read (held-out combinations stay unseen); every word occurs in them.

    Returns the heads' accuracy per attribute on the held-out captions of both kinds, after training.
    The encoder is left in eval mode with gradients off.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the heads' initialisation

    def tokenize(captions: list[str]) -> Tensor:
        return tokenizer(
            captions,
            padding="max_length",
            truncation=True,
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids

    train_captions = toy_prompts("train", "image") + toy_prompts("train", "video")
    ids, labels = tokenize(train_captions), caption_labels(train_captions)
    device = next(text_encoder.parameters()).device
    width = text_encoder.config.projection_dim
    heads = nn.ModuleList(nn.Linear(width, len(classes)) for classes in ATTRIBUTE_CLASSES.values()).to(device)
    text_encoder.requires_grad_(True).train()
    params = [*text_encoder.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for _ in range(steps):
        batch = torch.randint(len(train_captions), (batch_size,), generator=generator)
        pooled = text_encoder(ids[batch].to(device)).text_embeds
        target = labels[batch].to(device)
        loss = sum(F.cross_entropy(head(pooled), target[:, k]) for k, head in enumerate(heads))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    text_encoder.requires_grad_(False).eval()

    heldout = toy_prompts("heldout", "image") + toy_prompts("heldout", "video")
    with torch.no_grad():
        pooled = text_encoder(tokenize(heldout).to(device)).text_embeds
        target = caption_labels(heldout).to(device)
        return {
            name: float((head(pooled).argmax(dim=1) == target[:, k]).float().mean())
            for k, (name, head) in enumerate(zip(ATTRIBUTE_CLASSES, heads, strict=True))
        }
