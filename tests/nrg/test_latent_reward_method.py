"""Training the latent reward model: labels, shared noising, one step, the loop, export."""

from __future__ import annotations

import pytest
import torch
from nrg_helpers import IMAGE_PROMPTS
from torch import nn

from flowalign.config import LoraConfig, TrainConfig
from flowalign.objectives.bt_ties import labels_from_scores
from flowalign.rewards.latent import LatentRewardModel
from flowalign.rewards.toy import ToyOracleReward
from flowalign.training.loop import train
from flowalign.training.method import StepContext
from flowalign.training.methods.latent_reward import (
    LatentRewardTraining,
    LatentRewardTrainingConfig,
    PreferenceItems,
    ScoredPairs,
    pairs_within_groups,
)


def _pairs(n: int = 4, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "prompt": IMAGE_PROMPTS[i % 2],
            "latents_w": torch.rand(3, 24, 24, generator=g) * 2 - 1,
            "latents_l": torch.rand(3, 24, 24, generator=g) * 2 - 1,
            "labels": {"VQ": 1, "TA": [1, -1, 0, -2][i % 4]},
            "index": i,
        }
        for i in range(n)
    ]


def _method(model, **overrides) -> LatentRewardTraining:
    cfg = LatentRewardTrainingConfig(num_blocks=1, head_hidden=16, **overrides)
    return LatentRewardTraining(model, cfg)


def _ctx(method, step=0):
    return StepContext(step=step, seed=0, modules=method.trainable_modules())


class _Spy(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x_t, t, cond):
        self.calls.append((x_t.detach().clone(), t.detach().clone()))
        return self.inner(x_t, t, cond)


def test_labels_from_scores_are_antisymmetric_with_a_tie_band():
    a = torch.tensor([[0.9, 0.50], [0.1, 0.52], [float("nan"), 0.3]])
    b = torch.tensor([[0.2, 0.52], [0.8, 0.50], [0.5, 0.9]])
    labels = labels_from_scores(a, b, tie_margin=0.05)
    assert labels.tolist() == [[1, 0], [-1, 0], [-2, -1]]
    swapped = labels_from_scores(b, a, tie_margin=0.05)
    assert torch.equal(torch.where(labels == -2, labels, -labels), swapped)
    assert labels_from_scores(a[:2], b[:2]).tolist() == [[1, -1], [-1, 1]]  # no margin: strict sign


def test_pairs_within_groups_pairs_only_same_group_items():
    assert pairs_within_groups(["a", "b", "a", "a", "b"]) == [(0, 2), (0, 3), (2, 3), (1, 4)]
    assert pairs_within_groups(["a", "a", "a"], max_pairs_per_group=1) == [(0, 1)]


def test_scored_pairs_label_by_score_difference():
    latents = torch.randn(4, 3, 8, 8)
    scores = {"vq": torch.tensor([0.9, 0.1, 0.5, 0.52]), "ta": torch.tensor([0.25, 0.5, 1.0, 1.0])}
    ds = ScoredPairs(
        latents, ["p", "p", "q", "q"], scores, [(0, 1), (2, 3)], tie_margin={"vq": 0.05, "ta": 0.1}
    )
    assert ds[0]["labels"] == {"vq": 1, "ta": -1} and ds[1]["labels"] == {"vq": 0, "ta": 0}
    assert torch.equal(ds[1]["latents_l"], latents[3])
    with pytest.raises(ValueError, match="distinct indices"):
        ScoredPairs(latents, ["p"] * 4, scores, [(0, 0)])


def test_shared_noise_option_noises_both_members_with_one_draw(toy_image):
    method = _method(toy_image, trunk_training="frozen", share_noise=True)
    spy = _Spy(method.reward_model)
    batch = method.collate(_pairs())
    ctx = StepContext(step=0, seed=0, modules={"latent_reward": spy})
    method.compute_loss(batch, ctx, "main")
    ((x_t, t),) = spy.calls
    x_w, x_l = x_t.chunk(2)
    t_w, t_l = t.chunk(2)
    assert torch.equal(t_w, t_l) and ((t_w > 0) & (t_w <= 0.98)).all() and t_w.unique().numel() == 4
    tt = t_w.view(-1, 1, 1, 1)
    # x_t^w - x_t^l = (1 - t)(x0_w - x0_l) only if the noise is the same draw
    torch.testing.assert_close(
        x_w - x_l, (1 - tt) * (batch.latents_w - batch.latents_l), rtol=1e-5, atol=1e-5
    )


def test_pair_members_share_t_but_not_noise_by_default(toy_image):
    method = _method(toy_image, trunk_training="frozen")
    assert not method.config.share_noise
    spy = _Spy(method.reward_model)
    batch = method.collate(_pairs())
    method.compute_loss(batch, StepContext(step=0, seed=0, modules={"latent_reward": spy}), "main")
    ((x_t, t),) = spy.calls
    t_w, t_l = t.chunk(2)
    assert torch.equal(t_w, t_l)
    tt = t_w.view(-1, 1, 1, 1)
    noise_w = (x_t.chunk(2)[0] - (1 - tt) * batch.latents_w) / tt
    noise_l = (x_t.chunk(2)[1] - (1 - tt) * batch.latents_l) / tt
    assert (noise_w - noise_l).abs().mean() > 0.5  # two unit-variance draws, not one


def test_normalisation_is_the_same_time_spread_of_scores_not_their_offset_over_t(toy_image):
    """std = sqrt(mean((r_w - r_l)^2) / 2) over the pairs: a t-dependent offset (common to a pair) does not count."""
    method = _method(toy_image, trunk_training="frozen")

    class Offset(nn.Module):  # a reward with a huge t-dependent offset on top of the real one
        def forward(self, x_t, t, cond):
            return {d: v + 1000 * t for d, v in method.reward_model(x_t, t, cond).items()}

    spy = _Spy(Offset())
    batch = method.collate(_pairs())
    with torch.no_grad():
        method.compute_loss(batch, StepContext(step=0, seed=0, modules={"latent_reward": spy}), "main")
        ((x_t, t),) = spy.calls
        cond, _ = toy_image.encode_prompt(batch.prompt)
        from flowalign.models.base import PromptEmbeds

        r = method.reward_model(x_t, t, PromptEmbeds.cat([cond, cond]))
    stats = method.score_statistics()
    for d in ("vq", "ta"):
        r_w, r_l = r[d].double().chunk(2)
        expected = float(((r_w - r_l) ** 2).mean().div(2).sqrt())
        assert stats[d][1] == pytest.approx(expected, rel=0.05)  # fp32 rounding of the +1000 t offset
        assert stats[d][1] < 10  # the offset (1000 t, t spread over [0, 0.98]) is not in it


def test_clean_input_ablation_scores_clean_latents(toy_image):
    method = _method(toy_image, trunk_training="frozen", clean_inputs=True)
    spy = _Spy(method.reward_model)
    batch = method.collate(_pairs())
    method.compute_loss(batch, StepContext(step=0, seed=0, modules={"latent_reward": spy}), "main")
    ((x_t, t),) = spy.calls
    assert (t == 0).all()
    assert torch.equal(x_t, torch.cat([batch.latents_w, batch.latents_l]))


@pytest.mark.parametrize("trunk_training", ["frozen", "lora", "full"])
def test_one_step_gives_a_finite_loss_and_changes_every_trainable_parameter(toy_image, trunk_training):
    method = _method(toy_image, trunk_training=trunk_training, lora=LoraConfig(rank=2, alpha=2.0))
    rm = method.reward_model
    trainable = {n: p for n, p in rm.named_parameters() if p.requires_grad}
    trunk_trainable = [n for n in trainable if n.startswith("trunk.")]
    if trunk_training == "frozen":
        assert not trunk_trainable
    elif trunk_training == "lora":
        assert trunk_trainable and all("lora_" in n for n in trunk_trainable)
    else:  # all but the last block's text-stream update, which the scores never read
        unused = {id(p) for p in rm.unused_parameters()}
        assert unused and len(trunk_trainable) == sum(1 for p in rm.trunk.parameters() if id(p) not in unused)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    loss, metrics = method.compute_loss(method.collate(_pairs()), _ctx(method), "main")
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert 0 <= metrics["accuracy"] <= 1 and "accuracy_vq" in metrics
    loss.backward()
    opt.step()
    unchanged = [n for n, p in trainable.items() if torch.equal(p, before[n])]
    assert not unchanged
    assert all(not p.requires_grad for p in toy_image.transformer.parameters())


def test_labels_follow_the_batch_and_unknown_names_are_refused(toy_image):
    method = _method(toy_image, trunk_training="frozen")
    batch = method.collate(_pairs())
    labels = method._labels(batch, batch.latents_w, batch.latents_l)
    assert labels.tolist() == [[1, 1], [1, -1], [1, 0], [1, -2]]  # VQ -> vq, TA -> ta, case-insensitive
    batch.labels["overall"] = torch.ones(4, dtype=torch.long)
    with pytest.raises(ValueError, match="label 'overall' matches no reward dimension"):
        method._labels(batch, batch.latents_w, batch.latents_l)
    mapped = _method(toy_image, trunk_training="frozen", label_map={"overall": "ta", "TA": "vq", "VQ": "vq"})
    del batch.labels["VQ"]
    assert mapped._labels(batch, batch.latents_w, batch.latents_l)[:, 1].tolist() == [1, 1, 1, 1]
    batch.labels = None
    with pytest.raises(ValueError, match="no 'labels' and no teacher"):
        method.compute_loss(batch, _ctx(method), "main")


def test_teacher_labels_come_from_the_clean_reward(toy_image):
    """Distillation: a rendered correct scene beats a blank image on ta; both blank -> tie."""
    from flowalign.toy.render import render_images
    from flowalign.toy.world import parse_caption, sample_scenes

    scenes = sample_scenes(8, seed=0, split="train", kind="image")
    images = render_images(scenes, size=24)
    prompts = [s.caption for s in scenes]
    assert parse_caption(prompts[0])
    blank = torch.full_like(images, 236 / 255)
    method = LatentRewardTraining(
        toy_image,
        LatentRewardTrainingConfig(num_blocks=1, head_hidden=8, trunk_training="frozen", tie_margin=0.1),
        teacher=ToyOracleReward(),
    )
    items = [
        {"prompt": p, "media_w": w, "media_l": b, "index": i}
        for i, (p, w, b) in enumerate(zip(prompts, images, blank, strict=True))
    ]
    batch = method.collate(items)
    x0_w, x0_l = method._clean_latents(batch)
    torch.testing.assert_close(x0_w, images * 2 - 1)
    labels = method._labels(batch, x0_w, x0_l)
    assert labels[:, 1].tolist() == [1] * 8
    batch.media_w = blank
    assert method._labels(batch, x0_l, x0_l)[:, 1].tolist() == [0] * 8
    loss, _ = method.compute_loss(method.collate(items), _ctx(method), "main")
    assert torch.isfinite(loss)


def test_trains_in_the_loop_and_exports_a_loadable_normalised_guide(tmp_path, toy_image):
    method = _method(toy_image, trunk_training="lora", lora=LoraConfig(rank=2, alpha=2.0))
    before = {n: p.detach().clone() for n, p in method.reward_model.named_parameters() if p.requires_grad}
    cfg = TrainConfig(output_dir=tmp_path, max_steps=3, batch_size=4, trackers=[], cpu=True, log_every=1)
    cfg.optim.lr = 1e-3
    result = train(method, _pairs(8), cfg, progress=False)
    assert result.step == 3 and result.nan_skipped == 0
    after = dict(method.reward_model.named_parameters())
    assert all(not torch.equal(after[n], v) for n, v in before.items())
    loaded = LatentRewardModel.from_pretrained(result.export_dir, model=toy_image)
    stats = method.score_statistics()
    assert set(stats) == {"vq", "ta"} and loaded.normalisation == stats
    assert loaded.spec.metadata["trunk_training"] == "lora" and loaded.spec.metadata["t_max"] == 0.98
    cond, _ = toy_image.encode_prompt(IMAGE_PROMPTS)
    x, t = torch.randn(2, 3, 24, 24), torch.tensor([0.4, 0.7])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(x, t, cond)["ta"], method.reward_model.eval()(x, t, cond)["ta"], rtol=1e-4, atol=1e-5
        )
    state = method.state_dict()
    fresh = _method(toy_image, trunk_training="frozen")
    fresh.load_state_dict(state)
    assert fresh.score_statistics() == stats


def test_human_labelled_pairs_load_through_the_preference_reader(tmp_path, toy_image):
    from flowalign.data.preference import PreferencePair, load_preference_dataset, write_preference_jsonl

    g = torch.Generator().manual_seed(0)
    rows = [
        PreferencePair(
            IMAGE_PROMPTS[i % 2],
            torch.rand(3, 24, 24, generator=g),
            torch.rand(3, 24, 24, generator=g),
            {"VQ": [1, -1, 0][i % 3], "TA": -2 if i == 1 else 1},
        )
        for i in range(4)
    ]
    path = write_preference_jsonl(tmp_path, rows)
    items = PreferenceItems(load_preference_dataset(path))
    method = _method(toy_image, trunk_training="frozen")
    batch = method.collate([{**items[i], "index": i} for i in range(4)])
    x0_w, x0_l = method._clean_latents(batch)
    torch.testing.assert_close(x0_w, batch.media_w * 2 - 1)
    assert method._labels(batch, x0_w, x0_l).tolist() == [[1, 1], [-1, -2], [0, 1], [1, 1]]
    loss, _ = method.compute_loss(batch, _ctx(method), "main")
    assert torch.isfinite(loss) and loss > 0


def test_config_is_validated():
    with pytest.raises(ValueError, match="t_min <= t_max < 1"):
        LatentRewardTrainingConfig(t_max=1.0)
    with pytest.raises(ValueError, match="tie_margin"):
        LatentRewardTrainingConfig(tie_margin=-1)
