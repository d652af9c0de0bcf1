"""benchmarks/run_all.py: reads each benchmark's ratios from its output; failures become error rows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import run_all  # noqa: E402


def test_every_benchmark_script_exists_and_has_a_parser():
    names = [b.name for b in run_all.BENCHES]
    assert len(names) == len(set(names))
    for bench in run_all.BENCHES:
        assert (run_all.HERE / f"{bench.name}.py").is_file()
        assert callable(bench.parse)


def test_parsers_read_the_printed_ratios():
    dpo = "speed-up (baseline / ours): 3.15x; peak memory ratio (ours / baseline): 0.52\n"
    assert [m.ratio for m in run_all.parse_dpo_step(dpo, None)] == [3.15, 0.52]
    cache = (
        "speed-up (per-step / cached): 11.83x; peak RSS ratio (cached / per-step): 1.00; "
        "step-module memory ratio (cached / per-step): 0.01\n"
    )
    assert [m.ratio for m in run_all.parse_dpo_step_cache(cache, None)] == [11.83, 1.0, 0.01]
    generate = (
        "## sd3: batch 1, 4 steps, {}\nrun ...\nspeed-up (baseline / ours): 1.200x\n"
        "## wan: batch 1, 4 steps, {}\nrun ...\nspeed-up (baseline / ours): 2.573x\n"
    )
    got = run_all.parse_generate(generate, None)
    assert [(m.measure, m.ratio) for m in got] == [("sampling sd3", 1.2), ("sampling wan", 2.573)]
    nrg = (
        "guidance          ms/step   x none\nnone               205.42     1.00\nlatent             402.96     1.96\n"
        "time ratio pixel / latent: 0.74, pixel+model / latent: 1.65 (> 1: latent is faster)\n"
    )
    assert [m.ratio for m in run_all.parse_nrg(nrg, None)] == [1.96, 0.74, 1.65]
    distar = (
        "f-distill (JS+GAN)         214.0      227.8       225.0                922.4             1.00\n"
        "DI* (score div.)           304.6       86.2       129.8                948.9             1.42\n"
        "DI* (KL baseline)          248.5      105.8       134.4                949.0             1.16\n"
    )
    assert [m.ratio for m in run_all.parse_distar(distar, None)] == [1.42, 1.16]
    fd = "teacher 8-step CFG (2 fwd/step)  489.9 ms\nspeed-up teacher / one-step: 8.0x (16 ...)\n"
    assert run_all.parse_fdistill(fd, None)[0].ratio == 8.0
    ev = "overhead of run_eval over the in-memory loop: 0.68x; a warm re-run costs 7% of a cold one\n"
    assert [m.ratio for m in run_all.parse_eval(ev, None)] == [0.68, 0.07]
    cdt = {
        "9": {
            "frames_per_s": {
                "cdt encode": 20.0,
                "wan encode": 10.0,
                "cdt decode (1 step)": 3.0,
                "wan decode": 6.0,
            }
        }
    }
    assert [m.ratio for m in run_all.parse_cdt("", cdt)] == [2.0, 0.5]
    assert run_all.parse_score("", {"ratio": 1.87, "max_abs_score_diff": 2e-4})[0].ratio == 1.87
    with pytest.raises(ValueError, match="dpo_step"):
        run_all.parse_dpo_step("something else", None)


def test_a_failing_script_is_an_error_row(tmp_path, monkeypatch):
    (tmp_path / "broken.py").write_text("import sys\nsys.exit('broken on purpose')\n")
    (tmp_path / "silent.py").write_text("print('no ratios here')\n")
    monkeypatch.setattr(run_all, "HERE", tmp_path)
    broken = run_all.Bench("broken", [], [], run_all.parse_dpo_step)
    silent = run_all.Bench("silent", [], [], run_all.parse_dpo_step)
    r = run_all.run_bench(broken, quick=True, timeout=60, threads=1)
    assert r.measures == [] and r.error == "exit 1: broken on purpose"
    r = run_all.run_bench(silent, quick=True, timeout=60, threads=1)
    assert r.measures == [] and r.error.startswith("could not read the output: dpo_step")
    text = run_all.table([r])
    assert "silent" in text and "ERROR" in text


@pytest.mark.slow
def test_quick_score_benchmark_end_to_end(tmp_path, capsys):
    out = tmp_path / "ratios.json"
    assert run_all.main(["--quick", "--only", "score", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "reward scoring images/s" in printed
    assert '"ratio"' in out.read_text()
