"""The report: HTML numbers equal report.json, escaping, reproducible re-rendering, videos, LPIPS, calibration."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser

import pytest

from flowalign.evals import EvalOptions, load_report, render_report, run_eval
from flowalign.evals.report import format_number, json_pointer, resolve_pointer
from flowalign.pipelines.generate_files import GenerationSettings


class _Numbers(HTMLParser):
    """Collects (data-key, data-value, shown text) of every number span, and every tag name."""

    def __init__(self) -> None:
        super().__init__()
        self.numbers: list[tuple[str, str, str]] = []
        self.tags: list[str] = []
        self._open: tuple[str, str] | None = None
        self._text = ""

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "span" and attrs.get("class") == "num":
            self._open, self._text = (attrs["data-key"], attrs["data-value"]), ""

    def handle_data(self, data):
        if self._open is not None:
            self._text += data

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.numbers.append((*self._open, self._text))
            self._open = None


def _parse(html: str) -> _Numbers:
    parser = _Numbers()
    parser.feed(html)
    return parser


def test_every_number_in_the_html_equals_report_json(rich_run):
    report = json.loads(rich_run.json_path.read_text())
    parsed = _parse(rich_run.html_path.read_text())
    assert len(parsed.numbers) > 100
    for key, value_repr, text in parsed.numbers:
        value = resolve_pointer(report, key)
        assert value_repr == repr(value), key
        assert text == format_number(value), key
    shown = {key for key, _, _ in parsed.numbers}
    # and the headline numbers are all on the page
    for name, res in report["results"].items():
        for model, dims in res["stats"].items():
            for dim in dims:
                for field in ("mean", "ci_low", "ci_high"):
                    assert json_pointer("results", name, "stats", model, dim, field) in shown
        for dim, rows in res["win_rates"].items():
            for i in range(len(rows)):
                for field in ("win_rate_with_ties", "ci_low", "ci_high"):
                    assert json_pointer("results", name, "win_rates", dim, i, field) in shown
        for model in res["models"]:
            assert json_pointer("results", name, "fid", model, "toy", "fid") in shown
            assert json_pointer("results", name, "diversity", model, "pixel", "mean") in shown
        for model in res["against_base"]:
            for dim in res["against_base"][model]["deltas"]:
                assert json_pointer("results", name, "against_base", model, "deltas", dim, "delta") in shown
    for dim in report["calibration"]["dimensions"]:
        assert json_pointer("calibration", "dimensions", dim, "accuracy") in shown


def test_report_contents_on_the_toy_world(rich_run):
    report = rich_run.report
    res = report["results"]["toy-heldout"]
    assert res["models"] == ["a", "b", "fast <b>"]
    assert report["dimensions"] == ["vq", "ta", "bright", "red", "overall"]
    assert set(res["against_base"]) == {"b", "fast <b>"} and res["against_base"]["b"]["heldout"] == [
        "vq",
        "bright",
        "red",
    ]
    assert report["environment"]["git_commit"] and report["environment"]["versions"]["torch"]
    assert report["settings"]["seeds"] == [0] and report["settings"]["samples_per_prompt"] == 2
    assert {f["stage"] for f in report["failures"]} == {"prompts", "load"}
    for dim, entries in res["win_rates"].items():
        assert len(entries) == 3 * 2  # every ordered pair of the 3 models
        rate = {(e["a"], e["b"]): e["win_rate_with_ties"] for e in entries}
        for (a, b), value in rate.items():
            assert value + rate[(b, a)] == pytest.approx(1.0), dim
    assert len(res["grid"]) == 3 and all(len(v) == 2 for v in res["grid"][0]["samples"].values())
    cal = report["calibration"]["dimensions"]
    assert cal["vq"]["accuracy"] == 1.0  # the oracle prefers every clean render over its noisy copy
    assert cal["vq"]["label"] == "overall" and cal["vq"]["num_pairs"] == 6


def test_failures_and_names_are_shown_escaped(rich_run):
    html = rich_run.html_path.read_text()
    assert "fast &lt;b&gt;" in html and "fast <b>" not in html
    assert "no-such-model" in html and "missing.txt" in html
    assert "<script" not in html.lower()


def test_prompts_with_markup_render_as_text(toy_models, tmp_path):
    evil = '<script>alert("x")</script> a <img src=x onerror=alert(1)> & "quotes"'
    prompts = tmp_path / "evil.txt"
    prompts.write_text(evil + "\na plain prompt\n")
    out = run_eval({"<i>m</i>": toy_models["a"]}, prompts, ["evals-count"], samples_per_prompt=1,
                   out_dir=tmp_path / "eval", options=EvalOptions(settings=GenerationSettings(num_inference_steps=2),
                   num_resamples=50), progress=False)  # fmt: skip
    html = out.html_path.read_text()
    assert "<script" not in html.lower() and "<img src=x" not in html and "<i>m</i>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert "&lt;i&gt;m&lt;/i&gt;" in html
    assert out.report["results"]["evil"]["grid"][0]["prompt"] == evil
    tags = set(_parse(html).tags)
    assert "script" not in tags and tags >= {"table", "img", "svg"}


def test_rerendering_a_copied_folder_reproduces_the_page(rich_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(rich_run.json_path.parent, copy)
    (copy / "report.html").unlink()
    render_report(copy)
    assert (copy / "report.html").read_bytes() == rich_run.html_path.read_bytes()
    assert load_report(copy) == json.loads(rich_run.json_path.read_text())


def test_groups_of_a_benchmark_get_their_own_means(toy_models, tmp_path):
    path = tmp_path / "PartiPrompts.tsv"
    path.write_text("Prompt\tCategory\nan apple\tFood\na pear\tFood\na dog\tAnimals\n")
    out = run_eval({"a": toy_models["a"]}, f"parti:{path}", ["evals-count"], samples_per_prompt=2,
                   out_dir=tmp_path / "eval", options=EvalOptions(settings=GenerationSettings(num_inference_steps=2),
                   num_resamples=50), progress=False)  # fmt: skip
    res = out.report["results"]["parti"]
    assert (
        res["by_group"]["Food"]["a"]["bright"]["n"] == 4
        and res["by_group"]["Animals"]["a"]["bright"]["n"] == 2
    )
    food = [r["bright"] for r in _score_rows(out, "a") if r["prompt"] in ("an apple", "a pear")]
    assert res["by_group"]["Food"]["a"]["bright"]["mean"] == pytest.approx(sum(food) / len(food))
    html = out.html_path.read_text()
    assert json_pointer("results", "parti", "by_group", "Food", "a", "bright", "mean") in html


def _score_rows(result, model):
    from flowalign.rewards.scoring import read_score_rows

    rows = read_score_rows(result.json_path.parent / "scores" / "evals-count.jsonl")
    return [r for r in rows if f"/{model}/" in r["id"]]


def test_rerun_from_report_json_reproduces_the_numbers(rich_run, counting, tmp_path, monkeypatch):
    import flowalign.models
    from flowalign.evals import rerun_eval

    copy = tmp_path / "copy"
    shutil.copytree(rich_run.json_path.parent, copy)
    loaded, real_load = [], flowalign.models.load_flow_model

    def recording_load(path, **kwargs):
        loaded.append(str(path))
        return real_load(path, **kwargs)

    monkeypatch.setattr(flowalign.models, "load_flow_model", recording_load)
    again = rerun_eval(copy, progress=False)
    before = json.loads(rich_run.json_path.read_text())
    after = json.loads(again.json_path.read_text())
    assert loaded == [str(rich_run.report["models"][3]["path"])]  # only the model that never loaded
    assert counting.scored == []  # every score reused
    for key in ("results", "calibration", "failures", "dimensions", "prompt_sets", "models", "settings"):
        assert after[key] == before[key], key


def test_load_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no report.json"):
        load_report(tmp_path)
    (tmp_path / "report.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a flowalign eval report"):
        load_report(tmp_path)


def test_video_report_has_motion_quality_and_animated_grids(toy_video_model, tmp_path):
    out = run_eval({"v": toy_video_model}, "toy-video-heldout@2", ["toy"], samples_per_prompt=2,
                   out_dir=tmp_path, options=EvalOptions(settings=GenerationSettings(num_inference_steps=2),
                   num_resamples=50), progress=False)  # fmt: skip
    assert out.failures == []
    res = out.report["results"]["toy-video-heldout"]
    assert set(res["stats"]["v"]) == {"vq", "mq", "ta", "overall"}
    assert "motion" in res["diversity"]["v"]["attributes"]["attributes"]
    assert res["grid"][0]["samples"]["v"][0].endswith(".mp4")
    assert out.html_path.read_text().count("data:image/gif;base64,") == 2


def test_lpips_diversity_and_drift(toy_models, tmp_path):
    options = EvalOptions(settings=GenerationSettings(num_inference_steps=2), base="a", lpips_random_backbone=True,
                          num_resamples=50)  # fmt: skip
    out = run_eval({"a": toy_models["a"], "b": toy_models["b"]}, "toy-heldout@2", ["evals-count"],
                   samples_per_prompt=2, out_dir=tmp_path, options=options, progress=False)  # fmt: skip
    res = out.report["results"]["toy-heldout"]
    assert res["diversity"]["a"]["lpips"]["mean"] > 0 and res["diversity"]["a"]["lpips"]["num_groups"] == 2
    drift = res["against_base"]["b"]
    assert drift["drift_lpips"]["mean"] > 0 and drift["drift_pixel"]["n"] == 4
    assert out.report["settings"]["lpips"] == "random backbone"


def test_a_guidance_sweep_gets_one_curve_per_swept_model(toy_models, tmp_path, rich_run):
    from flowalign.evals import ModelSpec, sweep_guidance

    specs = sweep_guidance({"a": ModelSpec(str(toy_models["a"]))}, [1, 2, 4]) | {
        "b": ModelSpec(str(toy_models["b"]))
    }
    out = run_eval(specs, "toy-heldout@2", ["toy"], out_dir=tmp_path / "eval", progress=False,
                   options=EvalOptions(settings=GenerationSettings(num_inference_steps=2), num_resamples=20))  # fmt: skip
    html = out.html_path.read_text()
    dims = out.report["dimensions"]
    assert "<h3>Guidance curves</h3>" in html and html.count('class="plot curve"') == len(dims)
    curve = html[html.index('class="plot curve"') :].split("</svg>")[0]
    assert curve.count("<polyline") == 1 and curve.count("<circle") == 3  # model a at 1, 2, 4; b is not swept
    assert "Guidance curves" not in rich_run.html_path.read_text()


def test_the_report_names_the_extractor_and_weights_of_each_distance(rich_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(rich_run.json_path.parent, copy)
    report = json.loads((copy / "report.json").read_text())
    res = report["results"]["toy-heldout"]
    res["fid"]["a"]["inception"] = {"fid": 12.5, "kid": 0.0123, "kid_se": 0.001, "kid_subset_size": 6, "n": 6,
                                    "n_reference": 6, "extractor": "clean-fid Inception-v3 (TF 2015-12-05 graph)",
                                    "weights": "inception-2015-12-05.pt", "sha256": "ab" * 32,
                                    "comparable_with_papers": True}  # fmt: skip
    res["fid"]["b"]["clip"] = {"fid": 3.25, "n": 6, "n_reference": 6, "extractor": "CLIP image embeddings (tiny)",
                               "comparable_with_papers": False}  # fmt: skip
    html = render_report(copy, report=report).read_text()
    assert (
        "Inception FID and KID: clean-fid Inception-v3 (TF 2015-12-05 graph), weights inception-2015-12-05.pt"
        in html
    )
    assert "(sha256 abababababab); comparable with published numbers." in html
    assert "CLIP-FD: CLIP image embeddings (tiny); comparable between runs of this tool only." in html
    assert "12.5" in html and "3.25" in html and "0.0123" in html
