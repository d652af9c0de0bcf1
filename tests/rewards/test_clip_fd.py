"""CLIP-FD: the Frechet distance on CLIP image embeddings, as an extractor and inside an evaluation."""

from __future__ import annotations

import torch

from flowalign.evals.fid import fid_from_features, load_fid_extractor
from flowalign.rewards.backbones import load_clip_backbone


def test_clip_extractor_is_the_backbones_image_embedding(open_clip_dir, images):
    extractor, info = load_fid_extractor(f"clip:local-dir:{open_clip_dir}")
    backbone = load_clip_backbone(f"local-dir:{open_clip_dir}")
    torch.testing.assert_close(extractor(images), backbone.image_features(images), rtol=0, atol=0)
    assert info["extractor"].startswith("CLIP image embeddings") and info["comparable_with_papers"] is False


def test_eval_reports_clip_fd_against_a_reference_folder(open_clip_dir, tmp_path, one_thread):
    from flowalign.data.media import save_image
    from flowalign.evals import EvalOptions, run_eval
    from flowalign.models.toy import save_toy_model
    from flowalign.pipelines.generate_files import GenerationSettings

    model = save_toy_model(tmp_path / "toy", "image", width=32, num_layers=1)
    reference = tmp_path / "reference"
    reference.mkdir()
    gen = torch.Generator().manual_seed(0)
    ref_images = torch.rand(4, 3, 32, 32, generator=gen)
    for i, image in enumerate(ref_images):
        save_image(image, reference / f"{i}.png")
    options = EvalOptions(settings=GenerationSettings(num_inference_steps=2), num_resamples=50,
                          fid_reference=str(reference), clip_fd_model=f"local-dir:{open_clip_dir}")  # fmt: skip
    result = run_eval({"m": model}, "toy-heldout@2", ["toy"], samples_per_prompt=2, seeds=[0],
                      out_dir=tmp_path / "eval", options=options, render=False, progress=False)  # fmt: skip
    entry = result.report["results"]["toy-heldout"]["fid"]["m"]["clip"]
    assert entry["n"] == 4 and entry["n_reference"] == 4 and entry["extractor"].startswith("CLIP")
    # the same number from the saved samples and reference files, computed directly
    from flowalign.data.media import load_media
    from flowalign.pipelines.generate_files import read_manifest

    backbone = load_clip_backbone(f"local-dir:{open_clip_dir}")
    manifests = list((tmp_path / "eval").rglob("manifest.jsonl"))
    files = sorted({(m.parent / r["file"]).resolve() for m in manifests for r in read_manifest(m)})
    assert len(files) == 4
    samples = torch.stack([load_media(f) for f in files])
    refs = torch.stack([load_media(reference / f"{i}.png") for i in range(4)])
    expected = fid_from_features(backbone.image_features(samples), backbone.image_features(refs))
    assert abs(entry["fid"] - expected) <= 1e-9 * max(1.0, expected)
