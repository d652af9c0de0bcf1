"""DPO in bf16 for every family: the dtype policy (frozen bf16, trainable fp32) and cached prompts."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from flowalign.config import LoraConfig, TrainConfig
from flowalign.models import load_flow_model
from flowalign.training.cache import PromptEmbedCache
from flowalign.training.loop import train
from flowalign.training.methods.common import frozen_copy
from flowalign.training.runs import DPORun, compute_dtype, prepare_dpo
from flowalign.workflows.pairs import PairsConfig, build_pairs

FAMILIES = ["sd3", "flux", "wan"]
PROMPTS = ["a red cat", "a blue dog on the left"]


def _brightness(media, prompts):
    b = media.flatten(1).float().mean(1)
    return {"overall": b}


@pytest.fixture(scope="module")
def pairs_file(tiny_model_dir, tmp_path_factory):
    """Factory: pairs.jsonl of a family, built by ``build_pairs`` from the model loaded in bf16."""
    made = {}

    def get(family: str):
        if family not in made:
            model = load_flow_model(tiny_model_dir(family), torch_dtype=torch.bfloat16)
            model.default_height = model.default_width = 32  # small candidates (an instance setting)
            model.default_num_frames = 5 if family == "wan" else 1
            out = tmp_path_factory.mktemp(f"pairs-{family}")
            config = PairsConfig(num_candidates=2, num_inference_steps=2, video_ext=".npy")
            _, chosen = build_pairs(model, PROMPTS, _brightness, out, config, progress=False)
            assert len(chosen) == len(PROMPTS)
            made[family] = out / "pairs.jsonl"
        return made[family]

    return get


def _run(model_dir, data, out, *, lora=True, cache=True, precision="bf16") -> DPORun:
    return DPORun(
        model=str(model_dir),
        data=str(data),
        train=TrainConfig(
            output_dir=out,
            max_steps=2,
            batch_size=2,
            cpu=True,
            mixed_precision=precision,
            trackers=[],
            log_every=1,
        ),
        lora=LoraConfig(rank=4) if lora else None,
        cache_prompts=cache,
    )


def _kept_fp32(module, name: str) -> bool:
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    return any(k in name.split(".") for k in keep)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_lora_dpo_steps_in_bf16(family, tiny_model_dir, pairs_file, tmp_path):
    run = _run(tiny_model_dir(family), pairs_file(family), tmp_path / "run")
    method, data = prepare_dpo(run)
    model = method.model
    result = train(method, data, run.train, progress=False, run_config=run)
    assert result.step == 2 and result.nan_skipped == 0
    assert torch.isfinite(torch.tensor(result.metrics["loss"]))

    transformer = model.transformer
    lora = {n: p for n, p in transformer.named_parameters() if "lora_" in n}
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())
    assert any(p.abs().max() > 0 for n, p in lora.items() if "lora_B" in n)  # the steps changed them
    base = {n: p for n, p in transformer.named_parameters() if "lora_" not in n}
    for name, p in base.items():
        expected = torch.float32 if _kept_fp32(transformer, name) else torch.bfloat16
        assert p.dtype == expected and not p.requires_grad, name
    assert sum(p.numel() for n, p in base.items() if p.dtype == torch.bfloat16) > 0.9 * sum(
        p.numel() for p in base.values()
    )
    encoders = [n for n in model.modules() if n.startswith("text_encoder")]
    for name in encoders:
        params = list(model.modules()[name].parameters())
        assert {p.dtype for p in params} <= {torch.bfloat16, torch.float32}  # T5 keeps its fp32 'wo'
        assert params[0].dtype == torch.bfloat16 and not any(p.requires_grad for p in params), name
        assert name not in method.frozen_modules()  # cached prompts: the encoders stay off the device
    vae = {p.dtype for p in model.pipe.vae.parameters()}
    assert vae == ({torch.float32} if family == "wan" else {torch.bfloat16})
    assert (tmp_path / "run" / "cache" / "prompts" / "index.json").is_file()
    saved = load_file(tmp_path / "run" / "final" / "lora" / "pytorch_lora_weights.safetensors")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())


def test_cached_prompts_train_exactly_like_per_step_encoding(tiny_model_dir, pairs_file, tmp_path):
    """The cache stores the text encoders' own (bf16) output, so the two runs are the same computation."""
    weights = {}
    for cache in (True, False):
        run = _run(tiny_model_dir("sd3"), pairs_file("sd3"), tmp_path / f"run-{cache}", cache=cache)
        method, data = prepare_dpo(run)
        assert (method.prompt_cache is not None) == cache
        train(method, data, run.train, progress=False, run_config=run)
        weights[cache] = {
            n: p.detach().clone() for n, p in method.model.transformer.named_parameters() if "lora_" in n
        }
    assert weights[True].keys() == weights[False].keys()
    for name in weights[True]:
        assert torch.equal(weights[True][name], weights[False][name]), name


def test_full_finetune_keeps_fp32_master_weights_and_a_bf16_reference(tiny_model_dir, pairs_file, tmp_path):
    run = _run(tiny_model_dir("sd3"), pairs_file("sd3"), tmp_path / "run", lora=False)
    method, data = prepare_dpo(run)
    transformer, reference = method.model.transformer, method.reference.copy
    assert method.model.compute_dtype == compute_dtype(run.train) == torch.bfloat16
    assert all(p.dtype == torch.float32 and p.requires_grad for p in transformer.parameters())
    master = dict(transformer.named_parameters())
    for name, p in reference.named_parameters():  # the reference is the master rounded to bf16
        assert p.dtype == torch.bfloat16 and not p.requires_grad
        assert torch.equal(p, master[name].detach().to(torch.bfloat16)), name
    assert {p.dtype for p in method.model.pipe.text_encoder.parameters()} == {torch.bfloat16}
    result = train(method, data, run.train, progress=False, run_config=run)
    assert result.step == 2 and result.nan_skipped == 0
    assert all(p.dtype == torch.float32 for p in transformer.parameters())


def test_frozen_copy_keeps_the_families_fp32_modules(tiny_model_dir):
    model = load_flow_model(tiny_model_dir("wan"))
    copy = frozen_copy(model.transformer, torch.bfloat16)
    kept = [n for n, _ in copy.named_parameters() if _kept_fp32(copy, n)]
    assert kept  # Wan keeps its norms, time embedder and modulation tables in fp32
    for name, p in copy.named_parameters():
        assert p.dtype == (torch.float32 if name in kept else torch.bfloat16), name
    assert all(p.dtype == torch.float32 for p in model.transformer.parameters())  # the original is untouched


def test_prompt_cache_rows_equal_encoding_and_a_folder_is_reused(tiny_model_dir, tmp_path, monkeypatch):
    model = load_flow_model(tiny_model_dir("flux"), torch_dtype=torch.bfloat16)
    prompts = ["b", "a", "b", "a longer prompt"]
    for folder in (None, tmp_path / "cache"):
        cache = PromptEmbedCache.build(model, prompts, cache_dir=folder, batch_size=2)
        assert len(cache) == 3
        got = cache.lookup(["a longer prompt", "b", "b"])
        with torch.no_grad():
            want, _ = model.encode_prompt(["a longer prompt", "b", "b"])
        assert torch.equal(got.embeds, want.embeds) and torch.equal(got.pooled, want.pooled)
        assert torch.equal(got.text_ids, want.text_ids)
        with pytest.raises(ValueError, match="'unseen' is not in the prompt cache"):
            cache.lookup(["unseen"])

    def refuse(*args, **kwargs):
        raise AssertionError("a matching cache folder must not re-encode")

    monkeypatch.setattr(model, "encode_prompt", refuse)
    again = PromptEmbedCache.build(model, list(reversed(prompts)), cache_dir=tmp_path / "cache")
    assert torch.equal(again.lookup(["a"]).embeds, cache.lookup(["a"]).embeds)
