"""Config loading: YAML + overrides, coercion, clear errors for unknown keys and bad values."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from flowalign.config import (
    ConfigError,
    LoraConfig,
    OptimConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    describe_config,
    load_config,
    save_config,
)


@dataclasses.dataclass(kw_only=True)
class MethodConfig:
    """A method config nesting the train config, as methods do."""

    beta: float = 500.0
    """DPO beta."""
    weights: dict[str, float] = dataclasses.field(default_factory=dict)
    """Per-dimension weights."""
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    """The loop settings."""
    lora: LoraConfig | None = None
    """LoRA adapters (a run config's one LoRA setting); None = full fine-tune."""


def test_overrides_are_coerced_to_field_types():
    cfg = load_config(
        MethodConfig,
        overrides=[
            "train.optim.lr=1e-4",  # YAML reads this as a string; coerced to float
            "train.max_steps=2e3",
            "train.optim.betas=[0.8, 0.95]",
            "train.output_dir=runs/007",
            "train.grad_clip=null",
            "train.gradient_checkpointing=true",
            "lora.rank=8",  # creates the optional LoraConfig with defaults
            "lora.target_modules=[to_q, to_v]",
            "train.trackers=[]",
        ],
    )
    train = cfg.train
    assert train.optim.lr == 1e-4 and isinstance(train.optim.lr, float)
    assert train.max_steps == 2000 and isinstance(train.max_steps, int)
    assert train.optim.betas == (0.8, 0.95)
    assert train.output_dir == Path("runs/007")
    assert train.grad_clip is None and train.gradient_checkpointing is True
    assert cfg.lora == LoraConfig(rank=8, target_modules=["to_q", "to_v"])
    assert train.trackers == []
    assert load_config(MethodConfig, overrides=["lora.rank=8", "lora=null"]).lora is None


def test_lora_is_set_once_at_the_top_and_never_under_train():
    """``train.lora`` used to be a field nobody read: it is now an unknown key that names the right one."""
    with pytest.raises(
        ConfigError, match=r"unknown config key 'train\.lora\.rank'.*did you mean.*'lora\.rank'"
    ):
        load_config(MethodConfig, overrides=["train.lora.rank=8"])
    assert "lora" not in {f.name for f in dataclasses.fields(TrainConfig)}


def test_yaml_then_overrides_and_round_trip(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "beta: 100\nweights: {vq: 1.0, mq: 0.5}\ntrain:\n  seed: 7\n  optim: {lr: 3.0e-5, schedule: cosine}\n"
    )
    cfg = load_config(MethodConfig, recipe, ["train.optim.warmup_steps=10", "weights.ta=2"])
    assert cfg.beta == 100.0 and cfg.train.seed == 7 and cfg.train.optim.lr == 3e-5
    assert cfg.train.optim.schedule == "cosine" and cfg.train.optim.warmup_steps == 10
    assert cfg.weights == {"vq": 1.0, "mq": 0.5, "ta": 2.0}
    saved = save_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(MethodConfig, saved) == cfg
    assert config_from_dict(MethodConfig, config_to_dict(cfg)) == cfg
    lora_cfg = dataclasses.replace(MethodConfig(), lora=LoraConfig(alpha=4.0))
    assert load_config(MethodConfig, save_config(lora_cfg, tmp_path / "l.yaml")) == lora_cfg


def test_unknown_key_names_the_dotted_key_the_source_and_close_matches(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"unknown config key 'train\.optim\.lrr' in override 'train\.optim\.lrr=1'; "
        r"did you mean 'train\.optim\.lr'",
    ):
        load_config(MethodConfig, overrides=["train.optim.lrr=1"])
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train:\n  ema:\n    decya: 0.9\n")
    with pytest.raises(ConfigError, match=rf"'train\.ema\.decya' in {recipe}.*'train\.ema\.decay'") as err:
        load_config(MethodConfig, recipe)
    assert err.value.key == "train.ema.decya"
    with pytest.raises(ConfigError, match=r"unknown config key 'lr'.*'optim\.lr'"):
        load_config(TrainConfig, overrides=["lr=0.1"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("max_steps=0", r"'max_steps' in override 'max_steps=0': must be >= 1, got 0"),
        ("mixed_precision=fp32", r"'mixed_precision'.*expected one of \['no', 'bf16', 'fp16'\], got 'fp32'"),
        ("optim.lr=fast", r"'optim\.lr'.*expected a float, got 'fast'"),
        ("batch_size=2.5", r"'batch_size'.*expected an int, got 2\.5"),
        ("cpu=1", r"'cpu'.*expected a bool"),
        ("optim.betas=[0.9]", r"'optim\.betas'.*expected 2 values"),
        ("ema.decay=1.0", r"'ema\.decay'.*must lie in \[0, 1\)"),
        ("seed.x=1", r"'seed\.x' goes inside int"),
        ("max_steps", r"not of the form key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, overrides=[override])


def test_bad_yaml_files_are_named(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match=rf"{path} is not valid YAML"):
        load_config(TrainConfig, path)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(TrainConfig, path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(TrainConfig, tmp_path / "missing.yaml")
    assert isinstance(OptimConfig(), OptimConfig)


def test_every_field_is_documented_once():
    docs = describe_config(MethodConfig)
    assert docs["train.optim.lr"].startswith("Peak learning rate")
    assert "lora.rank" in docs  # optional nested configs are described too
    undocumented = [key for key, doc in docs.items() if not doc]
    assert undocumented == []
