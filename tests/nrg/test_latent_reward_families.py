"""Latent reward + Flow-NRG on the newer families: `train latent-reward` (two steps, from scored
candidates of the tiny model) exports a guide that loads against the model, and one Flow-NRG guided
generation differs from the unguided one and is finite.

Also, per trunk: the trunk's scores depend on x_t, its parameters that never reach the scores are the
ones a backward pass leaves without gradient (what DDP needs frozen), and a saved guide reloads to the
same scores bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from flowalign.cli import app
from flowalign.models import load_flow_model
from flowalign.models.tiny_conditioned import save_tiny_conditioned
from flowalign.pipelines import FlowPipeline
from flowalign.rewards.latent import LatentRewardModel
from flowalign.sampling.nrg import latent_reward_guidance

runner = CliRunner()
PROMPTS = ["a small red circle in the center", "a large blue square"]
IMAGE = dict(height=32, width=32)
VIDEO = dict(height=32, width=32, num_frames=5)
SIZES = {
    "flux2": IMAGE,
    "flux2-klein": IMAGE,
    "qwen-image": IMAGE,
    "z-image": IMAGE,
    "flux": IMAGE,
    "hunyuan_video15": VIDEO,
    "ltx2": dict(height=64, width=64, num_frames=9),
    "wan22": VIDEO,
    "wan22-ti2v": VIDEO,
}
CONDITIONED = {"wan22", "wan22-ti2v", "wan-i2v", "wan22-i2v"}
# one image, one video, one two-expert and one image-to-video family stay in the fast suite (< 10 s each
# on two cores); the others run with -m slow
FAST = {"qwen-image", "ltx2", "wan22", "wan-i2v"}
COMMON = ["--set", "train.batch_size=2", "--set", "train.trackers=[]", "--set", "train.cpu=true"]


def _families(names):
    return [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in names]


@pytest.fixture(scope="module")
def family_dir(tiny_model_dir, tmp_path_factory):
    made: dict[str, object] = {}

    def get(family: str):
        if family in CONDITIONED:
            if family not in made:
                made[family] = save_tiny_conditioned(family, tmp_path_factory.mktemp(f"tiny-{family}"))
            return made[family]
        return tiny_model_dir(family)

    return get


def _candidates(model, out, size):
    from flowalign.workflows.pairs import PairsConfig, build_pairs

    def scores(media, prompts):
        flat = media.flatten(1)
        return {"vq": flat.mean(1), "ta": flat.std(1), "overall": flat.mean(1)}

    config = PairsConfig(num_candidates=2, num_inference_steps=2, guidance_scale=1.0, **size)
    build_pairs(model, PROMPTS, scores, out, config, progress=False)
    return out / "candidates.jsonl"


@pytest.mark.parametrize("family", _families(SIZES))
def test_train_latent_reward_then_guide(family_dir, tmp_path, family):
    folder, size = family_dir(family), SIZES[family]
    model = load_flow_model(folder)
    candidates = _candidates(model, tmp_path / "pairs", size)
    res = runner.invoke(
        app,
        ["train", "latent-reward", "--model", str(folder), "--data", str(candidates)]
        + ["--out", str(tmp_path / "rm"), "--steps", "2", "--dimensions", "vq,ta", *COMMON]
        + ["--set", "reward.num_blocks=1", "--set", "reward.tie_margin=0", "--set", "train.optim.lr=0.01"],
    )
    assert res.exit_code == 0, res.output
    guide = LatentRewardModel.from_pretrained(tmp_path / "rm" / "final", model=model)
    assert all(std > 0 for _, std in guide.normalisation.values())

    def sample(transforms):
        gen = torch.Generator().manual_seed(3)
        kw = dict(num_inference_steps=3, guidance_scale=1.0, generator=gen, **size)
        return FlowPipeline(model)(list(PROMPTS), velocity_transforms=transforms, **kw).latents

    plain = sample([])
    nrg = latent_reward_guidance(model, guide, PROMPTS, {"vq": 1.0, "ta": 0.5}, strength=1.0)
    guided = sample([nrg])
    assert torch.isfinite(guided).all()
    # the unguided run repeats bit for bit on the CPU; any difference is the guidance term
    assert torch.equal(plain, sample([]))
    assert (guided - plain).abs().max() > 1e-4


@pytest.mark.parametrize("family", _families(["wan-i2v", "wan22-i2v"]))
def test_image_to_video_guide_reads_the_condition_image(family_dir, tmp_path, family):
    """Candidates with condition images -> `train latent-reward` (each pair encoded with its image) ->
    Flow-NRG on the same images, in the library and through `generate --guide --image`."""
    import numpy as np
    import PIL.Image

    folder = family_dir(family)
    model = load_flow_model(folder)
    files = []
    for i in range(len(PROMPTS)):
        pixels = np.random.default_rng(i).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        files.append(tmp_path / f"cond{i}.png")
        PIL.Image.fromarray(pixels).save(files[-1])
    from flowalign.workflows.pairs import PairsConfig, build_pairs

    def scores(media, prompts):
        flat = media.flatten(1)
        return {"vq": flat.mean(1), "ta": flat.std(1), "overall": flat.mean(1)}

    config = PairsConfig(num_candidates=2, num_inference_steps=2, guidance_scale=1.0, **VIDEO)
    build_pairs(model, PROMPTS, scores, tmp_path / "pairs", config, progress=False, images=files)
    res = runner.invoke(
        app,
        [
            "train",
            "latent-reward",
            "--model",
            str(folder),
            "--data",
            str(tmp_path / "pairs" / "candidates.jsonl"),
        ]
        + ["--out", str(tmp_path / "rm"), "--steps", "2", "--dimensions", "vq,ta", *COMMON]
        + ["--set", "reward.num_blocks=1", "--set", "reward.tie_margin=0", "--set", "train.optim.lr=0.01"],
    )
    assert res.exit_code == 0, res.output
    guide = LatentRewardModel.from_pretrained(tmp_path / "rm" / "final", model=model)
    images = [PIL.Image.open(f) for f in files]
    cond, _ = model.encode_prompt(list(PROMPTS), images=images, **VIDEO)

    def sample(transforms):
        gen = torch.Generator().manual_seed(3)
        kw = dict(num_inference_steps=3, guidance_scale=1.0, generator=gen, image=images, **VIDEO)
        return FlowPipeline(model)(list(PROMPTS), velocity_transforms=transforms, **kw).latents

    plain = sample([])
    nrg = latent_reward_guidance(model, guide, PROMPTS, {"vq": 1.0}, strength=1.0, cond=cond)
    guided = sample([nrg])
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-4
    cli = runner.invoke(
        app,
        ["generate", "--model", str(folder), "--prompt", PROMPTS[0], "--image", str(files[0])]
        + ["--steps", "2", "--height", "32", "--width", "32", "--num-frames", "5"]
        + ["--guide", str(tmp_path / "rm" / "final"), "--out", str(tmp_path / "gen")],
    )
    assert cli.exit_code == 0, cli.output


@pytest.mark.parametrize("family", ["flux2", "ltx2"])
def test_unused_trunk_parameters_are_exactly_those_without_gradient(tiny_model_dir, family):
    """unused_parameters() (a probe at the smallest size) are the parameters a backward pass on a batch of
    another size leaves without gradient (what DDP needs frozen); FLUX.2's single-stream modulation and LTX-2's
    audio stream are among the unused ones."""
    model = load_flow_model(tiny_model_dir(family))
    guide = LatentRewardModel.from_flow_model(model, dimensions=["vq"], num_blocks=1)
    unused = {id(p) for p in guide.unused_parameters()}
    names = [n for n, p in guide.trunk.named_parameters() if id(p) in unused]
    assert any(("single_stream_modulation" if family == "flux2" else "audio") in n for n in names)
    size = SIZES[family]
    cond, _ = model.encode_prompt(list(PROMPTS))
    shape = model.latent_shape(2, 2 * size["height"], 2 * size["width"], size.get("num_frames", 1))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    guide(x, torch.tensor([0.2, 0.9]), cond)["vq"].sum().backward()
    without = {id(p) for p in guide.parameters() if p.grad is None}
    assert without == unused
