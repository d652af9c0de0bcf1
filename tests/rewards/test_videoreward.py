"""VideoReward: a tiny Qwen2-VL written in the published VideoAlign layout, loaded through load_reward, and
compared with the transformers reference path (Qwen2VLProcessor + a PEFT-merged
Qwen2VLForConditionalGeneration + manual special-token indexing).

The tiny model: 2-layer vision tower and language model of width 32, patch 14, merge 2; a BPE tokenizer
trained offline on a short stand-in prompt template with Qwen2-VL's special tokens, the three reward
tokens appended, and a Qwen2-VL-style chat template. LoRA (r 4, alpha 8) on every language-model linear
layer with non-zero B, so the checkpoint's unmerged LoRA has to be merged to match. The stand-in
template (written for these tests, not VideoAlign's text) is saved as prompt_template.txt in each
checkpoint folder, where users save the real one.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from flowalign.rewards import RewardInputError, available_rewards, load_reward, videoreward_inputs
from flowalign.rewards.videoreward import (
    SPECIAL_TOKENS,
    build_prompt,
    sample_frame_indices,
    smart_resize,
)
from flowalign.rewards.videoreward_files import convert_checkpoint
from flowalign.rewards.videoreward_inputs import read_template

torch.set_num_threads(1)
# the stand-in template is not the published text, so every load warns once; tests that check the
# warning record it with pytest.warns
pytestmark = pytest.mark.filterwarnings("ignore:videoreward. prompt template .* differs:UserWarning")

QWEN_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# The shape of Qwen2-VL's chat template: default system turn, vision placeholders, generation prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPTS = ["a red circle moving right", "two blue squares on grass at night"]
STATS = {"VQ_mean": 0.5, "VQ_std": 2.0, "MQ_mean": -1.0, "MQ_std": 0.5, "TA_mean": 3.0, "TA_std": 4.0}
SMALL = {"min_frame_pixels": 56 * 56}  # keeps the tiny videos at their own size (56 x 84)
# A stand-in for VideoAlign's "detailed_special" template, with the same structure: the three reward
# tokens in order VQ, MQ, TA, the user's prompt between the MQ and TA tokens.
TEMPLATE = (
    "\nScore the clip below on three separate scales from 0 (worst) to 10 (best).\n\n"
    "Picture: is each frame sharp, well lit and free of broken shapes? <|VQ_reward|>\nEND\n\n"
    "Movement: is the motion smooth, steady and physically sensible? <|MQ_reward|>\nEND\n\n"
    "Caption - {text_prompt}\n"
    "Agreement: does the clip show what the caption asks for? <|TA_reward|>\nEND\n"
)


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200,
        special_tokens=QWEN_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([TEMPLATE, *PROMPTS], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _write_base(folder: Path) -> Path:
    """A tiny Qwen2-VL in Qwen/Qwen2-VL-2B-Instruct's layout (padded vocabulary, like the real one)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    tokenizer = _tokenizer()
    ids = dict(zip(QWEN_TOKENS, tokenizer.convert_tokens_to_ids(QWEN_TOKENS), strict=True))
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer) + 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
        },
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 32,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 1280).save_pretrained(folder)
    return folder


def _old_layout(key: str) -> str:
    """transformers >= 4.52 PEFT names -> the names in the published model.pth (transformers 4.4x)."""
    for new, old in (
        ("base_model.model.model.visual.", "base_model.model.visual."),
        ("base_model.model.model.language_model.", "base_model.model.model."),
    ):
        if key.startswith(new):
            return old + key[len(new) :]
    return key


def _write_reward(folder: Path, base: Path, *, output_dim: int = 1, layout: str = "full", seed: int = 1):
    """VideoAlign's trainer output for a tiny model: model_config.json + checkpoint-7/. Returns the
    reference: (merged Qwen2VLForConditionalGeneration, rm_head weight, tokenizer)."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)
    model = Qwen2VLForConditionalGeneration.from_pretrained(base)
    model.resize_token_embeddings(len(tokenizer))
    torch.manual_seed(seed)  # PEFT draws lora_A from the global generator
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.model.visual.merger.mlp[0].weight.add_(
            0.05 * torch.randn(model.model.visual.merger.mlp[0].weight.shape, generator=g)
        )
        special = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
        embed = model.get_input_embeddings().weight
        embed[special] = torch.randn(3, embed.shape[1], generator=g)
    model.rm_head = torch.nn.Linear(32, output_dim, bias=False)
    torch.nn.init.normal_(model.rm_head.weight, generator=g)
    targets = [
        n for n, m in model.named_modules() if "language_model.layers" in n and isinstance(m, torch.nn.Linear)
    ]
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0)
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=g))
    ckpt = folder / "checkpoint-7"
    ckpt.mkdir(parents=True)
    state = {_old_layout(k): v.clone() for k, v in peft_model.state_dict().items()}
    if layout == "full":
        torch.save(state, ckpt / "model.pth")
    else:
        adapter = {_old_layout(k): v.contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
        save_file(adapter, str(ckpt / "adapter_model.safetensors"))
        trained = (
            "base_model.model.visual.",
            "base_model.model.rm_head.",
            "base_model.model.model.embed_tokens.",
        )
        torch.save(
            {k: v for k, v in state.items() if k.startswith(trained)}, ckpt / "non_lora_state_dict.pth"
        )
    tokenizer.save_pretrained(ckpt / "tokenizer")
    config = {
        "data_config": {
            "max_frame_pixels": 200704,
            "num_frames": None,
            "fps": 2.0,
            "eval_dim": ["VQ", "MQ", "TA"],
            "prompt_template_type": "detailed_special",
            "sample_type": "uniform",
        },
        "model_config": {
            "model_name_or_path": str(base),
            "output_dim": output_dim,
            "use_special_tokens": True,
            "reward_token": "special",
        },
        "peft_lora_config": {"lora_enable": True, "lora_r": 4, "lora_alpha": 8, "use_rslora": False},
        "inference_config": STATS,
    }
    (folder / "model_config.json").write_text(json.dumps(config, indent=2))
    (folder / "prompt_template.txt").write_text(TEMPLATE)
    rm_head = peft_model.base_model.model.rm_head.weight.detach().clone()
    merged = peft_model.merge_and_unload().eval()
    return merged, rm_head, tokenizer


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return _write_base(tmp_path_factory.mktemp("qwen2vl_tiny"))


@pytest.fixture(scope="module")
def published(tmp_path_factory, base_dir):
    folder = tmp_path_factory.mktemp("videoreward")
    return folder, *_write_reward(folder, base_dir)


@pytest.fixture(scope="module")
def reward(published):
    return load_reward("videoreward", path=published[0], **SMALL)


def _videos(n: int = 2, t: int = 9, h: int = 60, w: int = 90, seed: int = 3) -> torch.Tensor:
    """uint8-level videos [n, t, 3, h, w] in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, t, 3, h, w), generator=g).float() / 255


# ---------------------------------------------------------------------------------------- pure rules
def test_build_prompt_fills_the_template_with_one_token_each():
    text = build_prompt("a {curly} prompt", TEMPLATE)
    assert text == TEMPLATE.replace("{text_prompt}", "a {curly} prompt")
    positions = [text.index(token) for token in SPECIAL_TOKENS]
    assert [text.count(token) for token in SPECIAL_TOKENS] == [1, 1, 1]
    assert positions == sorted(positions)  # VQ, MQ, TA in sequence order
    assert positions[1] < text.index("a {curly} prompt") < positions[2]  # only TA sees the prompt


def test_frame_sampling_follows_the_reference_rule():
    # 33 frames at 8 fps = 4.1 s -> 8.25 -> 8 frames; at 16 fps -> 4.1 -> the minimum 4
    assert sample_frame_indices(33, video_fps=8) == [0, 5, 9, 14, 18, 23, 27, 32]
    assert sample_frame_indices(33, video_fps=16) == [0, 11, 21, 32]
    assert sample_frame_indices(9, video_fps=8) == [0, 3, 5, 8]
    assert sample_frame_indices(3, video_fps=8) == [0, 2]  # capped at the even count <= 3
    assert sample_frame_indices(161, video_fps=16) == torch.linspace(0, 160, 20).round().long().tolist()
    assert sample_frame_indices(10, video_fps=8, target_frames=5) == [
        0,
        3,
        6,
        9,
    ]  # round(2.5) = 2 -> 4 frames
    with pytest.raises(RewardInputError, match="needs at least 2"):
        sample_frame_indices(1, video_fps=8)


def test_smart_resize_numbers():
    # 480 x 832 (Wan) under 448 * 448 pixels: beta = sqrt(480 * 832 / 200704) -> 336 x 588
    assert smart_resize(480, 832, factor=28, min_pixels=128 * 28 * 28, max_pixels=200704) == (336, 588)
    assert smart_resize(448, 448, factor=28, min_pixels=128 * 28 * 28, max_pixels=200704) == (448, 448)
    # small frames are enlarged to at least 128 * 28 * 28 pixels: 64 x 64 -> ceil(64 * 4.95 / 28) * 28 = 336
    assert smart_resize(64, 64, factor=28, min_pixels=128 * 28 * 28, max_pixels=200704) == (336, 336)


def test_resize_matches_torchvision_on_uint8_frames():
    """The reference resizes uint8 frames with torchvision (bicubic, antialias) before the processor."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize

    videos = _videos(n=1, t=2, h=100, w=150)
    size = smart_resize(100, 150, factor=28, min_pixels=128 * 28 * 28, max_pixels=200704)
    ref = resize(
        (videos[0] * 255).round().to(torch.uint8), list(size), InterpolationMode.BICUBIC, antialias=True
    )
    from flowalign.rewards.videoreward_inputs import resize_frames

    ours = resize_frames(videos[0], size)
    assert ours.shape == (2, 3, *size) == (2, 3, 280, 392)
    diff = (ours * 255 - ref.float()).abs()
    assert diff.max() <= 1 and diff.mean() < 1e-3  # exact but for rare .5 ties in float rounding


def test_position_ids_follow_the_reference_rope_rule(reward):
    """Text after the video continues from the largest video position + 1 (here the temporal one)."""
    video = reward.spec.video_token_id
    ids = torch.tensor([[1, 2, video, video, video, 5, 6, 0]])  # grid_t 3, merged 1 x 1
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])
    pos = reward.position_ids(ids, mask, (3, 2, 2))
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 1]  # temporal axis
    assert pos[1, 0].tolist() == [0, 1, 2, 2, 2, 5, 6, 1]  # height axis
    assert pos[2, 0].tolist() == pos[1, 0].tolist()


# ---------------------------------------------------------------------------- the loaded reward model
def test_registry_lists_and_loads_videoreward(reward):
    assert "videoreward" in available_rewards()
    assert reward.dimensions == ("vq", "mq", "ta") and reward.media_kind == "video"
    assert reward.normalisation is None and not reward.training
    assert all(not p.requires_grad for p in reward.parameters())


def test_matches_transformers_processor_and_merged_model(published, reward):
    """Our tensor preprocessing + loader == Qwen2VLProcessor + PEFT-merged HF model + manual pooling."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    _, merged, rm_head, tokenizer = published
    videos = _videos()
    frames = [
        resize(
            (v[[0, 3, 5, 8]] * 255).round().to(torch.uint8),
            [56, 84],
            InterpolationMode.BICUBIC,
            antialias=True,
        )
        for v in videos
    ]  # the reference: 4 frames at 2 fps from 9 at 8 fps, resized as uint8, then float in [0, 255]
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        video_processor=Qwen2VLVideoProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 200704}),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    chats = [
        [
            {
                "role": "user",
                "content": [{"type": "video"}, {"type": "text", "text": build_prompt(p, TEMPLATE)}],
            }
        ]
        for p in PROMPTS
    ]
    text = processor.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
    ref = processor(
        text=text,
        videos=[f.float() for f in frames],
        padding=True,
        return_tensors="pt",
        videos_kwargs={"do_rescale": True, "cap_pixels_per_frame": False},
    )
    ours = reward.prepare_inputs(videos, PROMPTS)
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["attention_mask"], ref["attention_mask"])
    assert torch.equal(ours["video_grid_thw"], ref["video_grid_thw"])
    torch.testing.assert_close(ours["pixel_values_videos"], ref["pixel_values_videos"], atol=1e-5, rtol=0)

    with torch.no_grad():
        hidden = merged.model(**ref, use_cache=False).last_hidden_state  # transformers' own M-RoPE positions
    special = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    expected = torch.stack(
        [
            torch.stack([hidden[b, ref["input_ids"][b].tolist().index(s)] @ rm_head[0] for s in special])
            for b in range(2)
        ]
    )  # [2, 3]: the shared head row at each sequence's VQ, MQ, TA token
    got = reward.score(videos, PROMPTS)
    torch.testing.assert_close(
        torch.stack([got["vq_raw"], got["mq_raw"], got["ta_raw"]], 1), expected, atol=1e-5, rtol=1e-5
    )


def test_pooling_reads_each_reward_token_position(reward):
    videos = _videos()
    inputs = reward.prepare_inputs(videos, PROMPTS)
    positions = inputs.pop("special_positions")
    for b in range(2):
        tokens = inputs["input_ids"][b]
        assert [int(tokens[p]) for p in positions[b]] == list(reward.spec.special_token_ids)
    with torch.no_grad():
        hidden = reward.backbone(**inputs, use_cache=False).last_hidden_state
        raw = reward.raw_rewards(videos, PROMPTS)
    w = reward.head.weight[0]
    manual = torch.stack([torch.stack([hidden[b, p] @ w for p in positions[b]]) for b in range(2)])
    torch.testing.assert_close(raw, manual, atol=1e-5, rtol=1e-5)
    # the TA token is the last of the three and follows the user prompt
    assert bool((positions[:, 0] < positions[:, 1]).all() and (positions[:, 1] < positions[:, 2]).all())


def test_normalisation_uses_the_stored_statistics(published, reward):
    got = reward.score(_videos(), PROMPTS)
    for dim in ("VQ", "MQ", "TA"):
        mean, std = STATS[f"{dim}_mean"], STATS[f"{dim}_std"]
        d = dim.lower()
        torch.testing.assert_close(got[d], (got[f"{d}_raw"] - mean) / std)
    torch.testing.assert_close(got["overall"], got["vq"] + got["mq"] + got["ta"])
    raw_only = load_reward("videoreward", path=published[0], use_norm=False, **SMALL).score(
        _videos(), PROMPTS
    )
    torch.testing.assert_close(raw_only["vq"], got["vq_raw"])
    torch.testing.assert_close(raw_only["overall"], got["vq_raw"] + got["mq_raw"] + got["ta_raw"])


def test_combiner_sums_the_normalised_dimensions_once(reward):
    from flowalign.rewards import RewardCombiner

    got = reward.score(_videos(), PROMPTS)
    combined = RewardCombiner([reward]).score(_videos(), PROMPTS)
    for dim in ("vq", "mq", "ta"):
        torch.testing.assert_close(combined[f"{dim}_norm"], got[dim])  # not normalised a second time
    torch.testing.assert_close(combined["overall"], got["overall"])
    weighted = RewardCombiner([reward], weights={"ta": 2.0}).score(_videos(), PROMPTS)
    torch.testing.assert_close(weighted["overall"], 2 * got["ta"])


def test_deterministic_and_batch_equals_singles(reward):
    videos = _videos()
    first = reward.score(videos, PROMPTS)
    again = reward.score(videos, PROMPTS)
    singles = [reward.score(videos[i : i + 1], PROMPTS[i : i + 1]) for i in range(2)]
    for key, value in first.items():
        assert torch.equal(value, again[key])
        torch.testing.assert_close(value, torch.cat([s[key] for s in singles]), atol=1e-5, rtol=1e-5)
    small_batches = reward.score(videos, PROMPTS, batch_size=9)  # one 9-frame video per pass
    torch.testing.assert_close(small_batches["overall"], first["overall"], atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_pixels(reward):
    videos = _videos(n=1).requires_grad_(True)
    reward.score(videos, PROMPTS[:1], differentiable=True)["overall"].sum().backward()
    assert videos.grad is not None and torch.isfinite(videos.grad).all()
    used = videos.grad[0].abs().flatten(1).sum(1)  # per input frame
    assert (used[[0, 3, 5, 8]] > 0).all() and (used[[1, 2, 4, 6, 7]] == 0).all()


def test_adapter_layout_gives_the_same_scores(tmp_path, base_dir, reward):
    _write_reward(tmp_path, base_dir, layout="adapter")
    assert not (tmp_path / "checkpoint-7" / "model.pth").exists()
    adapter = load_reward("videoreward", path=tmp_path, **SMALL)
    full, split = reward.score(_videos(), PROMPTS), adapter.score(_videos(), PROMPTS)
    for key in full:
        torch.testing.assert_close(split[key], full[key], atol=1e-5, rtol=1e-5)


def test_three_output_head_takes_the_diagonal(tmp_path, base_dir):
    merged, rm_head, _ = _write_reward(tmp_path, base_dir, output_dim=3, seed=5)
    reward = load_reward("videoreward", path=tmp_path, **SMALL)
    assert reward.head.weight.shape == (3, 32)
    inputs = reward.prepare_inputs(_videos(), PROMPTS)
    positions = inputs.pop("special_positions")
    with torch.no_grad():
        hidden = reward.backbone(**inputs, use_cache=False).last_hidden_state
    got = reward.score(_videos(), PROMPTS)
    for k, dim in enumerate(("vq", "mq", "ta")):
        manual = torch.stack([hidden[b, positions[b, k]] @ rm_head[k] for b in range(2)])  # row k at token k
        torch.testing.assert_close(got[f"{dim}_raw"], manual, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ errors
def test_bad_inputs_get_clear_errors(reward):
    with pytest.raises(RewardInputError, match="scores videos"):
        reward.score(torch.rand(2, 3, 56, 56), PROMPTS)
    with pytest.raises(RewardInputError, match="0 frame"):
        reward.score(torch.rand(2, 0, 3, 56, 56), PROMPTS)
    with pytest.raises(RewardInputError, match="1 frame"):
        reward.score(torch.rand(2, 1, 3, 56, 56), PROMPTS)
    with pytest.raises(RewardInputError, match="got 1 prompts for 2 media items"):
        reward.score(_videos(), PROMPTS[:1])
    with pytest.raises(RewardInputError, match=r"<\|TA_reward\|> must occur exactly once"):
        reward.score(_videos(n=1), ["a cat <|TA_reward|>"])
    with pytest.raises(RewardInputError, match="needs one prompt per media item"):
        reward.score(_videos(), None)


def test_missing_files_and_keys_are_named(tmp_path, published):
    folder = published[0]
    with pytest.raises(FileNotFoundError, match="model_config.json not found"):
        load_reward("videoreward", path=tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_reward("videoreward", path=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint-3 \(found steps \[7\]\)"):
        load_reward("videoreward", path=folder, checkpoint_step=3)

    config = json.loads((folder / "model_config.json").read_text())
    (tmp_path / "prompt_template.txt").write_text(TEMPLATE)
    (tmp_path / "checkpoint-1").mkdir()
    for edit, message in (
        (lambda c: c["data_config"].pop("fps"), "missing key data_config.fps"),
        (
            lambda c: c["data_config"].update(prompt_template_type="simple"),
            "prompt_template_type is 'simple'",
        ),
        (lambda c: c.pop("model_config"), "missing section 'model_config'"),
        (lambda c: c["inference_config"].update(TA_std=0.0), "TA_mean/TA_std"),
    ):
        broken = json.loads(json.dumps(config))
        edit(broken)
        (tmp_path / "model_config.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=message):
            load_reward("videoreward", path=tmp_path)
    (tmp_path / "model_config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="no weights in .*checkpoint-1"):
        load_reward("videoreward", path=tmp_path)

    state = torch.load(folder / "checkpoint-7" / "model.pth", weights_only=True)
    state.pop("base_model.model.rm_head.weight")
    torch.save(state, tmp_path / "checkpoint-1" / "model.pth")
    (tmp_path / "checkpoint-1" / "tokenizer").symlink_to(folder / "checkpoint-7" / "tokenizer")
    with pytest.raises(ValueError, match="missing key 'rm_head.weight'"):
        load_reward("videoreward", path=tmp_path)
    with pytest.raises(ValueError, match=r"LoRA on 'model.layers.0.self_attn.q_proj' lacks \['B'\]"):
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
        convert_checkpoint({k: v for k, v in state.items() if k != key}, lora_scaling=2.0, source="x.pth")
    state["base_model.model.model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    state["base_model.model.rm_head.weight"] = torch.zeros(1, 32)
    torch.save(state, tmp_path / "checkpoint-1" / "model.pth")
    with pytest.raises(
        ValueError, match=r"unexpected \['backbone.language_model.layers.0.mlp.extra.weight'\]"
    ):
        load_reward("videoreward", path=tmp_path)


# ---------------------------------------------------------------------------------- prompt template
def _config_only(folder: Path, published_folder: Path) -> Path:
    """A folder with model_config.json only: the template is read before any weights are looked for."""
    (folder / "model_config.json").write_text((published_folder / "model_config.json").read_text())
    return folder


def test_missing_template_says_where_to_put_it(tmp_path, published):
    folder = _config_only(tmp_path, published[0])
    expected = (
        r"save VideoAlign's 'detailed_special' template \(train/prompt_template.py in KwaiVGI/VideoAlign\) "
        rf"as {re.escape(str(tmp_path / 'prompt_template.txt'))} or pass template=PATH"
    )
    with pytest.raises(FileNotFoundError, match=expected):
        load_reward("videoreward", path=folder)
    with pytest.raises(FileNotFoundError, match=r"prompt template .*elsewhere.txt not found"):
        load_reward("videoreward", path=folder, template=tmp_path / "elsewhere.txt")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("<|MQ_reward|>", ""), r"exactly once .*'<\|MQ_reward\|>': 0"),
        (lambda t: t.replace("<|VQ_reward|>", "<|VQ_reward|> <|VQ_reward|>"), r"'<\|VQ_reward\|>': 2"),
        (
            lambda t: (
                t.replace("<|VQ_reward|>", "@")
                .replace("<|MQ_reward|>", "<|VQ_reward|>")
                .replace("@", "<|MQ_reward|>")
            ),
            r"in the order .* got \['<\|MQ_reward\|>', '<\|VQ_reward\|>', '<\|TA_reward\|>'\]",
        ),
        (lambda t: t.replace("{text_prompt}", "a prompt"), r"\{text_prompt\} exactly once .*found \[\]"),
        (lambda t: t + "{text_prompt}", r"found \['\{text_prompt\}', '\{text_prompt\}'\]"),
        (lambda t: t + "{mood}", r"found \['\{text_prompt\}', '\{mood\}'\]"),
        (lambda t: t + "}", "not a str.format template"),
    ],
)
def test_malformed_template_errors_name_the_file(tmp_path, published, edit, message):
    folder = _config_only(tmp_path, published[0])
    path = folder / "prompt_template.txt"
    path.write_text(edit(TEMPLATE))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: .*{message}"):
        load_reward("videoreward", path=folder)


def test_template_hash_mismatch_warns_once(tmp_path, monkeypatch):
    path = tmp_path / "mine.txt"
    path.write_text(TEMPLATE)
    with pytest.warns(
        UserWarning, match=rf"{re.escape(str(path))} differs .*scores will not match the published checkpoint"
    ):
        assert read_template(path) == TEMPLATE
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_template(path) == TEMPLATE  # the same file and text: no second warning
        other = tmp_path / "published.txt"
        other.write_text(TEMPLATE)
        digest = hashlib.sha256(TEMPLATE.encode()).hexdigest()
        monkeypatch.setattr(videoreward_inputs, "PUBLISHED_TEMPLATE_SHA256", digest)
        assert read_template(other) == TEMPLATE  # matching digest: no warning at all


def test_template_argument_overrides_the_folder_file(tmp_path, published, reward):
    assert reward.spec.prompt_template == TEMPLATE
    override = tmp_path / "override.txt"
    text = TEMPLATE.replace("Score the clip below", "Judge this video")
    override.write_text(text)
    other = load_reward("videoreward", path=published[0], template=override, **SMALL)
    assert other.spec.prompt_template == text
    assert "Judge this video" in other.chat_text(PROMPTS[0])
    assert "Score the clip below" not in other.chat_text(PROMPTS[0])
    # the instructions precede the reward tokens, so every dimension's score changes
    before, after = reward.score(_videos(), PROMPTS), other.score(_videos(), PROMPTS)
    for key in ("vq_raw", "mq_raw", "ta_raw"):
        assert not torch.allclose(before[key], after[key])
