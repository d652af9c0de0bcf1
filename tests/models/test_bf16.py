"""Every family samples in bf16: the tiny SD3, FLUX and Wan folders loaded in bf16 on the CPU."""

from __future__ import annotations

import json

import pytest
import torch
from stand_ins import MeanPixelReward, registered_mean_pixel
from torch import nn

from flowalign.data.media import load_image, load_media, load_video
from flowalign.models import load_flow_model
from flowalign.models.base import net_dtype
from flowalign.pipelines.generate_files import GenerationSettings, generate_files
from flowalign.workflows.pairs import PairsConfig, build_pairs

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["sd3", "flux", "wan"]
PROMPTS = ["a cat", "a red square on the left"]
BF16_UNIT_ROUNDOFF = 2.0**-8  # bf16 keeps 8 significant bits (7 stored + the implicit one)


def _size(family: str) -> dict:
    return dict(height=64, width=64, num_frames=5 if family == "wan" else 1)


BRIGHTNESS = registered_mean_pixel()


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_files_in_bf16_writes_finite_media_of_the_right_shape(family, tiny_model_dir, tmp_path):
    """What ``flowalign generate --dtype bf16`` runs: bf16 weights (Wan's VAE fp32), fp32 sampler state."""
    model = load_flow_model(tiny_model_dir(family), torch_dtype=torch.bfloat16)
    expected_vae = torch.float32 if family == "wan" else torch.bfloat16
    assert model.dtype == model.compute_dtype == torch.bfloat16
    assert {p.dtype for p in model.pipe.vae.parameters()} == {expected_vae}
    for name in (n for n in model.modules() if n.startswith("text_encoder")):
        assert net_dtype(model.modules()[name]) == torch.bfloat16, name
    seen = []

    def record(v_fn):
        def v(x, t):
            out = v_fn(x, t)
            seen.append((x.dtype, out.dtype, bool(torch.isfinite(out).all())))
            return out

        return v

    size = _size(family)
    settings = GenerationSettings(num_inference_steps=2, guidance_scale=2.0, **size)
    rows = generate_files(
        model, PROMPTS, tmp_path, settings, batch_size=2, velocity_transforms=[record], progress=False
    )
    assert len(seen) == 2  # one batched (CFG) velocity per step
    assert all(s == (torch.float32, torch.float32, True) for s in seen), seen
    assert [r["id"] for r in rows] == ["000000", "000001"]
    manifest = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [r["file"] for r in manifest] == [r["file"] for r in rows]
    for row in rows:
        path = tmp_path / row["file"]
        if family == "wan":
            media = load_video(path)
            assert media.shape == (size["num_frames"], 3, size["height"], size["width"])
        else:
            media = load_image(path)
            assert media.shape == (3, size["height"], size["width"])
        assert torch.isfinite(media).all() and media.std() > 0  # not a blank (NaN-cast) image


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_velocity_is_within_the_first_order_rounding_bound_of_fp32(family, tiny_model_dir):
    """The bf16 model's velocity equals the fp32 model's up to bf16 rounding.

    Derivation of the tolerance: bf16 keeps 8 significant bits, so each rounding perturbs a value
    by a relative u = 2^-8 at most. On the way from the inputs to the velocity the bf16 model rounds
    the inputs and the timestep embedding (2 roundings), and for each parameterised layer its
    weights (once, at load) and its output (once). To first order the relative perturbations add,
    so with L such layers (here every Linear/Conv of the transformer, an upper bound on the length
    of any path through it) the relative error is at most (2L + 2) u, provided the network does not
    amplify relative perturbations, which holds for these randomly initialised networks whose
    layers are close to isometries. A dtype bug (a timestep not scaled, fp32 inputs reaching
    bf16 weights through the wrong branch, a half-precision overflow) gives an O(1) error instead.
    Compared in fp64, as a relative RMS over the whole batch.
    """
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_flow_model(tiny_model_dir(family), torch_dtype=dtype)
        size = _size(family)
        noise = model.prepare_noise(
            2,
            height=size["height"],
            width=size["width"],
            num_frames=size["num_frames"],
            generator=torch.Generator().manual_seed(0),
        )
        with torch.no_grad():
            cond, _ = model.encode_prompt(PROMPTS)
            v = model.velocity(noise, torch.tensor([0.7, 0.3]), cond)
        assert v.dtype == torch.float32 and v.shape == noise.shape
        outs[dtype] = v.double()
    layers = sum(isinstance(m, nn.Linear | nn.Conv2d | nn.Conv3d) for m in model.transformer.modules())
    bound = (2 * layers + 2) * BF16_UNIT_ROUNDOFF
    ref, low = outs[torch.float32], outs[torch.bfloat16]
    rel = float((low - ref).norm() / ref.norm())
    assert 0 < rel <= bound, f"{family}: relative error {rel:.4g}, bound {bound:.4g} ({layers} layers)"


def test_component_dtypes_keep_wan_vae_fp32_and_take_overrides():
    from flowalign.models.sd3 import SD3Model
    from flowalign.models.wan import WanModel

    bf16, fp32 = torch.bfloat16, torch.float32
    assert SD3Model.component_dtypes(bf16) == {"default": bf16}
    assert WanModel.component_dtypes(bf16) == {"default": bf16, "vae": fp32}
    assert WanModel.component_dtypes({"default": bf16, "transformer": fp32, "vae": bf16}) == {
        "default": bf16,
        "transformer": fp32,
        "vae": bf16,
    }


def test_net_dtype_counts_base_weights_not_lora_or_fp32_islands():
    net = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)).to(torch.bfloat16)
    net[1].float()  # an fp32 island smaller than the bf16 base
    assert net_dtype(net) == torch.bfloat16
    net.lora_A = nn.Linear(8, 64)  # fp32 adapter weights, larger than the base: still not counted
    assert net_dtype(net) == torch.bfloat16
    assert net_dtype(nn.Linear(2, 2)) == torch.float32


@pytest.mark.parametrize("family", FAMILIES)
def test_build_pairs_in_bf16(family, tiny_model_dir, tmp_path):
    """What ``flowalign pairs`` runs, on a model loaded in bf16: scored candidates, one pair per prompt."""
    model = load_flow_model(tiny_model_dir(family), torch_dtype=torch.bfloat16)
    size = _size(family)
    model.default_height, model.default_width = size["height"], size["width"]  # PairsConfig has no size
    model.default_num_frames = size["num_frames"]
    brightness = MeanPixelReward()

    def score(media, prompts):
        assert media.dtype == torch.float32 and torch.isfinite(media).all()
        out = brightness.score(media, prompts)
        return {**out, "overall": out["bright"]}

    config = PairsConfig(num_candidates=2, num_inference_steps=2, video_ext=".npy")
    candidates, chosen = build_pairs(model, PROMPTS, score, tmp_path, config, progress=False)
    assert len(chosen) == len(PROMPTS)
    assert torch.isfinite(candidates.scores["overall"]).all()
    rows = [json.loads(line) for line in (tmp_path / "candidates.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * len(PROMPTS)
    shape = (3, size["height"], size["width"])
    if family == "wan":
        shape = (size["num_frames"], *shape)
    for row in rows:
        assert load_media(tmp_path / row["file"]).shape == shape


@pytest.mark.parametrize("family", FAMILIES)
def test_run_eval_in_bf16(family, tiny_model_dir, tmp_path):
    """What ``flowalign eval`` runs, with ``EvalOptions.dtype`` bf16: every sample generated and scored."""
    from flowalign.evals import EvalOptions, run_eval

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    size = _size(family)
    options = EvalOptions(
        settings=GenerationSettings(num_inference_steps=2, **size), dtype=torch.bfloat16, num_resamples=20
    )
    result = run_eval(
        {"m": tiny_model_dir(family)},
        str(prompts),
        [BRIGHTNESS],
        out_dir=tmp_path / "eval",
        options=options,
        render=False,
        progress=False,
    )
    assert result.failures == []
    assert result.report["timings"]["num_samples"] == len(PROMPTS)
    assert result.report["settings"]["options"]["dtype"] == "bfloat16"
    stats = result.report["results"]["prompts"]["stats"]["m"]["bright"]
    assert stats["n"] == len(PROMPTS) and 0 < stats["min"] <= stats["max"] < 1
