"""The tiny 8x image VAE of the offline test models (every image family's builder uses it)."""

from __future__ import annotations

from diffusers import AutoencoderKL


def tiny_image_vae(latent_channels: int, *, shift_factor: float, scaling_factor: float) -> AutoencoderKL:
    """A four-level ``AutoencoderKL`` of 8 to 32 channels with the family's latent scale and shift."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    )
