"""Every command's errors: one ``error:`` line, exit 2 for refused input and 1 for a failed run, no traceback."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import flowalign.pipelines.memory_guard as memory_guard
from flowalign.cli import app
from flowalign.cli.app import MAX_MESSAGE, one_line
from flowalign.models.toy import save_toy_model

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
NOWHERE = "/nonexistent/flowalign-model"


def _error(args: list, code: int = 2) -> str:
    res = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output and res.exit_code == code, res.output[-2000:]
    errors = [line for line in res.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and isinstance(res.exception, SystemExit), res.output[-2000:]
    return errors[0]


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return save_toy_model(tmp_path_factory.mktemp("toy") / "toy", "image", width=32, num_layers=1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--guidance-scale", "nan"], "--guidance-scale must be a number, got nan"),
        (["--guidance-scale", "inf"], "--guidance-scale must be finite"),
        (["--true-cfg-scale", "-1"], "--true-cfg-scale must be >= 0.0"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--steps", "-1"], "--steps must be >= 1"),
        (["--fps", "0"], "--fps must be >= 1"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--height", "0"], "--height must be >= 1"),
        (["--width", str(10**12)], "--width must be <= 65536"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--guidance-strength", "nan"], "--guidance-strength must be a number"),
        (["--guide-steps", "0.9:0.2"], "--guide-steps end must be >= 0.9"),
        (["--guide-steps", "nan:1"], "--guide-steps start must be a number"),
        (["--device", "bogus"], "--device must be cpu, cuda, cuda:N or mps, got 'bogus'"),
        (["--device", "meta"], "--device must be cpu, cuda, cuda:N or mps"),
        (["--dtype", "int8"], "--dtype must be one of"),
    ],
)
def test_generate_options_refused_before_the_model_is_loaded(args, message, tmp_path):
    """The model path does not exist: each error is the option's, so it was found before loading."""
    line = _error(["generate", "--model", NOWHERE, "--prompt", "a cat", "--out", tmp_path / "o", *args])
    assert message in line, line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--margin", "nan"], "--margin must be a number, got nan"),
        (["--margin", "-0.5"], "--margin must be >= 0.0"),
        (["--num-candidates", "1"], "--num-candidates must be >= 2"),
        (["--num-frames", "0"], "--num-frames must be >= 1"),
        (["--mode", "best"], "mode must be 'best_worst' or 'all'"),
        (["--device", "cuda:99" if not torch.cuda.is_available() else "cuda:4096"], "--device cuda:"),
    ],
)
def test_pairs_options_refused_before_sampling(args, message, tmp_path):
    line = _error(["pairs", "--model", NOWHERE, "--reward", "toy", "--toy-split", "train",
                   "--out", tmp_path / "o", *args])  # fmt: skip
    assert message in line, line


def test_eval_guidance_sweep_and_spec_numbers(tmp_path):
    common = ["eval", "--models", f"m={NOWHERE}", "--prompts", "toy-heldout@2", "--out", tmp_path / "e"]
    assert "--guidance-sweep must be a number, got nan" in _error([*common, "--guidance-sweep", "1,nan"])
    assert "--guidance-sweep must be >= 1.0" in _error([*common, "--guidance-sweep", "0.5,2"])
    assert "--seeds: 'x' is not a whole number" in _error([*common, "--seeds", "0,x"])
    spec = [
        "eval",
        "--models",
        f"m={NOWHERE}:height=-3",
        "--prompts",
        "toy-heldout@2",
        "--out",
        tmp_path / "e",
    ]
    assert "--models m: height must be >= 1" in _error(spec)


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        ("toy:foo=1", "reward 'toy': unknown option 'foo' (its options: batch_size)"),
        ("aesthetic", "reward 'aesthetic' needs the option 'head'"),
        ("nosuch", "unknown reward"),
        ("toy:batch_size", "is not of the form key=value"),
    ],
)
def test_reward_specs(reward, message, toy_dir, tmp_path):
    gen = runner.invoke(app, ["generate", "--model", toy_dir, "--prompt", "a red circle", "--steps", "1",
                              "--out", tmp_path / "g"])  # fmt: skip
    assert gen.exit_code == 0, gen.output
    assert message in _error(
        ["score", "--reward", reward, "--media", tmp_path / "g", "--out", tmp_path / "s.jsonl"]
    )
    pairs = ["pairs", "--model", toy_dir, "--reward", reward, "--toy-split", "train", "--out", tmp_path / "p"]
    assert message in _error(pairs)
    assert not (tmp_path / "p").exists()  # refused before anything was sampled


def test_sizes_against_the_family_and_the_memory(tiny_model_dir, tmp_path, monkeypatch):
    sd3 = tiny_model_dir("sd3")
    base = [
        "generate",
        "--model",
        sd3,
        "--prompt",
        "a cat",
        "--steps",
        "1",
        "--device",
        "cpu",
        "--out",
        tmp_path / "o",
    ]
    assert "height must be a positive multiple of 16 for sd3, got 60" in _error([*base, "--height", "60"])
    # The lower bound with the model's VAE, between the pixels-only bound (checked before loading) and the
    # full one: refused after loading, before sampling.
    from flowalign.models import load_flow_model

    vae = memory_guard.vae_channels(load_flow_model(sd3))
    pixels_only = memory_guard.media_bytes(64, 64, 1, 1)
    with_vae = memory_guard.media_bytes(64, 64, 1, 1, vae=vae)
    assert with_vae > pixels_only
    monkeypatch.setattr(memory_guard, "available_memory", lambda device: (pixels_only + with_vae) // 2)
    line = _error([*base, "--height", "64", "--width", "64"])
    assert "sampling at 64x64 with batch 1 needs at least" in line and "GiB is available on cpu" in line
    assert not (tmp_path / "o" / "manifest.jsonl").exists()
    monkeypatch.setattr(memory_guard, "available_memory", lambda device: pixels_only - 1)
    line = _error(["generate", "--model", NOWHERE, "--prompt", "a cat", "--device", "cpu", "--height", "64",
                   "--width", "64", "--out", tmp_path / "o"])  # fmt: skip
    assert "needs at least" in line  # before loading: the missing model is never reached


def test_a_size_no_machine_holds_is_refused_before_allocating(tmp_path):
    line = _error(["generate", "--model", NOWHERE, "--prompt", "a cat", "--device", "cpu", "--height", "65536",
                   "--width", "65536", "--batch-size", "64", "--samples-per-prompt", "64", "--out", tmp_path / "o"])  # fmt: skip
    assert "needs at least 3072.0 GiB" in line  # 64 x 65536^2 x 3 x 4 bytes


def test_lora_comfyui_on_a_file_that_is_not_safetensors(tmp_path):
    bad = tmp_path / "lora.bin"
    torch.save({"w": torch.zeros(2)}, bad)
    assert "is not a readable safetensors file" in _error(
        ["lora-comfyui", bad, "--out", tmp_path / "c.safetensors"]
    )
    assert "no LoRA file at" in _error(
        ["lora-comfyui", tmp_path / "missing", "--out", tmp_path / "c.safetensors"]
    )


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickled_text_encoder_is_refused_without_advice_to_unpickle(tiny_model_dir, tmp_path, capfd):
    folder = tmp_path / "sd3"
    shutil.copytree(tiny_model_dir("sd3"), folder)
    weights = folder / "text_encoder" / "model.safetensors"
    state = {**load_file(weights), "payload": _Payload()}
    torch.save(state, folder / "text_encoder" / "pytorch_model.bin")
    weights.unlink()
    line = _error(
        ["generate", "--model", folder, "--prompt", "a cat", "--steps", "1", "--out", tmp_path / "o"]
    )
    assert "a pickle that holds more than tensors, refused" in line and "weights_only" not in line
    assert "this must never run" not in capfd.readouterr().out


def test_eval_exits_1_when_every_reward_failed(toy_dir, tmp_path):
    args = ["eval", "--models", f"m={toy_dir}", "--prompts", "toy-heldout@2", "--rewards", "nosuch,alsonot",
            "--steps", "1", "--out", tmp_path / "e"]  # fmt: skip
    assert "no reward scored any sample" in _error(args, code=1)
    assert (tmp_path / "e" / "report.json").is_file()


def test_runtime_and_unexpected_errors_exit_1(monkeypatch, tmp_path):
    import flowalign.models

    def oom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 80.00 GiB\nmore details")

    monkeypatch.setattr(flowalign.models, "load_flow_model", oom)
    args = ["generate", "--model", NOWHERE, "--prompt", "a cat", "--device", "cpu", "--out", tmp_path / "o"]
    assert _error(args, code=1) == "error: CUDA out of memory. Tried to allocate 80.00 GiB"

    def bug(*args, **kwargs):
        raise KeyError("x")

    monkeypatch.setattr(flowalign.models, "load_flow_model", bug)
    assert "unexpected KeyError: 'x' (FLOWALIGN_TRACEBACK=1 shows where)" in _error(args, code=1)
    monkeypatch.setenv("FLOWALIGN_TRACEBACK", "1")
    res = runner.invoke(app, [str(a) for a in args])
    assert isinstance(res.exception, KeyError)


def test_messages_are_one_short_line():
    assert one_line(ValueError()) == "ValueError"
    assert one_line(ValueError("\n\n  second\nthird")) == "second"
    long = one_line(ValueError("v" * 10**6))
    assert len(long) == MAX_MESSAGE and long.endswith("...")
    line = _error(["generate", "--model", NOWHERE, "--prompt", "a", "--out", "o", "--device", "x" * 10**5])
    assert len(line) < 200
