"""Parts every tiny offline builder shares: the 8x image VAE and the eval-mode switch."""

from __future__ import annotations

import torch
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


def eval_pipeline(pipe):
    """Eval mode (components built from config start in train mode) and no progress bars."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
