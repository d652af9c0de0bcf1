"""Published sizes of the Wan 2.2 and image-to-video architectures (meta-built, exact counts)."""

from __future__ import annotations

from flowalign.planning.architectures import get_architecture, param_count, vae_param_count


def test_wan22_sizes_match_the_published_models():
    t2v, i2v = get_architecture("wan2.2-t2v-a14b"), get_architecture("wan2.2-i2v-a14b")
    assert t2v.experts == i2v.experts == 2
    assert round(param_count(t2v) / 1e9) == 14  # "A14B": 14B per expert, one active per step
    # I2V's patch embedding reads 20 more channels (4 mask + 16 condition) per 1x2x2 patch into 5120 wide
    assert param_count(i2v) - param_count(t2v) == 20 * 4 * 5120
    assert round(param_count("wan2.2-ti2v-5b") / 1e9) == 5
    assert param_count("wan2.1-i2v-14b") > param_count(i2v)  # plus CLIP image cross-attention


def test_ti2v_5b_latents_are_16x_smaller_with_48_channels():
    arch = get_architecture("wan2.2-ti2v-5b")
    assert arch.latent_shape(704, 1280, 121) == (48, 31, 44, 80)
    assert arch.image_tokens(704, 1280, 121) == 31 * 22 * 40
    assert vae_param_count(arch) > vae_param_count(get_architecture("wan-14b"))
