"""The planner knows HunyuanVideo 1.5 and LTX-2: exact meta-built sizes against the published figures."""

from __future__ import annotations

import pytest

from flowalign.planning.architectures import get_architecture, lora_param_count, param_count
from flowalign.planning.command import plan_main, recipe_from_yaml

B = 1e9


@pytest.mark.parametrize(
    ("name", "published", "encoders"),
    [
        # model cards: "8.3B" (HunyuanVideo 1.5), "19B" (LTX-2, video 14B + audio 5B streams)
        ("hunyuan-video-1.5", 8.3, {"qwen2.5-vl-7b-text": 7.1, "byt5-small-glyph": 0.22}),
        ("ltx-2", 19.0, {"gemma-3-12b": 12.2, "ltx2-connectors": 1.43}),
    ],
)
def test_published_sizes(name, published, encoders):
    arch = get_architecture(name)
    # a published size is rounded to its last digit: within half a unit of it
    half_unit = 0.05 if published < 10 else 0.5
    assert abs(param_count(arch) / B - published) <= half_unit
    for key, billions in encoders.items():
        assert abs(param_count(key) / B - billions) <= 0.05
    assert lora_param_count(arch, 16, ("to_q", "to_k", "to_v", "to_out.0")) > 0


def test_geometry():
    hy, ltx = get_architecture("hunyuan-video-1.5"), get_architecture("ltx-2")
    # 480x848, 121 frames: 31 latent frames of 30x53 cells; 512x768: 16 latent frames of 16x24
    assert hy.image_tokens(480, 848, 121) == 31 * 30 * 53
    assert ltx.image_tokens(512, 768, 121) == 16 * 16 * 24


@pytest.mark.parametrize(
    ("hub_id", "name"),
    [
        ("hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v", "hunyuan-video-1.5"),
        ("Lightricks/LTX-2", "ltx-2"),
    ],
)
def test_hub_ids_and_activations_refused_in_one_line(tmp_path, capsys, hub_id, name):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {hub_id}\nlora:\n  rank: 16\n")
    assert recipe_from_yaml(cfg).model == name
    assert plan_main([str(cfg)]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"error: {name}: the activation memory")
