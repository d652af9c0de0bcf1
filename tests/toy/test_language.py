"""Language pretraining of the toy text encoder: every attribute, motion included, readable from it."""

import pytest
import torch

from flowalign.models.toy import build_toy_pipeline
from flowalign.toy.language import ATTRIBUTE_CLASSES, caption_labels, pretrain_on_captions

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = [f"a small red circle in the top left moving {m}" for m in ("left", "right", "up", "down")]


def _difference_to_first(pipe, captions):
    ids = pipe.tokenizer(captions, padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = pipe.text_encoder(ids).last_hidden_state
    return [float((e - embeds[0]).norm() / embeds[0].norm()) for e in embeds[1:]]


def test_caption_labels_read_every_attribute():
    labels = caption_labels(
        ["a large blue square in the center staying still", "a small red circle in the top left"]
    )
    names = list(ATTRIBUTE_CLASSES)
    assert labels.shape == (2, 5)
    assert ATTRIBUTE_CLASSES["motion"][labels[0, names.index("motion")]] == "still"
    assert ATTRIBUTE_CLASSES["motion"][labels[1, names.index("motion")]] is None  # an image caption
    assert ATTRIBUTE_CLASSES["position"][labels[1, names.index("position")]] == "top left"
    assert ATTRIBUTE_CLASSES["size"][labels[0, names.index("size")]] == "large"


def test_pretraining_makes_held_out_attributes_readable_and_motion_captions_distinct():
    pipe = build_toy_pipeline("video", num_layers=1)
    before = _difference_to_first(pipe, CAPTIONS)
    accuracy = pretrain_on_captions(pipe.text_encoder, pipe.tokenizer, steps=150, batch_size=128)
    # held-out captions are new combinations of known words: a language-pretrained encoder reads them
    assert min(accuracy.values()) > 0.95, accuracy
    after = _difference_to_first(pipe, CAPTIONS)
    assert min(after) > 2 * max(before), (before, after)
    assert not pipe.text_encoder.training
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())
