"""The OCR reward: quoted-text parsing, the edit-distance agreement, and EasyOCR's real English weights
on text rendered with Pillow's bundled scalable font (``ImageFont.load_default(size=...)``)."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont
from typer.testing import CliRunner

from flowalign.rewards.ocr import edit_distance, quoted_text, text_agreement

WORDS = (
    "apple river stone cloud garden window market bridge candle forest harbor island jacket kitten "
    "lemon mirror needle orange pepper rocket silver ticket violin wagon yellow zipper anchor basket "
    "castle dragon engine falcon guitar hammer jungle ladder meadow number pillow quartz rabbit saddle "
    "tunnel velvet walnut bakery coffee planet summer winter sunset open late fresh bread sale today "
    "only north south hotel cinema music"
).split()


def _phrase_pairs(count: int, seed: int) -> list[tuple[str, str]]:
    """``count`` pairs of one- or two-word phrases that differ in one word (the hard kind of wrong
    text: most of it matches), in upper, lower or title case."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        words = rng.sample(WORDS, 3)
        case = rng.choice((str.upper, str.lower, str.title))
        if rng.random() < 0.5:
            pairs.append((case(words[0]), case(words[1])))
        else:
            pairs.append((case(f"{words[0]} {words[1]}"), case(f"{words[0]} {words[2]}")))
    return pairs


def _render(text: str, style: int | None = None, size: tuple[int, int] = (256, 48)) -> torch.Tensor:
    """``text`` centred on a plain image, as a float image [3, H, W] on the 1/255 grid.

    ``style=None``: black on white, 24 px. A seed instead draws a varied look: light-on-dark or
    dark-on-light colours (at least 110/255 apart in every channel), a size of 20-28 px, an offset of up to
    8 px from the centre, and Gaussian pixel noise of standard deviation 0.04.
    """
    rng = random.Random(style)
    if style is None:
        paper, ink, points, shift, noise = (255, 255, 255), (0, 0, 0), 24, (0, 0), 0.0
    else:
        light = tuple(rng.randint(170, 255) for _ in range(3))
        dark = tuple(rng.randint(0, 60) for _ in range(3))
        paper, ink = (light, dark) if rng.random() < 0.7 else (dark, light)
        points, shift, noise = rng.randint(20, 28), (rng.randint(-8, 8), rng.randint(-4, 4)), 0.04
    image = Image.new("RGB", size, paper)
    font = ImageFont.load_default(size=points)
    left, top, right, bottom = font.getbbox(text)
    xy = ((size[0] - (right - left)) / 2 - left + shift[0], (size[1] - (bottom - top)) / 2 - top + shift[1])
    ImageDraw.Draw(image).text(xy, text, fill=ink, font=font)
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    if noise:
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        pixels = pixels + noise * torch.randn(pixels.shape, generator=gen)
    return (pixels.clamp(0, 1) * 255).round() / 255


def _prompt(text: str) -> str:
    return f'a storefront sign that says "{text}"'


def test_quoted_text() -> None:
    assert quoted_text('a sign that says "OPEN LATE", neon') == "OPEN LATE"
    assert quoted_text("a mug with “good” and ‘morning’") == "good morning"
    assert quoted_text("the baker's sign reads 'FRESH BREAD' today") == "FRESH BREAD"
    assert quoted_text("a cat on a mat") == ""
    assert quoted_text('an empty sign ""') == ""


def test_text_agreement() -> None:
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3
    assert edit_distance("flaw", "lawn") == 2
    assert text_agreement("OPEN  late", "open late") == 1.0  # case-folded, spaces collapsed
    assert text_agreement("OPEN", "open", case_sensitive=True) == 0.0
    assert text_agreement("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert text_agreement("", "") == 1.0  # no text asked for, none read
    assert text_agreement("", "stop") == 0.0  # no text asked for, some read
    assert text_agreement("abc", "") == 0.0


@pytest.fixture(scope="module")
def ocr():
    pytest.importorskip("easyocr")
    pytest.importorskip("easyocr_en_models")
    from flowalign.rewards import load_reward

    return load_reward("ocr")


def _accuracy(reward, pairs: list[tuple[str, str]]) -> float:
    """Share of pairs where the image of the prompt's text outscores the image of the other text.

    Pair k's two phrases are rendered once each, every image in its own style (``_render``); phrase a's
    prompt scores both images of the pair, and so does b's.
    """
    images = torch.stack([_render(t, style=i) for i, t in enumerate(t for pair in pairs for t in pair)])
    read = reward.recognise(images)
    wins = []
    for k, (a, b) in enumerate(pairs):
        read_a, read_b = read[2 * k], read[2 * k + 1]
        wins.append(text_agreement(a, read_a) > text_agreement(a, read_b))
        wins.append(text_agreement(b, read_b) > text_agreement(b, read_a))
    return sum(wins) / len(wins)


def test_ocr_right_text_beats_wrong_text_20_cases(ocr) -> None:
    pairs = _phrase_pairs(10, seed=0)  # 20 images, 20 cases
    assert _accuracy(ocr, pairs) >= 0.95
    # The reward's own path (quotes parsed from the prompt) gives the same agreement.
    a, b = pairs[0]
    scores = ocr.score(torch.stack([_render(a), _render(b)]), [_prompt(a), _prompt(a)])["ocr"]
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    assert scores[0] > scores[1]


@pytest.mark.slow
def test_ocr_right_text_beats_wrong_text_200_cases(ocr) -> None:
    pairs = _phrase_pairs(100, seed=1)  # 200 images, 200 cases
    assert _accuracy(ocr, pairs) >= 0.95


def test_ocr_batch_equals_singles(ocr) -> None:
    texts = ["North Hotel", "coffee", "SUMMER SALE"]
    images = torch.stack([_render(t) for t in texts])
    prompts = [_prompt(t) for t in itertools.chain(texts[1:], texts[:1])]  # each against another's text
    batched = ocr.score(images, prompts, batch_size=3)["ocr"]
    singles = torch.cat([ocr.score(images[i : i + 1], prompts[i : i + 1])["ocr"] for i in range(3)])
    assert torch.equal(batched, singles)
    assert (batched < 1).all()


def test_flowalign_score_ocr_on_a_folder(ocr, tmp_path) -> None:
    from flowalign.cli import app
    from flowalign.data.media import load_image, save_image

    texts = ["open late", "Fresh Bread", "STOP"]
    folder = tmp_path / "images"
    folder.mkdir()
    for i, text in enumerate(texts):
        save_image(_render(text), folder / f"{i}.png")
    prompts = [_prompt("open late"), _prompt("Fresh Bread"), _prompt("ZEBRA")]  # the last one is wrong
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "scores.jsonl"
    args = ["score", "--reward", "ocr", "--media", str(folder), "--prompts", str(tmp_path / "prompts.txt")]
    res = CliRunner().invoke(app, [*args, "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["0.png", "1.png", "2.png"]
    expected = ocr.score(torch.stack([load_image(folder / f"{i}.png") for i in range(3)]), prompts)["ocr"]
    assert [r["ocr"] for r in rows] == expected.tolist()
    assert rows[0]["ocr"] == 1.0 and rows[1]["ocr"] == 1.0
    assert rows[2]["ocr"] == 0.0  # "STOP" read, "ZEBRA" asked: no character lines up
