"""Output folders that several processes share, and resume keyed by what determines the output.

Two real processes (``python -c`` calling the library) run ``generate_files`` on one folder, and two run
``score_files`` into one scores file, at the same time: each folder ends with exactly one row per id.
Without the locks the same two runs leave 32 rows for 16 ids and 80 rows for 40 ids (measured by
replacing ``exclusive_lock`` with a null context). A resumed run whose prompt, seed, model or settings (for scores: weights, normalisation, reward options)
differ from the recorded ones is refused, naming the first differing field.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import rel_summary

import flowalign
from flowalign.data.media import save_image
from flowalign.pipelines.generate_files import GenerationSettings, generate_files, read_manifest
from flowalign.rewards.scoring import read_score_rows, score_files
from flowalign.toy.render import render_images
from flowalign.toy.world import sample_scenes

REPO = Path(flowalign.__file__).resolve().parents[1]
PROMPTS = ["a small red circle in the center", "a large blue square in the top left", "a green cross"]


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory) -> Path:
    from flowalign.models.toy import build_toy_pipeline

    folder = tmp_path_factory.mktemp("toy-model")
    pipe = build_toy_pipeline("image", size=16, width=32, num_layers=1, text_width=16, seed=0)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def _run_together(code: str, *args: str, count: int = 2) -> None:
    """Start ``count`` processes running ``code`` (argv: ``args``) at once; all must exit 0."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]


# Both processes wait at a barrier (a file each in argv[-1], then until there are two) once their imports
# and model are loaded, so their runs overlap whatever the start-up times.
BARRIER = """
    import os, sys, time
    def barrier(folder):
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, str(os.getpid())), "w").close()
        while len(os.listdir(folder)) < 2:
            time.sleep(0.01)
"""

GENERATE = (
    BARRIER
    + """
    from flowalign.models import load_flow_model
    from flowalign.pipelines.generate_files import GenerationSettings, generate_files
    model = load_flow_model(sys.argv[1])
    settings = GenerationSettings(num_inference_steps=2, height=16, width=16, samples_per_prompt=4)
    prompts = ["a small red circle in the center", "a large blue square in the top left",
               "a green cross", "a yellow diamond"]
    barrier(sys.argv[3])
    generate_files(model, prompts, sys.argv[2], settings, batch_size=2, progress=False)
"""
)

SCORE = (
    BARRIER
    + """
    from flowalign.rewards.scoring import score_files
    import flowalign.rewards.toy  # the reward's imports, before the barrier
    barrier(sys.argv[3])
    score_files(["toy"], sys.argv[1], out=sys.argv[2], batch_size=4, progress=False)
"""
)


@pytest.mark.slow  # two interpreters importing torch and diffusers: 20-70 s on two shared cores
def test_two_generate_processes_on_one_folder_leave_one_row_per_id(tmp_path, toy_model):
    out = tmp_path / "samples"
    _run_together(GENERATE, str(toy_model), str(out), str(tmp_path / "barrier"))
    ids = [row["id"] for row in read_manifest(out / "manifest.jsonl")]
    assert sorted(ids) == [f"{i:06d}" for i in range(16)], ids
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:06d}.png" for i in range(16)]
    rel_summary.record(
        "concurrency", "2 concurrent generate runs, one folder: rows / ids", f"{len(ids)} / 16"
    )


@pytest.mark.slow
def test_two_score_processes_on_one_file_leave_one_row_per_id(tmp_path):
    folder = tmp_path / "media"
    folder.mkdir()
    scenes = sample_scenes(40, seed=2, split="train")
    rows = []
    for i, (scene, image) in enumerate(zip(scenes, render_images(scenes), strict=True)):
        save_image(image, folder / f"{i:03d}.png")
        rows.append({"id": f"{i:03d}", "prompt": scene.caption, "file": f"{i:03d}.png"})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scores.jsonl"
    _run_together(SCORE, str(folder), str(out), str(tmp_path / "barrier"))
    ids = [row["id"] for row in read_score_rows(out)]
    assert sorted(ids) == [r["id"] for r in rows], ids
    rel_summary.record("concurrency", "2 concurrent score runs, one file: rows / ids", f"{len(ids)} / 40")


def test_generate_resumed_with_other_settings_names_the_first_difference(tmp_path, toy_model):
    from flowalign.models import load_flow_model

    model = load_flow_model(toy_model)
    base = GenerationSettings(num_inference_steps=1, height=16, width=16, guidance_scale=1.0)
    generate_files(model, PROMPTS, tmp_path, base, progress=False, model_name="m")
    cases = [
        ({"prompts": ["another prompt", *PROMPTS[1:]]}, "prompt="),
        ({"settings": GenerationSettings(num_inference_steps=1, height=16, width=16, guidance_scale=1.0, seed=5)}, "seed="),
        ({"settings": GenerationSettings(num_inference_steps=1, height=16, width=16, guidance_scale=2.0)}, "settings.guidance_scale="),
        ({"settings": GenerationSettings(num_inference_steps=2, height=16, width=16, guidance_scale=1.0)}, "settings.num_inference_steps="),
        ({"model_name": "other"}, "model="),
    ]  # fmt: skip
    for change, field in cases:
        kwargs = {"prompts": PROMPTS, "settings": base, "model_name": "m", **change}
        with pytest.raises(ValueError, match="new output folder") as info:
            generate_files(model, kwargs["prompts"], tmp_path, kwargs["settings"], model_name=kwargs["model_name"], progress=False)  # fmt: skip
        assert field in str(info.value), (field, str(info.value))
        rel_summary.add_to_list("settings-aware resume", "generate: changed field refused", field.rstrip("="))
    assert (
        generate_files(model, PROMPTS, tmp_path, base, progress=False, model_name="m") == []
    )  # same: resumes
    more = generate_files(
        model, [*PROMPTS, "a fourth prompt"], tmp_path, base, progress=False, model_name="m"
    )
    assert [r["id"] for r in more] == ["000003"]  # more prompts with the same settings continue the folder


def test_score_resumed_with_other_settings_names_the_first_difference(tmp_path):
    scenes = sample_scenes(4, seed=1, split="train")
    files = []
    for i, image in enumerate(render_images(scenes)):
        files.append(tmp_path / f"{i}.png")
        save_image(image, files[-1])
    captions = [s.caption for s in scenes]
    out = tmp_path / "scores.jsonl"
    score_files(["toy"], files[:2], captions[:2], weights={"ta": 1.0, "vq": 0.5}, out=out, progress=False)
    cases = [
        ({"weights": {"ta": 1.0, "vq": 1.0}}, "settings.weights.vq="),
        ({"weights": None}, "settings.weights="),
        ({"normalisation": {"ta": (0.5, 0.1)}}, "settings.normalisation="),
        ({"prompts": [captions[1], *captions[1:4]]}, "prompt="),
    ]
    for change, field in cases:
        kwargs = {"weights": {"ta": 1.0, "vq": 0.5}, "prompts": captions, **change}
        with pytest.raises(ValueError, match="write to another file") as info:
            score_files(["toy"], files, kwargs.pop("prompts"), out=out, progress=False, **kwargs)
        assert field in str(info.value), (field, str(info.value))
        rel_summary.add_to_list("settings-aware resume", "score: changed field refused", field.rstrip("="))
    result = score_files(["toy"], files, captions, weights={"ta": 1.0, "vq": 0.5}, out=out, progress=False)
    assert result.num_scored == 2 and result.num_skipped == 2
    assert len({json.dumps(r["settings"], sort_keys=True) for r in read_score_rows(out)}) == 1
