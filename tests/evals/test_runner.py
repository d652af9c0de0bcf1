"""run_eval: incremental generation and scoring, failures that do not stop the report, pairing by seed."""

from __future__ import annotations

import json

import pytest

from flowalign.evals import EvalOptions, ModelSpec, parse_model_spec, run_eval, sweep_guidance
from flowalign.pipelines.generate_files import GenerationSettings, read_manifest
from flowalign.rewards.scoring import read_score_rows

FAST = EvalOptions(settings=GenerationSettings(num_inference_steps=2), num_resamples=100)


def _run(models, out, *, rewards=("evals-count",), prompts="toy-heldout@2", k=2, seeds=(0,), options=FAST):
    return run_eval(models, prompts, list(rewards), samples_per_prompt=k, seeds=list(seeds), out_dir=out,
                    options=options, render=False, progress=False)  # fmt: skip


def _no_model_loads(monkeypatch):
    import flowalign.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although every sample exists")

    monkeypatch.setattr(flowalign.models, "load_flow_model", refuse)


def test_rerun_reuses_samples_and_scores(toy_models, counting, tmp_path, monkeypatch):
    first = _run({"a": toy_models["a"], "b": toy_models["b"]}, tmp_path)
    assert sum(counting.scored) == 2 * 2 * 2  # models x prompts x samples, each scored once
    assert counting.loads == [1]  # one reward load for all models
    report = first.report
    stats = report["results"]["toy-heldout"]["stats"]
    _no_model_loads(monkeypatch)
    counting.scored.clear()
    counting.loads.clear()
    second = _run({"a": toy_models["a"], "b": toy_models["b"]}, tmp_path)
    assert counting.scored == [] and counting.loads == []  # nothing rescored, reward not even loaded
    assert second.failures == []
    assert second.report["results"]["toy-heldout"]["stats"] == stats
    rows = read_score_rows(tmp_path / "scores" / "evals-count.jsonl")
    assert len(rows) == 8 and len({r["id"] for r in rows}) == 8  # no duplicate rows
    assert second.report["rewards"][0]["num_reused"] == 8 and second.report["rewards"][0]["num_scored"] == 0


def test_adding_a_model_scores_only_its_samples(toy_models, counting, tmp_path):
    _run({"a": toy_models["a"]}, tmp_path)
    counting.scored.clear()
    out = _run({"a": toy_models["a"], "b": toy_models["b"]}, tmp_path)
    assert sum(counting.scored) == 4  # b's 2 prompts x 2 samples
    assert out.report["results"]["toy-heldout"]["models"] == ["a", "b"]


def test_interrupted_scoring_resumes_without_duplicates(toy_models, counting, tmp_path):
    _run({"a": toy_models["a"]}, tmp_path)
    scores = tmp_path / "scores" / "evals-count.jsonl"
    lines = scores.read_text().splitlines(keepends=True)
    scores.write_text("".join(lines[:1]) + lines[1][:10])  # one full row, then a row cut mid-write
    counting.scored.clear()
    out = _run({"a": toy_models["a"]}, tmp_path)
    assert sum(counting.scored) == 3
    rows = read_score_rows(scores)
    assert len(rows) == 4 and len({r["id"] for r in rows}) == 4
    assert out.report["results"]["toy-heldout"]["stats"]["a"]["bright"]["n"] == 4


def test_failing_model_and_missing_prompt_file_do_not_stop_the_rest(toy_models, counting, tmp_path):
    out = run_eval(
        {"a": toy_models["a"], "broken": tmp_path / "absent-model"},
        ["toy-heldout@2", tmp_path / "missing.txt"], ["evals-count"],
        samples_per_prompt=1, out_dir=tmp_path / "eval", options=FAST, progress=False,
    )  # fmt: skip
    stages = {(f["stage"], f.get("model"), f.get("prompt_set")) for f in out.failures}
    assert ("load", "broken", None) in stages
    assert any(s == "prompts" and str(tmp_path / "missing.txt") in str(p) for s, _, p in stages)
    assert out.report["results"]["toy-heldout"]["models"] == ["a"]
    status = {m["name"]: m["status"] for m in out.report["models"]}
    assert status == {"a": "ok", "broken": "failed"}
    html = out.html_path.read_text()
    assert "absent-model" in html and "missing.txt" in html and "failure(s)" in html
    assert json.loads(out.json_path.read_text())["failures"] == out.failures


def test_a_report_with_nothing_to_show_still_renders(tmp_path):
    out = run_eval({"gone": tmp_path / "absent"}, "toy-heldout@2", ["evals-count"], out_dir=tmp_path / "eval",
                   options=FAST, progress=False)  # fmt: skip
    assert out.report["results"] == {} and [f["stage"] for f in out.failures] == ["load"]
    html = out.html_path.read_text()
    assert "No results" in html and "absent" in html


def test_a_failing_reward_is_reported_and_the_others_kept(toy_models, counting, tmp_path):
    out = _run({"a": toy_models["a"]}, tmp_path, rewards=("evals-fail", "evals-count"))
    assert [f["reward"] for f in out.failures if f["stage"] == "score"] == ["evals-fail"]
    assert "scorer crashed" in out.failures[0]["error"]
    assert set(out.report["results"]["toy-heldout"]["stats"]["a"]) == {"bright", "red", "overall"}


def test_rewards_sharing_a_dimension_name_keep_both(toy_models, counting, tmp_path):
    out = _run({"a": toy_models["a"]}, tmp_path, rewards=("evals-count", "evals-count:batch_size=2", "toy"))
    assert out.failures == []
    dims = out.report["dimensions"]
    assert dims == ["bright", "red", "evals-count.bright", "evals-count.red", "vq", "ta", "overall"]
    stats = out.report["results"]["toy-heldout"]["stats"]["a"]
    assert stats["evals-count.bright"]["mean"] == pytest.approx(stats["bright"]["mean"])


def test_models_are_paired_by_prompt_and_seed(toy_models, tmp_path):
    out = _run({"a": toy_models["a"], "b": toy_models["b"]}, tmp_path, k=2, seeds=(0, 100))
    seeds = {}
    for manifest in (tmp_path / "samples").rglob("manifest.jsonl"):
        model = manifest.parts[-4]
        for row in read_manifest(manifest):
            seeds.setdefault(model, set()).add((row["prompt"], row["seed"]))
    assert seeds["a"] == seeds["b"] and len(seeds["a"]) == 2 * 2 * 2
    assert {s for _, s in seeds["a"]} == {0, 1, 2, 3, 100, 101, 102, 103}
    wr = out.report["results"]["toy-heldout"]["win_rates"]["bright"][0]
    assert wr["n"] == 8  # all samples paired


def test_overlapping_or_repeated_seeds_are_refused(toy_models, tmp_path):
    with pytest.raises(ValueError, match="seeds 0 and 2 overlap"):
        _run({"a": toy_models["a"]}, tmp_path, k=2, seeds=(0, 2))
    with pytest.raises(ValueError, match="distinct"):
        _run({"a": toy_models["a"]}, tmp_path, seeds=(1, 1))
    with pytest.raises(ValueError, match="unknown generation setting"):
        _run({"a": ModelSpec(str(toy_models["a"]), {"steps": 3})}, tmp_path)
    with pytest.raises(ValueError, match="base model 'z'"):
        _run({"a": toy_models["a"]}, tmp_path, options=EvalOptions(base="z"))


def test_changed_settings_draw_new_samples_next_to_the_old(toy_models, counting, tmp_path):
    _run({"a": toy_models["a"]}, tmp_path)
    counting.scored.clear()
    other = EvalOptions(settings=GenerationSettings(num_inference_steps=3), num_resamples=100)
    _run({"a": toy_models["a"]}, tmp_path, options=other)
    assert sum(counting.scored) == 4
    assert len(list((tmp_path / "samples" / "toy-heldout" / "a").iterdir())) == 2


def test_existing_samples_from_a_manifest_are_scored_and_paired(toy_models, counting, tmp_path):
    from flowalign.models import load_flow_model
    from flowalign.pipelines.generate_files import generate_files
    from flowalign.toy.world import toy_prompts

    prompts = [toy_prompts("heldout")[i] for i in (0, 40)]  # = toy-heldout@2
    generate_files(load_flow_model(toy_models["b"]), prompts, tmp_path / "ext",
                   GenerationSettings(num_inference_steps=2, samples_per_prompt=2), progress=False)  # fmt: skip
    assert ModelSpec(str(tmp_path / "ext")).is_samples
    out = _run({"a": toy_models["a"], "ext": tmp_path / "ext"}, tmp_path / "eval")
    res = out.report["results"]["toy-heldout"]
    assert res["num_samples"] == {"a": 4, "ext": 4}
    assert res["win_rates"]["bright"][0]["n"] == 4
    assert all(f.startswith("/") for f in res["grid"][0]["samples"]["ext"])  # outside the eval folder
    assert all(not f.startswith("/") for f in res["grid"][0]["samples"]["a"])


def test_one_step_checkpoints_sample_in_one_call_without_cfg(toy_models, tmp_path):
    from flowalign.models import load_flow_model
    from flowalign.pipelines.one_step import save_one_step

    teacher = load_flow_model(toy_models["a"])
    save_one_step(teacher, teacher.transformer, tmp_path / "gen", method="test")
    options = EvalOptions(
        settings=GenerationSettings(num_inference_steps=4, guidance_scale=3.0), num_resamples=50
    )
    out = _run({"gen": tmp_path / "gen", "gen-cfg": ModelSpec(str(tmp_path / "gen"), {"guidance_scale": 2.0})},
               tmp_path / "eval", options=options)  # fmt: skip
    assert out.failures == []
    used = {m["name"]: m["generation"] for m in out.report["models"]}
    assert (
        used["gen"]["one_step"]
        and used["gen"]["guidance_scale"] == 1.0
        and used["gen"]["num_inference_steps"] == 1
    )
    assert used["gen-cfg"]["guidance_scale"] == 2.0  # the model's own settings still win
    rows = read_manifest(
        next((tmp_path / "eval" / "samples" / "toy-heldout" / "gen").rglob("manifest.jsonl"))
    )
    assert rows[0]["settings"]["one_step"] is True and rows[0]["settings"]["guidance_scale"] == 1.0


def test_guided_models_get_transforms_for_exactly_their_prompts(toy_models, tmp_path):
    calls: list[list[str]] = []

    def identity_guidance(model, prompts):
        calls.append(list(prompts))
        return [lambda v_fn: v_fn]

    guided = ModelSpec(str(toy_models["a"]), guidance=identity_guidance, guidance_key="identity")
    options = EvalOptions(settings=GenerationSettings(num_inference_steps=2), base="a", num_resamples=50)
    out = _run({"a": toy_models["a"], "nrg": guided}, tmp_path, k=2, options=options)
    prompts = out.report["results"]["toy-heldout"]["grid"]
    assert calls == [[prompts[0]["prompt"]] * 2, [prompts[1]["prompt"]] * 2]  # one call per prompt, K rows
    drift = out.report["results"]["toy-heldout"]["against_base"]["nrg"]
    assert drift["n"] == 4 and drift["drift_pixel"]["max"] < 1e-2  # identity guidance = the same samples
    # an interrupted prompt resumes with transforms for its missing samples only
    manifest = next(p for p in tmp_path.rglob("p000001/manifest.jsonl") if "/nrg/" in str(p))
    manifest.write_text(manifest.read_text().splitlines(keepends=True)[0])
    calls.clear()
    _run({"a": toy_models["a"], "nrg": guided}, tmp_path, k=2, options=options)
    assert calls == [[prompts[1]["prompt"]]]
    with pytest.raises(ValueError, match="guidance_key"):
        ModelSpec("x", guidance=identity_guidance)


def test_parse_model_spec():
    assert parse_model_spec("ckpt/dpo") == ("dpo", ModelSpec("ckpt/dpo"))
    assert parse_model_spec("base=ckpt/base") == ("base", ModelSpec("ckpt/base"))
    name, spec = parse_model_spec("fast=ckpt/gen:one_step=true,num_inference_steps=1,sampler=heun")
    assert name == "fast" and spec.settings == {"one_step": True, "num_inference_steps": 1, "sampler": "heun"}
    with pytest.raises(ValueError, match="key=value"):
        parse_model_spec("x=ckpt:oops")
    with pytest.raises(ValueError, match="empty path"):
        parse_model_spec("x=")


def test_sweep_guidance_names_each_scale_and_refuses_conflicts(tmp_path):
    specs = {"base": ModelSpec("ckpt/base", {"num_inference_steps": 8}), "dpo": ModelSpec("ckpt/dpo")}
    swept = sweep_guidance(specs, [1, 1.5])
    assert list(swept) == ["base_cfg1", "base_cfg1.5", "dpo_cfg1", "dpo_cfg1.5"]
    assert swept["base_cfg1.5"] == ModelSpec("ckpt/base", {"num_inference_steps": 8, "guidance_scale": 1.5})
    assert specs["base"].settings == {"num_inference_steps": 8}  # the input is left as it was
    with pytest.raises(ValueError, match="'fixed' already sets guidance_scale"):
        sweep_guidance({"fixed": ModelSpec("ckpt/x", {"guidance_scale": 3.0})}, [1, 2])
    with pytest.raises(ValueError, match="distinct and >= 1"):
        sweep_guidance(specs, [2, 2])
    with pytest.raises(ValueError, match="distinct and >= 1"):
        sweep_guidance(specs, [0.5])
    with pytest.raises(ValueError, match="at least one"):
        sweep_guidance(specs, [])
    samples = tmp_path / "m.jsonl"
    samples.write_text("")
    with pytest.raises(ValueError, match="names existing samples"):
        sweep_guidance({"old": ModelSpec(str(samples))}, [1])
