"""Flow-GRPO on the shared loop: the first step is on-policy, the KL starts at 0, training raises a
reward, resume is exact (sampling RNG included), windows, and a tiny SD3 with CFG."""

from __future__ import annotations

import pytest
import torch

from flowalign.config import CheckpointConfig, LoraConfig, OptimConfig, TrainConfig
from flowalign.models import load_flow_model
from flowalign.training.loop import train
from flowalign.training.method import StepContext
from flowalign.training.methods.grpo import FlowGRPO, GRPOConfig, PromptItems, training_window

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a small red circle in the center", "a large blue square in the top left"]


def brightness(media: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """A reward with a known direction: the mean pixel value."""
    value = media.flatten(1).mean(1)
    return {"overall": value, "brightness": value}


def _cfg(**kw) -> GRPOConfig:
    base = dict(num_samples=4, num_inference_steps=3, guidance_scale=1.0, eta=0.5, kl_beta=0.1)
    return GRPOConfig(**(base | kw))


def _ctx(method, step=0):
    return StepContext(step=step, seed=0, modules=method.trainable_modules())


@pytest.mark.parametrize("lora", [LoraConfig(rank=4), None])
def test_first_step_is_on_policy_and_kl_is_zero(toy_model, lora):
    method = FlowGRPO(toy_model, brightness, _cfg(), lora=lora)
    batch = method.collate([{"prompt": p, "index": i} for i, p in enumerate(PROMPTS)])
    loss, metrics = method.compute_loss(batch, _ctx(method), "main")
    # the update recomputes the sampled transitions with the same network: ratio 1 up to fp32 rounding
    # of the log-probabilities (|log p| ~ 1 per element: a few eps32)
    assert abs(float(metrics["ratio"]) - 1) < 1e-5 and float(metrics["clip_frac"]) == 0.0
    assert float(metrics["kl"]) == 0.0
    loss.backward()
    grads = [p.grad for p in toy_model.transformer.parameters() if p.requires_grad and p.grad is not None]
    assert grads and any(bool(g.abs().sum() > 0) for g in grads)


def _probe(method) -> float:
    """Mean reward of ODE samples (window = []) on fixed noise: step 10**6's draws, ids 100.."""
    prompts = [p for p in PROMPTS for _ in range(8)]
    _, _, scores = method.sample(prompts, list(range(100, 116)), _ctx(method, step=10**6), [])
    return float(scores["overall"].mean())


def test_training_raises_the_reward_and_resumes_exactly(toy_image_dir, tmp_path):
    def run(out, steps, resume=False):
        torch.manual_seed(0)
        model = load_flow_model(toy_image_dir)
        method = FlowGRPO(model, brightness, _cfg(kl_beta=0.0, clip_range=0.2), lora=LoraConfig(rank=4))
        config = TrainConfig(
            output_dir=out, max_steps=steps, batch_size=2, log_every=1, trackers=[], cpu=True,
            optim=OptimConfig(lr=0.1, weight_decay=0.0), checkpoint=CheckpointConfig(every=2),
        )  # fmt: skip
        before = _probe(method)
        train(method, PromptItems(PROMPTS), config, resume=resume, progress=False)
        return method, before

    straight, before = run(tmp_path / "a", 6)
    run(tmp_path / "b", 3)
    resumed, _ = run(tmp_path / "b", 6, resume=True)
    for (name, p), q in zip(
        straight.model.transformer.named_parameters(), resumed.model.transformer.parameters(), strict=True
    ):
        assert torch.equal(p, q), name
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert (tmp_path / "b" / "metrics.jsonl").read_text().splitlines() == lines
    after = _probe(straight)
    assert after > before + 0.01, (before, after)


def test_windows():
    all_ = training_window(_cfg(num_inference_steps=6), 3, 0)
    assert all_ == list(range(6))
    cfg = _cfg(num_inference_steps=6, window="sliding", window_size=2, window_shift_every=2)
    assert [training_window(cfg, s, 0) for s in (0, 1, 2, 4, 8, 10)] == [
        [0, 1],
        [0, 1],
        [1, 2],
        [2, 3],
        [4, 5],
        [0, 1],
    ]
    cfg = _cfg(num_inference_steps=6, window="random", window_size=3)
    draws = [training_window(cfg, s, 0) for s in range(8)]
    assert all(len(w) == 3 and w == sorted(w) and set(w) <= set(range(6)) for w in draws)
    assert draws == [training_window(cfg, s, 0) for s in range(8)] and len({tuple(w) for w in draws}) > 1
    with pytest.raises(ValueError, match="grpo.num_samples"):
        GRPOConfig(num_samples=1)
    with pytest.raises(ValueError, match="grpo.window_size"):
        GRPOConfig(num_inference_steps=4, window_size=5)


def test_samples_depend_on_the_prompt_index_not_the_batch(toy_model):
    method = FlowGRPO(toy_model, brightness, _cfg(window="sliding", window_size=1), lora=LoraConfig(rank=4))
    both = method.collate([{"prompt": p, "index": i} for i, p in enumerate(PROMPTS)])
    one = method.collate([{"prompt": PROMPTS[1], "index": 1}])
    ctx = _ctx(method)
    traj2, _, s2 = method.sample([p for p in both.prompt for _ in range(4)], list(range(8)), ctx, [0])
    traj1, _, s1 = method.sample([p for p in one.prompt for _ in range(4)], list(range(4, 8)), ctx, [0])
    torch.testing.assert_close(traj2.x0[4:], traj1.x0, rtol=0, atol=1e-6)
    torch.testing.assert_close(traj2.log_probs[4:], traj1.log_probs, rtol=0, atol=1e-5)


def test_tiny_sd3_with_cfg_trains_a_step(tiny_model_dir, tmp_path):
    model = load_flow_model(tiny_model_dir("sd3"))
    cfg = _cfg(num_samples=2, num_inference_steps=2, guidance_scale=3.0, height=32, width=32)
    method = FlowGRPO(model, brightness, cfg, lora=LoraConfig(rank=4))
    method.cache_prompts(PROMPTS, offload=True)
    config = TrainConfig(
        output_dir=tmp_path / "sd3", max_steps=1, batch_size=2, log_every=1, trackers=[], cpu=True,
        optim=OptimConfig(lr=1e-3), checkpoint=CheckpointConfig(every=0),
    )  # fmt: skip
    result = train(method, PromptItems(PROMPTS), config, progress=False)
    assert result.step == 1 and abs(result.metrics["ratio"] - 1) < 1e-5 and result.metrics["kl"] == 0.0
