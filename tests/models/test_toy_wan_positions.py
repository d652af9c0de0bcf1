"""The toy video transformer with absolute token positions: what it adds to Wan, and what it keeps."""

import pytest
import torch
from diffusers import WanTransformer3DModel

from flowalign.models import load_flow_model
from flowalign.models.toy import ToyWanTransformer3DModel, build_toy_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(cls):
    torch.manual_seed(0)
    return cls(
        patch_size=(2, 4, 4),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=3,
        out_channels=3,
        text_dim=16,
        freq_dim=32,
        ffn_dim=64,
        num_layers=1,
        rope_max_seq_len=64,
    ).eval()


def _velocity(net, x):
    text = torch.randn(x.shape[0], 5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return net(hidden_states=x, timestep=torch.full((x.shape[0],), 500.0), encoder_hidden_states=text)[0]


def test_plain_wan_cannot_tell_token_places_apart_and_the_toy_transformer_can():
    # Every token of a constant clip has the same content. Wan's only positions are RoPE's relative
    # ones, so every token's output is the same; with absolute positions the outputs differ by place.
    x = torch.full((1, 3, 4, 16, 16), 0.3)
    plain = _velocity(_tiny(WanTransformer3DModel), x)
    per_token = plain.unfold(2, 2, 2).unfold(3, 4, 4).unfold(4, 4, 4)  # [B, C, frames, rows, cols, 2, 4, 4]
    first_token = per_token[:, :, :1, :1, :1]
    torch.testing.assert_close(per_token, first_token.expand_as(per_token), atol=1e-5, rtol=0)

    positioned = _velocity(_tiny(ToyWanTransformer3DModel), x)
    left, right = positioned[..., :4], positioned[..., -4:]
    top, bottom = positioned[..., :4, :], positioned[..., -4:, :]
    first, last = positioned[:, :, :2], positioned[:, :, -2:]
    for a, b in ((left, right), (top, bottom), (first, last)):
        assert (a - b).abs().mean() > 1e-2


def test_same_weights_and_keys_as_wan():
    plain, positioned = _tiny(WanTransformer3DModel), _tiny(ToyWanTransformer3DModel)
    assert plain.state_dict().keys() == positioned.state_dict().keys()
    positioned.load_state_dict(plain.state_dict())  # a plain Wan checkpoint loads as is
    assert dict(positioned.config) == dict(plain.config)  # the same config keys and values


def test_toy_video_model_with_positions_saves_and_reloads(tmp_path):
    pipe = build_toy_pipeline("video", absolute_positions=True, num_layers=1)
    pipe.save_pretrained(str(tmp_path), safe_serialization=True)
    model = load_flow_model(tmp_path)
    assert type(model.transformer) is ToyWanTransformer3DModel
    assert model.is_video
    x = torch.randn(2, 3, 8, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.8])
    cond, _ = model.encode_prompt(["a small red circle in the center moving left"] * 2)
    with torch.no_grad():
        reloaded = model.velocity(x, t, cond)
        original = model.velocity(x, t, cond, net=pipe.transformer.eval())
    torch.testing.assert_close(reloaded, original, rtol=0, atol=0)


def test_absolute_positions_are_for_videos_only():
    with pytest.raises(ValueError, match="absolute_positions is for the video model"):
        build_toy_pipeline("image", absolute_positions=True)
