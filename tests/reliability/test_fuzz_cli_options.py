"""The command line's option values, fuzzed: never a traceback, always the documented exit code.

Every numeric option of ``generate``, ``pairs``, ``eval``, ``score``, ``rechoose``, ``plan`` and ``train``
gets the special values (NaN, +-inf, 1e308, -0.0, 0, -1, huge integers, words) one at a time, and
random mixtures of options, device strings, reward specs and paths. Models and data point at a path
that does not exist, so a case that passes validation stops at loading: no case samples anything.

Each invocation must end with exit status 0 (only ``plan`` can succeed here), 1 (the run failed: one
``error:`` line) or 2 (refused input: one ``error:`` line, or click's usage error for a value of the
wrong type), never an uncaught exception, a traceback or an "unexpected" error (which would be a bug
in a check), and its error line stays short whatever the value's length.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
import rel_summary
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from flowalign.cli.app import MAX_MESSAGE

CI = settings.get_profile("flowalign-ci")
SLOW = settings.get_profile("flowalign-slow")
runner = CliRunner()
NOWHERE = "/nonexistent/flowalign-model"
SECTION = "option fuzzing"

FLOATS = [
    "nan",
    "-nan",
    "inf",
    "-inf",
    "1e308",
    "-1e308",
    "1e400",
    "-0.0",
    "0",
    "-1",
    "0.5",
    "5e-324",
    "x",
    "",
]
INTS = ["0", "-1", "1", str(2**63), str(10**30), str(-(10**30)), "1.5", "nan", "inf", "x", ""]
DEVICES = ["bogus", "cuda", "cuda:99", "cuda:-1", "cpu:0", "meta", "xla", "mps", "", "cpu", "CPU", "x" * 5000]
REWARDS = ["toy:foo=1", "aesthetic", "toy:batch_size=nan", "toy:batch_size=0", ":", "toy:=", "toy,,",
           "nosuch", "toy:batch_size", "toy:a=1,a=2", "clip:model=/nonexistent", "toy:" + "k=v," * 2000]  # fmt: skip
PATHS = [NOWHERE, "", "/", "/dev/null", "a\x00b", "x" * 5000, "../../../etc/passwd", "~nouser/x"]
DTYPES = ["fp32", "bf16", "fp16", "int8", "", "float32"]

# command -> (its fixed arguments, {option: kind}); "OUT" becomes a fresh folder per case.
COMMANDS: dict[str, tuple[list[str], dict[str, str]]] = {
    "generate": (
        ["generate", "--model", NOWHERE, "--prompt", "a cat", "--out", "OUT"],
        {
            "--steps": "int",
            "--guidance-scale": "float",
            "--true-cfg-scale": "float",
            "--seed": "int",
            "--height": "int",
            "--width": "int",
            "--num-frames": "int",
            "--samples-per-prompt": "int",
            "--batch-size": "int",
            "--fps": "int",
            "--guidance-strength": "float",
            "--guide-steps": "range",
            "--device": "device",
            "--dtype": "dtype",
            "--prompts-file": "path",
        },
    ),  # fmt: skip
    "pairs": (
        ["pairs", "--model", NOWHERE, "--reward", "toy", "--toy-split", "train", "--out", "OUT"],
        {
            "--num-candidates": "int",
            "--margin": "float",
            "--steps": "int",
            "--guidance-scale": "float",
            "--seed": "int",
            "--batch-size": "int",
            "--height": "int",
            "--width": "int",
            "--num-frames": "int",
            "--device": "device",
            "--dtype": "dtype",
            "--reward": "reward",
        },
    ),  # fmt: skip
    "eval": (
        ["eval", "--models", f"m={NOWHERE}", "--prompts", "toy-heldout@2", "--out", "OUT"],
        {
            "--samples-per-prompt": "int",
            "--steps": "int",
            "--guidance-scale": "float",
            "--seeds": "ints",
            "--guidance-sweep": "floats",
            "--device": "device",
            "--dtype": "dtype",
            "--rewards": "reward",
        },
    ),  # fmt: skip
    "score": (
        ["score", "--reward", "toy", "--media", NOWHERE, "--out", "OUT"],
        {
            "--batch-size": "int",
            "--device": "device",
            "--dtype": "dtype",
            "--reward": "reward",
            "--media": "path",
            "--prompts": "path",
        },
    ),  # fmt: skip
    "rechoose": (["rechoose", NOWHERE, "--weights", "ta=1", "--out-file", "p.jsonl"], {"--margin": "float"}),
    "plan": (
        ["plan", "sd35m-lora-dpo"],
        {
            "--gpu-memory": "float",
            "--num-gpus": "int",
            "--height": "int",
            "--width": "int",
            "--frames": "int",
            "--batch": "int",
            "--lora-rank": "int",
            "--strategy": "word",
        },
    ),  # fmt: skip
    "train dpo": (
        ["train", "dpo", "--model", NOWHERE, "--data", NOWHERE + ".jsonl", "--out", "OUT"],
        {"--steps": "int", "--beta": "float"},
    ),
    "train rwr": (
        ["train", "rwr", "--model", NOWHERE, "--data", NOWHERE + ".jsonl", "--out", "OUT"],
        {"--steps": "int", "--temperature": "float"},
    ),
    "train distar": (
        ["train", "distar", "--teacher", NOWHERE, "--out", "OUT"],
        {"--steps": "int", "--reward-scale": "float", "--alpha": "float", "--reward": "reward"},
    ),
}
SPECIALS = {
    "int": INTS, "float": FLOATS, "device": DEVICES, "dtype": DTYPES, "path": PATHS, "reward": REWARDS,
    "range": ["0.9:0.2", "nan:1", "0:inf", "-1:0.5", "1:2", "0.2", "a:b", "0.2:0.3:0.4", ""],
    "ints": ["0,x", "nan", "", ",", str(2**70), "-1", "0," * 3000],
    "floats": ["1,nan", "inf", "0.5", "1,1", "", "1e308,2", "x"],
    "word": ["mesh", "", "FSDP", "ddp "],
}  # fmt: skip


def _check(args: list[str], command: str) -> str:
    """Run one invocation and check it against the rules of the module docstring; returns its outcome."""
    with tempfile.TemporaryDirectory() as d:
        args = [str(Path(d) / "out") if a == "OUT" else a for a in args]
        result = runner.invoke(_app(), args)
    shown = f"flowalign {' '.join(args)[:300]!r} -> {result.output[-600:]!r}"
    assert "Traceback" not in result.output and "unexpected" not in result.output, shown
    assert result.exit_code in (0, 1, 2) and isinstance(result.exception, SystemExit | None), shown
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    if result.exit_code == 0:
        assert command == "plan" and not errors, shown
        outcome = "ran"
    elif errors:
        assert len(errors) == 1 and len(errors[0]) <= MAX_MESSAGE + len("error: "), shown
        outcome = f"error line, exit {result.exit_code}"
    else:
        assert result.exit_code == 2 and ("Usage:" in result.output or "Invalid value" in result.output), (
            shown
        )
        outcome = "usage error, exit 2"
    rel_summary.count(SECTION, "CLI invocations, 0 tracebacks")
    rel_summary.count(SECTION, f"outcome: {outcome}")
    rel_summary.add_to_list(SECTION, "commands", command)
    return outcome


@functools.cache
def _app():
    """The click command of the application, built once (Typer's runner rebuilds it for every call)."""
    import typer.main

    from flowalign.cli import app

    return typer.main.get_command(app)


def test_every_option_with_every_special_value():
    """Each option of each command alone with each special value of its kind (the grid, >= 300 cases)."""
    cases = 0
    for command, (fixed, options) in COMMANDS.items():
        for option, kind in options.items():
            for value in SPECIALS[kind]:
                args = [*fixed, option, value]
                if option in fixed:  # replace the fixed value instead of repeating the option
                    at = fixed.index(option)
                    args = [*fixed[: at + 1], value, *fixed[at + 2 :]]
                _check(args, command)
                cases += 1
    assert cases >= 300
    rel_summary.count(SECTION, "grid: option x special value", cases)


@st.composite
def invocations(draw) -> tuple[list[str], str]:
    """A command with 1-4 of its options, each a special value or a random one of the option's kind."""
    command = draw(st.sampled_from(sorted(COMMANDS)))
    fixed, options = COMMANDS[command]
    args = list(fixed)
    for option in draw(st.lists(st.sampled_from(sorted(options)), min_size=1, max_size=4, unique=True)):
        kind = options[option]
        randoms = {
            "int": st.integers(-(2**80), 2**80).map(str),
            "float": st.floats(allow_nan=True, allow_infinity=True).map(str),
        }.get(kind, st.text(max_size=30))
        value = draw(st.sampled_from(SPECIALS[kind]) | randoms)
        if option in args:
            args[args.index(option) + 1] = value
        else:
            args += [option, value]
    return args, command


@given(case=invocations())
@settings(CI, max_examples=100)
def test_random_option_mixtures(case):
    _check(*case)
    rel_summary.count(SECTION, "random mixtures (fast)")


@pytest.mark.slow
@pytest.mark.timeout(3600)
@given(case=invocations())
@settings(SLOW, max_examples=3000)
def test_random_option_mixtures_many(case):
    _check(*case)
    rel_summary.count(SECTION, "random mixtures (slow)")
