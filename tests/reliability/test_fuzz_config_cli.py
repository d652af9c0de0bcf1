"""Fuzzed YAML recipes, ``--set`` overrides and command-line values.

Configs: every run config of ``flowalign train`` is loaded from random YAML (real and unknown keys at
any depth, values of every YAML type, NaN, huge numbers, broken syntax) plus random overrides. Each
case builds a config or raises one ``ConfigError`` (a ValueError) naming the key or the file.

CLI: commands get random option values with a model/data path that does not exist, so nothing heavy
runs. Each invocation ends with exit status != 0 and a one-line ``error:`` (or click's usage error) —
never an uncaught exception (a traceback) and never a hang.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

import pytest
import rel_summary
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from flowalign.config import ConfigError, TrainConfig, config_to_dict, describe_config, load_config

CI = settings.get_profile("flowalign-ci")
SLOW = settings.get_profile("flowalign-slow")


def _run_configs() -> dict[str, type]:
    from flowalign.training.methods.cdt import CDTRunConfig
    from flowalign.training.methods.distar import DistarRun
    from flowalign.training.methods.fdistill import FDistillRun
    from flowalign.training.runs import DPORun, LatentRewardRun, RWRRun, SFTRun

    configs = {"train": TrainConfig, "sft": SFTRun, "dpo": DPORun, "rwr": RWRRun, "fdistill": FDistillRun,
               "distar": DistarRun, "cdt": CDTRunConfig, "latent-reward": LatentRewardRun}  # fmt: skip
    try:
        from flowalign.training.methods.reward_run import RewardModelRun

        configs["reward"] = RewardModelRun
    except ImportError:
        pass
    return configs


CONFIGS = _run_configs()
KEYS = {name: sorted(describe_config(cls)) for name, cls in CONFIGS.items()}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**65), 2**65), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["1e-4", "0x10", "yes", "~", "[1,2", "{a: 1}", "001", "-0", ".nan", ""]),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def yaml_documents(draw, name: str) -> str:
    """YAML text: a nested mapping of real keys (and some unknown ones) with random values, or junk text."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=80))  # not necessarily YAML, nor a mapping
    doc: dict = {}
    for _ in range(draw(st.integers(0, 5))):
        key = draw(
            st.sampled_from(KEYS[name])
            | st.sampled_from(["train.optim.learning_rate", "nonsense", "train.x.y"])
        )
        node, parts = doc, key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = draw(values)
    return yaml.safe_dump(doc, allow_unicode=True)


overrides = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(sorted({k for ks in KEYS.values() for k in ks})), st.text(max_size=15)).map(
            "=".join
        ),
        st.text(max_size=20),  # maybe no '=' at all
        st.sampled_from(
            ["train.optim=3", "lora=null", "lora.rank=0", "train.max_steps=-1", "train..x=1", "=1"]
        ),
    ),
    max_size=3,
)


def _check_config(name: str, text: str, sets: list[str]) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "recipe.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            cfg = load_config(CONFIGS[name], path, sets)
        except ValueError as err:  # ConfigError, or a method config's own ValueError naming its key
            message = str(err)
            if isinstance(err, ConfigError) and err.key:
                assert err.key in message or repr(err.key)[1:-1] in message, message[:300]
            else:
                named = [k for k in KEYS[name] if k in message or k.rsplit(".", 1)[-1] in message]
                assert named or str(path) in message or "override" in message, message[:300]
            outcome = "refused"
        else:
            assert dataclasses.is_dataclass(cfg) and isinstance(cfg, CONFIGS[name])
            round_trip = yaml.safe_dump(config_to_dict(cfg))  # what every checkpoint stores as config.yaml
            assert isinstance(yaml.safe_load(round_trip), dict)
            train = cfg if isinstance(cfg, TrainConfig) else getattr(cfg, "train", None)
            if train is not None:
                assert train.max_steps >= 1 and math.isfinite(train.optim.lr) and train.optim.lr >= 0
            outcome = "loaded"
    rel_summary.count("fuzz", "YAML configs + overrides")
    rel_summary.count("fuzz", f"YAML configs + overrides: {outcome}")
    return outcome


@st.composite
def config_cases(draw) -> tuple[str, str, list[str]]:
    name = draw(st.sampled_from(sorted(CONFIGS)))
    return name, draw(yaml_documents(name)), draw(overrides)


@given(case=config_cases())
@settings(CI, max_examples=50)
def test_configs_load_or_name_the_key(case):
    _check_config(*case)


@pytest.mark.slow
@given(case=config_cases())
@settings(SLOW)
def test_configs_many(case):
    _check_config(*case)


# --------------------------------------------------------------------------------------------- CLI

runner = CliRunner()
NOWHERE = "/nonexistent/flowalign-model"

# option -> strategy of raw values (always text, as typed on a command line)
numbers_text = st.one_of(
    st.integers(-(10**20), 10**20).map(str), st.floats(allow_nan=True).map(str), st.text(max_size=8),
    st.sampled_from(["0", "-1", "nan", "inf", "1e400", "", "3.5", "1,2", "0x1f"]),
)  # fmt: skip
names_text = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["toy", "pickscore", "toy,toy", "toy:x=1", ":", "a:b=", "clip:model=/x"]),
)


def _set_option(draw) -> list[str]:
    key = draw(st.sampled_from(sorted({k for ks in KEYS.values() for k in ks})) | st.text(max_size=10))
    return ["--set", f"{key}={draw(st.text(max_size=12))}"]


@st.composite
def cli_invocations(draw) -> list[str]:
    """A command whose model/data path does not exist, with random values for its other options."""
    out = ["--out", "OUT"]
    command = draw(st.sampled_from(["sft", "dpo", "rwr", "fdistill", "distar", "cdt", "latent-reward", "generate",
                                    "score", "eval", "tokenize", "pairs"]))  # fmt: skip
    if command in ("sft", "dpo", "rwr", "latent-reward"):
        args = ["train", command, "--model", NOWHERE, "--data", NOWHERE + ".jsonl", *out]
        args += ["--steps", draw(numbers_text)] if draw(st.booleans()) else []
    elif command in ("fdistill", "distar"):
        args = ["train", command, "--teacher", NOWHERE, *out, "--steps", draw(numbers_text)]
    elif command == "cdt":
        args = ["train", "cdt", "--set", f"data.source={NOWHERE}", *out, "--steps", draw(numbers_text)]
    elif command == "generate":
        args = ["generate", "--model", NOWHERE, *out, "--prompt", draw(st.text(max_size=30))]
        for option in draw(st.lists(st.sampled_from(["--steps", "--guidance-scale", "--seed", "--height", "--batch-size",
                                                      "--samples-per-prompt", "--sampler", "--dtype", "--guide-steps"]),
                                    max_size=3, unique=True)):  # fmt: skip
            args += [option, draw(numbers_text)]
    elif command == "score":
        args = [
            "score",
            "--reward",
            draw(names_text),
            "--media",
            NOWHERE,
            *out,
            "--batch-size",
            draw(numbers_text),
        ]
        args += ["--weights", draw(st.text(max_size=15))] if draw(st.booleans()) else []
    elif command == "eval":
        args = ["eval", *out, "--models", f"m={NOWHERE}", "--prompts", draw(st.text(max_size=15) | st.just("toy-heldout@2")),
                "--rewards", draw(names_text), "--seeds", draw(numbers_text)]  # fmt: skip
    elif command == "tokenize":
        args = ["tokenize", draw(st.sampled_from(["encode", "decode", "reconstruct"])), "--model", NOWHERE,
                "--input", NOWHERE + ".mp4", *out]  # fmt: skip
    else:
        args = ["pairs", "--model", NOWHERE, *out, "--reward", draw(names_text), "--num-candidates", draw(numbers_text),
                "--mode", draw(st.text(max_size=10) | st.just("all")), "--prompts-file", NOWHERE + ".txt"]  # fmt: skip
    if command in ("sft", "dpo", "rwr", "latent-reward", "fdistill", "distar", "cdt"):
        for _ in range(draw(st.integers(0, 2))):
            args += _set_option(draw)
    return args


def _check_cli(args: list[str]) -> str:
    with tempfile.TemporaryDirectory() as d:
        args = [str(Path(d) / "out") if a == "OUT" else a for a in args]
        result = runner.invoke(_app(), args)
    shown = f"flowalign {' '.join(args)[:300]} -> {result.output[-500:]!r}"
    assert "Traceback" not in result.output, shown
    if result.exit_code == 0:  # eval records a model or prompt set that fails in report.json and on stderr
        assert args[0] == "eval" and "failed: {'stage': " in result.output, shown
        rel_summary.count("fuzz", "CLI invocations: eval report with the failure recorded")
        rel_summary.count("fuzz", "CLI invocations")
        return "recorded failure"
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r} (a traceback): {shown}"
    outcome = "error line" if "error:" in result.output else "usage error"
    if outcome == "usage error":
        assert result.exit_code == 2 and ("Usage:" in result.output or "Invalid value" in result.output), (
            shown
        )
    rel_summary.count("fuzz", "CLI invocations")
    rel_summary.count("fuzz", f"CLI invocations: {outcome}")
    return outcome


def _app():
    from flowalign.cli import app

    return app


@pytest.mark.timeout(600)
@given(args=cli_invocations())
@settings(CI, max_examples=40)
def test_cli_values_give_one_error_line_never_a_traceback(args):
    _check_cli(args)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@given(args=cli_invocations())
@settings(SLOW)
def test_cli_values_many(args):
    _check_cli(args)


@pytest.mark.parametrize(
    "args",
    [
        [
            "train",
            "cdt",
            "--set",
            f"data.source={NOWHERE}",
            "--steps",
            "1",
            "--set",
            "lpips=none",
            "--set",
            "loss.lpips_weight=0",
            "--set",
            "train.cpu=true",
            "--set",
            "train.trackers=[]",
        ],
        ["score", "--reward", "toy", "--media", NOWHERE + "/manifest.jsonl", "--out", "OUT"],
        ["tokenize", "encode", "--model", NOWHERE, "--input", NOWHERE + ".mp4", "--out", "OUT"],
    ],
    ids=["cdt-missing-video-folder", "score-missing-manifest", "tokenize-missing-model"],
)
def test_missing_paths_are_one_error_line(args, tmp_path):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    if args[:2] == ["train", "cdt"]:
        args += ["--out", str(tmp_path / "run")]
    assert _check_cli(args) == "error line"
