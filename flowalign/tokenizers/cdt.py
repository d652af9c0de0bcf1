"""CDT, the conditioned-diffusion video tokenizer (Yang, Li et al., arXiv 2503.03708; docs/algorithms.md 4).

A causal 3-D encoder compresses a video into a KL-regularised latent; a conditioning decoder turns
the latent into a feature pyramid; a causal 3-D U-Net, conditioned on that pyramid, predicts the
clean video x0 from a noisy one. Reconstruction is one DDIM step from scaled noise (docs/algorithms.md
4.3)::

    z      = mean of E(x)                                [B, 16, 1+k, H/8, W/8]
    x_rec  = D(gamma * eps, t = (T-1)/T, cond(z))        [B, 3, 1+4k, H, W],  eps ~ N(0, I), gamma = 0.8

Layout and range: the module works on ``[B, C, T, H, W]`` tensors in [-1, 1], like diffusers' video
VAEs (``AutoencoderKLWan``); :func:`encode_video` / :func:`decode_video` speak the media boundary
(``[B, T, 3, H, W]`` in [0, 1]). Images are 1-frame videos. Videos need 1 + 4k frames (1 + t_f k
for a temporal factor t_f) and sides divisible by 8 (the spatial factor); anything else is refused.

Any length: encoding and decoding run chunk by chunk with a :class:`FeatureCache` per network
(docs/algorithms.md 4.4), so memory stays flat in the video length and the result equals a single pass.
Decoding loops the chunks outermost and the DDIM steps innermost with one denoiser cache per step,
which gives the same numbers as the released code's step-outer loop but lets the output stream.

Deviations from the released code (which ships no training code): pre-activation residual blocks
with SiLU instead of conv-LayerNorm-ReLU, a zero-initialised second conv per block, a (1, 3, 3)
up-sampling conv, and the condition pyramid computed once per chunk instead of once per step.
Released checkpoints therefore do not load into this module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import Tensor

from flowalign.tokenizers.config import CDTConfig
from flowalign.tokenizers.layers import FeatureCache
from flowalign.tokenizers.networks import ConditionDecoder, Denoiser, Encoder
from flowalign.tokenizers.schedule import cosine_alphas_cumprod, ddim_step, ddim_timesteps, initial_noise

__all__ = [
    "CDTConfig",
    "CDTOutput",
    "ConditionedDiffusionTokenizer",
    "DiagonalGaussian",
    "VideoShapeError",
    "cosine_alphas_cumprod",
    "ddim_step",
    "ddim_timesteps",
    "decode_video",
    "default_chunk_sizes",
    "encode_video",
    "initial_noise",
]


class VideoShapeError(ValueError):
    """A video or latent whose frame count or size the tokenizer cannot take (the message says why)."""


@dataclass
class DiagonalGaussian:
    """The posterior q(z | x) = N(mean, diag(exp(logvar))), each [B, C_z, T', H', W']."""

    mean: Tensor
    logvar: Tensor

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> Tensor:
        """The mean (what inference encodes to)."""
        return self.mean

    def sample(self, noise: Tensor | None = None, *, generator: torch.Generator | None = None) -> Tensor:
        """mean + std * noise (noise ~ N(0, I) drawn from ``generator`` when not given)."""
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, dtype=torch.float32).to(self.mean)
        return self.mean + self.std * noise


@dataclass
class CDTOutput(BaseOutput):
    """Training forward pass: x0_pred [B, 3, T, H, W]; posterior mean and logvar [B, C_z, T', H', W']."""

    x0_pred: Tensor
    mean: Tensor
    logvar: Tensor


# ------------------------------------------------------------------------------------------ model


class ConditionedDiffusionTokenizer(ModelMixin, ConfigMixin):
    """The CDT tokenizer as a diffusers model: ``save_pretrained`` / ``from_pretrained`` folders.

    Build with ``ConditionedDiffusionTokenizer.from_cdt_config(CDTConfig.small())``; the keyword
    arguments of ``__init__`` are the fields of :class:`CDTConfig` (documented there).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 16,
        encoder_channels: tuple[int, ...] = (128, 256, 384, 512),
        space_down: tuple[bool, ...] = (False, True, True, True),
        time_down: tuple[bool, ...] = (False, False, True, True),
        cond_out_channels: int = 16,
        unet_channels: tuple[int, ...] = (64, 128, 192, 256, 320, 384),
        unet_attention: tuple[bool, ...] | None = None,
        decoder_type: str = "diffusion",
        num_train_timesteps: int = 8192,
        cosine_s: float = 0.008,
        sample_gamma: float = 0.8,
        pad_mode: str = "constant",
        logvar_min: float = -30.0,
        logvar_max: float = 20.0,
        scaling_factor: float = 1.3,
    ) -> None:
        super().__init__()
        cfg = self.cdt_config  # validates
        n, levels = len(cfg.encoder_channels), len(cfg.unet_channels)
        space = [*cfg.space_down, *([True] * (levels - n))]
        time = [*cfg.time_down, *([False] * (levels - n))]
        space[-1] = time[-1] = False
        self.encoder = Encoder(
            in_channels=cfg.in_channels,
            channels=cfg.encoder_channels,
            space_down=cfg.space_down,
            time_down=cfg.time_down,
            latent_channels=cfg.latent_channels,
            pad_mode=cfg.pad_mode,
        )
        self.cond_decoder = ConditionDecoder(
            latent_channels=cfg.latent_channels,
            channels=cfg.encoder_channels,
            space_down=cfg.space_down,
            time_down=cfg.time_down,
            out_channels=cfg.cond_out_channels,
            pad_mode=cfg.pad_mode,
        )
        is_diffusion = cfg.decoder_type == "diffusion"
        self.denoiser = Denoiser(
            channels=cfg.unet_channels,
            space_down=space,
            time_down=time,
            cond_channels=self.cond_decoder.pyramid_channels(),
            attention=cfg.unet_attention if cfg.unet_attention is not None else [True] * levels,
            in_channels=cfg.in_channels if is_diffusion else 0,
            out_channels=cfg.in_channels,
            use_time=is_diffusion,
            pad_mode=cfg.pad_mode,
        )

    # -- shapes

    @property
    def cdt_config(self) -> CDTConfig:
        """The registered config as a :class:`CDTConfig` (lists from config.json become tuples)."""
        names = {f.name for f in dataclasses.fields(CDTConfig)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in self.config.items() if k in names}
        return CDTConfig(**values)

    @classmethod
    def from_cdt_config(cls, config: CDTConfig) -> ConditionedDiffusionTokenizer:
        """Build a randomly initialised tokenizer from a :class:`CDTConfig`."""
        return cls(**dataclasses.asdict(config))

    @property
    def _weight(self) -> Tensor:
        """A weight, for the model's device and dtype (ModelMixin's ``.device`` imports half of diffusers)."""
        return self.denoiser.out_conv.weight

    @property
    def is_diffusion(self) -> bool:
        return self.config.decoder_type == "diffusion"

    @property
    def space_factor(self) -> int:
        return 2 ** sum(bool(s) for s in self.config.space_down)

    @property
    def time_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.config.time_down)

    def check_video(self, x: Tensor, *, name: str = "video") -> None:
        """Raise :class:`VideoShapeError` unless x is [B, C, 1 + t_f k, H, W] with H, W divisible by s_f."""
        c_in, tf, sf = self.config.in_channels, self.time_factor, self.space_factor
        if x.ndim != 5 or x.shape[1] != c_in:
            raise VideoShapeError(
                f"{name} must be [B, {c_in}, T, H, W] (channels second), got {tuple(x.shape)}"
            )
        t, h, w = x.shape[2:]
        if t < 1 or (t - 1) % tf:
            raise VideoShapeError(
                f"{name} has {t} frames; the tokenizer needs 1 + {tf}k frames "
                f"(1, {1 + tf}, {1 + 2 * tf}, ...): trim or pad the clip"
            )
        if h % sf or w % sf or h == 0 or w == 0:
            raise VideoShapeError(f"{name} is {h}x{w} (HxW); both sides must be positive multiples of {sf}")

    def latent_shape(self, video_shape: tuple[int, ...]) -> tuple[int, int, int, int, int]:
        """[B, C_z, 1 + k, H / s_f, W / s_f] for a video of shape [B, C, 1 + t_f k, H, W]."""
        b, _, t, h, w = video_shape
        return (
            b,
            self.config.latent_channels,
            1 + (t - 1) // self.time_factor,
            h // self.space_factor,
            w // self.space_factor,
        )

    def _check_latent(self, z: Tensor) -> None:
        if z.ndim != 5 or z.shape[1] != self.config.latent_channels:
            raise VideoShapeError(
                f"latent must be [B, {self.config.latent_channels}, T', H', W'], got {tuple(z.shape)}"
            )

    # -- the three networks

    def posterior(self, moments: Tensor) -> DiagonalGaussian:
        """Split [B, 2 C_z, ...] moments into a :class:`DiagonalGaussian` (log-variance clamped)."""
        mean, logvar = moments.float().chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar.clamp(self.config.logvar_min, self.config.logvar_max))

    def encode(self, x: Tensor, *, chunk_frames: int | None = None) -> DiagonalGaussian:
        """Encode a video [B, C, 1 + t_f k, H, W] in [-1, 1] to its posterior over latents.

        Args:
            x: the video.
            chunk_frames: None = one pass; else the first frame alone, then chunks of this many
                frames (a multiple of t_f) through the feature cache. Both give the same latents.

        Returns:
            The posterior; ``.mean`` [B, C_z, 1 + k, H / s_f, W / s_f] is the latent used at inference.
        """
        self.check_video(x)
        if chunk_frames is None:
            return self.posterior(self.encoder(x))
        if chunk_frames < 1 or chunk_frames % self.time_factor:
            raise ValueError(
                f"chunk_frames must be a positive multiple of {self.time_factor}, got {chunk_frames}"
            )
        cache = FeatureCache()
        bounds = [(0, 1)] + [
            (s, min(s + chunk_frames, x.shape[2])) for s in range(1, x.shape[2], chunk_frames)
        ]
        moments = [self.encoder(x[:, :, a:b], cache) for a, b in bounds]
        return self.posterior(torch.cat(moments, dim=2))  # [B, 2 C_z, 1 + k, H', W']

    def condition(self, z: Tensor, cache: FeatureCache | None = None) -> list[Tensor]:
        """The condition pyramid of latent z (finest first; level 0 has the video's T, H, W)."""
        return self.cond_decoder(z.to(self._weight.dtype), cache)

    def predict_x0(
        self, x_t: Tensor | None, t: Tensor | None, cond: list[Tensor], cache: FeatureCache | None = None
    ) -> Tensor:
        """The denoiser's clean-video prediction; t [B] in [0, 1] is index / num_train_timesteps."""
        return self.denoiser(None if x_t is None else x_t.to(self._weight.dtype), t, cond, cache)

    def forward(
        self,
        x: Tensor,
        *,
        timesteps: Tensor | None = None,
        noise: Tensor | None = None,
        latent_noise: Tensor | None = None,
    ) -> CDTOutput:
        """Training pass: x0 prediction from x_t = sqrt(abar) x + sqrt(1 - abar) noise and z ~ q(z | x).

        Args:
            x: clean video [B, C, T, H, W] in [-1, 1].
            timesteps: [B] integer indices in [0, num_train_timesteps) (diffusion decoder only).
            noise: [B, C, T, H, W] standard normal (diffusion decoder only).
            latent_noise: [B, C_z, T', H', W'] standard normal for the reparameterised latent
                sample; None uses the posterior mean.

        Returns:
            :class:`CDTOutput` with x0_pred and the posterior's mean and logvar.
        """
        self.check_video(x)
        post = self.posterior(self.encoder(x))
        z = post.mean if latent_noise is None else post.sample(latent_noise)
        cond = self.condition(z)
        if not self.is_diffusion:
            return CDTOutput(x0_pred=self.predict_x0(None, None, cond), mean=post.mean, logvar=post.logvar)
        if timesteps is None or noise is None:
            raise ValueError("the diffusion decoder's training pass needs timesteps and noise")
        abar = cosine_alphas_cumprod(self.config.num_train_timesteps, s=self.config.cosine_s)[timesteps.cpu()]
        abar = abar.to(device=x.device, dtype=torch.float32).view(-1, 1, 1, 1, 1)  # [B, 1, 1, 1, 1]
        x_t = abar.sqrt() * x.float() + (1 - abar).sqrt() * noise.float()
        t = timesteps.float() / self.config.num_train_timesteps
        return CDTOutput(x0_pred=self.predict_x0(x_t, t, cond), mean=post.mean, logvar=post.logvar)

    # -- decoding

    def _latent_chunks(self, num_latents: int, chunk_latents: int | None) -> list[tuple[int, int, int, int]]:
        """(latent start, latent end, frame start, frame end) per chunk; the first chunk is latent 0 alone."""
        tf = self.time_factor
        if chunk_latents is None:
            return [(0, num_latents, 0, 1 + (num_latents - 1) * tf)]
        if chunk_latents < 1:
            raise ValueError(f"chunk_latents must be >= 1, got {chunk_latents}")
        out = [(0, 1, 0, 1)]
        for a in range(1, num_latents, chunk_latents):
            b = min(a + chunk_latents, num_latents)
            out.append((a, b, 1 + (a - 1) * tf, 1 + (b - 1) * tf))
        return out

    def iter_decode(
        self,
        z: Tensor,
        *,
        num_inference_steps: int = 1,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        chunk_latents: int | None = None,
        clip: bool = False,
    ) -> Iterator[Tensor]:
        """Decode chunk by chunk, yielding video chunks [B, C, frames, H, W] in order (see :meth:`decode`)."""
        self._check_latent(z)
        b, _, t_lat, h_lat, w_lat = z.shape
        num_frames, h, w = (
            1 + (t_lat - 1) * self.time_factor,
            h_lat * self.space_factor,
            w_lat * self.space_factor,
        )
        if noise is not None and tuple(noise.shape) != (b, self.config.in_channels, num_frames, h, w):
            raise VideoShapeError(
                f"noise must be {(b, self.config.in_channels, num_frames, h, w)}, got {tuple(noise.shape)}"
            )
        steps = ddim_timesteps(self.config.num_train_timesteps, num_inference_steps).tolist()
        abar = cosine_alphas_cumprod(self.config.num_train_timesteps, s=self.config.cosine_s)
        cond_cache = FeatureCache()
        den_caches = [FeatureCache() for _ in steps]
        for la, lb, fa, fb in self._latent_chunks(t_lat, chunk_latents):
            cond = self.condition(z[:, :, la:lb], cond_cache)
            if not self.is_diffusion:
                x0 = self.predict_x0(None, None, cond, den_caches[0])
                yield x0.clamp(-1, 1) if clip else x0
                continue
            eps = (
                noise[:, :, fa:fb]
                if noise is not None
                else initial_noise(
                    b, fb - fa, h, w, generator=generator, device=z.device, channels=self.config.in_channels
                )
            )
            x = self.config.sample_gamma * eps.float()
            for j in reversed(range(len(steps))):  # t = 1 -> 0
                t = torch.full((b,), steps[j] / self.config.num_train_timesteps, device=z.device)
                x0 = self.predict_x0(x, t, cond, den_caches[j]).float()
                if clip:
                    x0 = x0.clamp(-1, 1)
                prev = float(abar[steps[j - 1]]) if j > 0 else 1.0
                x = ddim_step(x, x0, float(abar[steps[j]]), prev)
            yield x

    def decode(
        self,
        z: Tensor,
        *,
        num_inference_steps: int = 1,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        chunk_latents: int | None = None,
        clip: bool = False,
    ) -> Tensor:
        """Decode latents [B, C_z, 1 + k, H', W'] to a video [B, C, 1 + t_f k, H' s_f, W' s_f] (about [-1, 1]).

        Diffusion decoder: DDIM (eta = 0) over ``num_inference_steps`` steps from x_T = gamma * noise;
        with one step (the default) this is the denoiser's x0 prediction at t = (T - 1) / T. The
        "vae" decoder is a single deterministic pass.

        Args:
            z: latents.
            num_inference_steps: DDIM steps S.
            noise: standard normal [B, C, 1 + t_f k, H, W] (else drawn with :func:`initial_noise`).
            generator: for the noise when not given.
            chunk_latents: None = one pass; else latent 0 alone, then chunks of this many latent frames.
            clip: clamp each x0 prediction to [-1, 1] (off in the released decode path).
        """
        return torch.cat(
            list(
                self.iter_decode(
                    z,
                    num_inference_steps=num_inference_steps,
                    noise=noise,
                    generator=generator,
                    chunk_latents=chunk_latents,
                    clip=clip,
                )
            ),
            dim=2,
        )


# ------------------------------------------------------------------------------------------ media boundary


def default_chunk_sizes(height: int, width: int, *, time_factor: int = 4) -> tuple[int, int]:
    """(encode chunk frames, decode chunk latent frames) for H x W video, scaled by area (docs/algorithms.md 4.4).

    The released code encodes 4 frames and decodes 1 latent frame per chunk at 1024 x 1024 and
    scales both by (1024 / H)(1024 / W); encode chunks are rounded down to a multiple of the
    temporal factor (at least one multiple), decode chunks to at least 1.
    """
    ratio = (1024 / height) * (1024 / width)
    enc = max(time_factor, int(4 * ratio / time_factor) * time_factor)
    return enc, max(1, int(ratio))


def _to_model(video: Tensor, model: ConditionedDiffusionTokenizer) -> Tensor:
    """[B, T, 3, H, W] or [B, 3, H, W] in [0, 1] -> [B, 3, T, H, W] in [-1, 1]."""
    if video.ndim == 4:
        video = video[:, None]  # images are 1-frame videos
    if video.ndim != 5 or video.shape[2] != model.config.in_channels:
        raise VideoShapeError(
            f"media must be [B, T, 3, H, W] or [B, 3, H, W] in [0, 1], got {tuple(video.shape)}"
        )
    return (video.transpose(1, 2).to(model._weight) * 2 - 1).contiguous()


def encode_video(
    model: ConditionedDiffusionTokenizer, video: Tensor, *, chunk_frames: int | None = None
) -> Tensor:
    """Latents (posterior means) [B, C_z, 1 + k, H', W'] of media in [0, 1] ([B, T, 3, H, W] or images [B, 3, H, W])."""
    return model.encode(_to_model(video, model), chunk_frames=chunk_frames).mean


def decode_video(model: ConditionedDiffusionTokenizer, z: Tensor, **decode_kwargs) -> Tensor:
    """Decode latents to media [B, T, 3, H, W] in [0, 1] (clamped); keyword arguments as :meth:`decode`."""
    x = model.decode(z.to(model._weight.device), **decode_kwargs)  # [B, 3, T, H, W]
    return ((x.float() + 1) / 2).clamp(0, 1).transpose(1, 2).contiguous()
