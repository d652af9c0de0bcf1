"""Numbers from any source: NaN and +-inf refused where a float must be finite (YAML, ``--set``), naming
the key; YAML bounded in size, nesting and alias expansion; long values cut short in messages."""

from __future__ import annotations

import math
import time

import pytest
import rel_summary

from flowalign.config import ConfigError, TrainConfig, load_config
from flowalign.training.methods.rwr import RWRConfig
from flowalign.validation import MAX_SHOWN, check_number, short_repr

NON_FINITE_TEXT = ["nan", "NaN", ".nan", "inf", "-inf", ".inf", "-.inf", "Infinity", "1e999", "-1e400"]
FLOAT_KEYS = ["optim.lr", "optim.weight_decay", "optim.eps", "grad_clip", "ema.decay"]


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("text", NON_FINITE_TEXT)
def test_a_non_finite_override_is_refused_naming_the_key(key, text):
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, None, [f"{key}={text}"])
    assert repr(key) in str(info.value) and info.value.key == key
    assert "finite" in str(info.value) or "number" in str(info.value)
    rel_summary.count("numbers", "non-finite --set values refused (key named)")


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", "1e999"])
def test_a_non_finite_yaml_value_is_refused_naming_the_file_and_key(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(f"optim:\n  lr: {text}\n  betas: [0.9, 0.999]\n")
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, path)
    assert "'optim.lr'" in str(info.value) and str(path) in str(info.value)
    path.write_text(f"optim:\n  betas: [0.9, {text}]\n")
    with pytest.raises(ConfigError, match="optim.betas"):
        load_config(TrainConfig, path)
    rel_summary.count("numbers", "non-finite YAML values refused (file and key named)", 2)


def test_finite_values_and_a_documented_infinity_still_load():
    cfg = load_config(TrainConfig, None, ["optim.lr=3e-4", "grad_clip=null", "ema.decay=0.99"])
    assert cfg.optim.lr == 3e-4 and cfg.grad_clip is None
    assert load_config(RWRConfig, None, ["temperature=inf"]).temperature == math.inf  # exact uniform limit
    with pytest.raises(ConfigError, match="temperature"):
        load_config(RWRConfig, None, ["temperature=nan"])
    with pytest.raises(ConfigError, match="max_weight"):
        load_config(RWRConfig, None, ["max_weight=inf"])


def test_check_number_names_the_key_and_refuses_nan_in_every_range():
    for bad, kwargs in [
        (math.nan, {}),
        (math.nan, {"lo": 1.0}),  # nan < 1 is false: a plain range check lets it through
        (math.inf, {}),
        (-math.inf, {"hi": 0.0}),
        (0.5, {"lo": 1.0}),
        (1.0, {"lo": 1.0, "lo_open": True}),
        (2.5, {"integer": True}),
        (True, {}),
        ("3", {}),
    ]:
        with pytest.raises(ValueError, match="--guidance-scale"):
            check_number(bad, "--guidance-scale", **kwargs)
    assert check_number(math.inf, "x", allow_inf=True, lo=0) == math.inf
    assert check_number(7, "x", lo=1, hi=7, integer=True) == 7


def test_a_billion_laughs_yaml_fails_fast_with_one_short_error(tmp_path):
    names = "abcdefghi"
    lines = ["a: &a [x,x,x,x,x,x,x,x,x]"]
    for prev, name in zip(names, names[1:], strict=False):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    lines.append("lora: {target_modules: [" + ",".join(["*i"] * 9) + "]}")
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 400  # 9^10 = 3.5e9 strings once expanded
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, path)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, elapsed
    message = str(info.value)
    assert "aliases" in message and str(path) in message and len(message) < 400
    wide = "[&b [" + ",".join(["y"] * 400) + "], " + ",".join(["*b"] * 300) + "]"  # 120,000 values
    with pytest.raises(ConfigError, match="aliases"):
        load_config(TrainConfig, None, [f"trackers={wide}"])
    rel_summary.record(
        "numbers", f"{path.stat().st_size}-byte nested-alias YAML refused in (s)", f"{elapsed:.3f}"
    )


def test_an_oversized_or_deeply_nested_yaml_is_one_config_error(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("seed: 1\n" + "# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match="bytes"):
        load_config(TrainConfig, big)
    deep = tmp_path / "deep.yaml"
    deep.write_text("trackers: " + "[" * 20000 + "]" * 20000 + "\n")
    with pytest.raises(ConfigError):
        load_config(TrainConfig, deep)
    rel_summary.count("numbers", "oversized / deeply nested YAML refused", 2)


def test_long_values_are_cut_short_in_error_messages(tmp_path):
    huge = "x" * 1_000_000
    for override in [f"optim.lr={huge}", f"seed={huge}", f"mixed_precision={huge}", f"{huge}=1", huge]:
        with pytest.raises(ConfigError) as info:
            load_config(TrainConfig, None, [override])
        assert len(str(info.value)) < 1000, len(str(info.value))
    path = tmp_path / "long.yaml"
    path.write_text(f"trackers: {list(range(50000))}\n")
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, path)
    assert len(str(info.value)) < 1000
    assert len(short_repr("y" * 10**6)) <= MAX_SHOWN + 30 and len(short_repr(list(range(10**6)))) < 40
    rel_summary.count("numbers", "million-character values: messages under 1000 characters", 6)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_reward_spec_numbers_must_be_finite(value):
    from flowalign.rewards.registry import parse_reward_spec

    with pytest.raises(ValueError, match="option 'scale'"):
        parse_reward_spec(f"clip:scale={value}")
    assert parse_reward_spec("clip:scale=2.5") == ("clip", {"scale": 2.5})
    rel_summary.count("numbers", "non-finite reward-spec options refused")


def test_a_guidance_sweep_refuses_nan_and_infinity():
    from flowalign.evals.samples import sweep_guidance

    for scales in ([1.0, math.nan], [math.inf], [0.5]):
        with pytest.raises(ValueError, match="guidance sweep"):
            sweep_guidance({}, scales)
    rel_summary.count("numbers", "guidance sweeps with nan / inf / < 1 refused", 3)


def test_generation_settings_are_checked_before_sampling(tmp_path):
    from flowalign.models import load_flow_model
    from flowalign.models.toy import build_toy_pipeline
    from flowalign.pipelines.generate_files import GenerationSettings, generate_files

    build_toy_pipeline("image", size=16, width=32, num_layers=1, text_width=16, seed=0).save_pretrained(
        str(tmp_path / "m"), safe_serialization=True
    )
    model = load_flow_model(tmp_path / "m")
    bad = {
        "guidance_scale": math.nan,
        "true_cfg_scale": math.inf,
        "num_inference_steps": 0,
        "fps": 0,
        "samples_per_prompt": 0,
    }
    for name, value in bad.items():
        settings = GenerationSettings(**{"height": 16, "width": 16, "num_inference_steps": 1, name: value})
        with pytest.raises(ValueError, match=f"generation setting {name}"):
            generate_files(model, ["a red circle"], tmp_path / "out", settings, progress=False)
        assert not (tmp_path / "out" / "manifest.jsonl").exists()  # refused before anything was written
    rel_summary.count("numbers", "bad generation settings refused before sampling", len(bad))
