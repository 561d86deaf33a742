"""Config and shared behaviour of the perceptual autoencoders (KL and VQ)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ldmkit.autoencoders.blocks import Decoder, Encoder
from ldmkit.nn.layers import conv_nd


@dataclass
class AutoencoderConfig:
    """Architecture of an autoencoder; the latent scale/shift are filled in after training.

    The downsampling factor is ``f = 2 ** (len(channel_mult) - 1)``.
    """

    kind: Literal["kl", "vq"] = "kl"
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    latent_channels: int = 4
    mid_attention: bool = True
    norm_groups: int = 32
    dropout: float = 0.0
    dims: int = 2
    # VQ bottleneck (kind="vq")
    codebook_size: int = 1024
    commitment_beta: float = 0.25
    codebook_ema: bool = True
    restart_dead_codes: bool = True
    # Latent normalisation: diffusion sees (z - shift) * scale. Computed from data after training.
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    def validate(self) -> None:
        if not 1 <= len(self.channel_mult) <= 6:
            raise ValueError(f"channel_mult must have 1..6 levels, got {self.channel_mult}")
        if self.dims not in (1, 2, 3):
            raise ValueError(f"dims must be 1, 2 or 3, got {self.dims}")
        for name in ("in_channels", "out_channels", "base_channels", "latent_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be > 0, got {self.scaling_factor}")

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


class AutoencoderBase(nn.Module):
    """Encoder/decoder pair plus the 1x1 ``quant_conv``/``post_quant_conv`` of the LDM layout.

    Subclasses define the bottleneck: ``encode_moments`` -> latent, ``bottleneck`` for training.
    """

    def __init__(self, config: AutoencoderConfig, moment_channels: int):
        super().__init__()
        config.validate()
        self.config = config
        c = config
        common: dict[str, Any] = dict(
            ch=c.base_channels,
            ch_mult=tuple(c.channel_mult),
            num_res_blocks=c.num_res_blocks,
            dims=c.dims,
            groups=c.norm_groups,
            mid_attention=c.mid_attention,
            dropout=c.dropout,
        )
        self.encoder = Encoder(in_channels=c.in_channels, out_channels=moment_channels, **common)
        self.decoder = Decoder(z_channels=c.latent_channels, out_channels=c.out_channels, **common)
        self.quant_conv = conv_nd(c.dims, moment_channels, moment_channels, 1)
        self.post_quant_conv = conv_nd(c.dims, c.latent_channels, c.latent_channels, 1)

    # -- latent normalisation -------------------------------------------------------------
    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.config.scaling_factor + self.config.shift_factor

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's output weight (where the adaptive GAN weight is measured)."""
        return self.decoder.conv_out.weight

    @property
    def downsampling_factor(self) -> int:
        return self.config.downsampling_factor

    def check_input(self, x: torch.Tensor) -> None:
        """Clear errors for a wrong rank, channel count or a size the levels cannot divide."""
        c = self.config
        if x.dim() != c.dims + 2 or x.shape[1] != c.in_channels:
            raise ValueError(
                f"expected input [N, {c.in_channels}, {', '.join(['S'] * c.dims)}], got {tuple(x.shape)}"
            )
        f = self.downsampling_factor
        if any(s % f for s in x.shape[2:]):
            raise ValueError(f"spatial size {tuple(x.shape[2:])} must be a multiple of f={f}")

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction (posterior mode / quantized latent)."""
        return self.decode(self.encode(x, scaled=False), scaled=False)
