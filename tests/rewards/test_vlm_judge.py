"""The VLM judge on a tiny random-weight Qwen2.5-VL built offline (``tiny_vlm``): wiring (P(yes) from the
Yes/No logits), batching invariance, determinism, videos and errors."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from flowalign.rewards import load_reward  # noqa: E402
from flowalign.rewards.vlm_judge import TEMPLATES  # noqa: E402

PROMPTS = ["a red fox", "a lazy dog asleep under the pale moon at night", "x", "two cats on a mat"]


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    from tiny_vlm import write_tiny_qwen25_vl

    return write_tiny_qwen25_vl(tmp_path_factory.mktemp("tiny_qwen25_vl"))


@pytest.fixture(scope="module")
def judge64(judge_dir):
    return load_reward("vlm_judge", model=str(judge_dir), dims="alignment+quality", dtype=torch.float64)


def _images(count: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, 40, 56, generator=torch.Generator().manual_seed(seed))


def test_score_is_p_yes_from_the_yes_no_logits(judge64) -> None:
    images = _images()
    scores = judge64.score(images, PROMPTS)
    assert judge64.dimensions == ("alignment", "quality")
    assert all(v.dtype == torch.float32 and v.shape == (4,) for v in scores.values())
    # By hand for item 1: the chat text, the processor, the logits after the assistant prefix.
    proc, (yes, no) = judge64.processor, judge64.answer_ids
    question = TEMPLATES["alignment"].format(prompt=PROMPTS[1], media="image")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n") and PROMPTS[1] in text
    inputs = proc(text=[text], images=[images[1]], do_rescale=False, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].double()
    probs = torch.softmax(judge64.model(**inputs).logits[0, -1], dim=-1)
    expected = probs[yes] / (probs[yes] + probs[no])
    assert scores["alignment"][1].item() == pytest.approx(
        expected.item(), abs=2 * torch.finfo(torch.float32).eps
    )
    # The quality question does not quote the prompt: the same image scores the same whatever the prompt.
    other = judge64.score(images, list(reversed(PROMPTS)))
    assert torch.equal(other["quality"], scores["quality"])
    assert not torch.equal(other["alignment"], scores["alignment"])


def test_batch_of_four_equals_four_singles(judge64) -> None:
    images = _images(seed=1)
    batched = judge64.score(images, PROMPTS, batch_size=4)
    singles = [judge64.score(images[i : i + 1], PROMPTS[i : i + 1], batch_size=1) for i in range(4)]
    # In float64 the padded and unpadded passes differ only by summation order: each logit passes through
    # 4 blocks (2 vision, 2 text) of sums of at most 128 terms of size O(1), and the sigmoid's slope is at
    # most 1/4, so the scores agree to within 4 * 128 * eps64 (and are then rounded to float32).
    tol = 4 * 128 * torch.finfo(torch.float64).eps + torch.finfo(torch.float32).eps
    for dim in batched:
        single = torch.cat([s[dim] for s in singles])
        assert (batched[dim] - single).abs().max().item() <= tol


def test_deterministic_across_calls_and_loads(judge_dir, judge64) -> None:
    images = _images(seed=2)
    first = judge64.score(images, PROMPTS)
    assert all(torch.equal(first[k], v) for k, v in judge64.score(images, PROMPTS).items())
    again = load_reward("vlm_judge", model=str(judge_dir), dims="alignment+quality", dtype=torch.float64)
    assert all(torch.equal(first[k], v) for k, v in again.score(images, PROMPTS).items())


def test_videos_and_custom_templates(judge_dir, tmp_path) -> None:
    (tmp_path / "t.json").write_text(
        json.dumps({"fox": "Is there a fox in this {media}?" + " Answer Yes or No."})
    )
    judge = load_reward(
        "vlm_judge", model=str(judge_dir), dims="motion+fox", templates=str(tmp_path / "t.json"), frames=4
    )
    assert judge.dimensions == ("motion", "fox") and not judge.needs_prompts
    videos = torch.rand(2, 7, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    scores = judge.score(videos)
    assert all(v.shape == (2,) and ((v > 0) & (v < 1)).all() for v in scores.values())
    # Frames 0, 2, 4, 6 of 7 are shown: the odd frames do not matter.
    changed = videos.clone()
    changed[:, 1::2] = 0
    assert all(torch.equal(scores[k], v) for k, v in judge.score(changed).items())


def test_errors_name_the_problem(judge_dir) -> None:
    with pytest.raises(ValueError, match="unknown dimension 'beauty'"):
        load_reward("vlm_judge", model=str(judge_dir), dims="beauty")
    with pytest.raises(ValueError, match="'Maybe' is 5 tokens, not one"):
        load_reward("vlm_judge", model=str(judge_dir), dims="quality", yes="Maybe")
