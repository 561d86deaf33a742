"""VQAutoencoder: the vector-quantized first stage (VQGAN, Esser et al. 2021; LDM Sec. 3.1).

As in LDM, the diffusion model works on the *pre-quantization* latent: ``encode`` returns it,
and ``decode`` quantizes first (the quantizer is "absorbed into the decoder").
"""

from __future__ import annotations

import torch

from ldmkit.autoencoders.base import AutoencoderBase, AutoencoderConfig
from ldmkit.autoencoders.quantize import VectorQuantizer


class VQAutoencoder(AutoencoderBase):
    """Images <-> latents through a learned codebook of ``codebook_size`` vectors."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__(config, moment_channels=config.latent_channels)
        self.quantize = VectorQuantizer(
            config.codebook_size,
            config.latent_channels,
            beta=config.commitment_beta,
            ema=config.codebook_ema,
            restart_dead_codes=config.restart_dead_codes,
        )

    def encode(self, x: torch.Tensor, *, scaled: bool = True, **_: object) -> torch.Tensor:
        """Pre-quantization latent; scaled for diffusion unless ``scaled=False``."""
        self.check_input(x)
        h = self.quant_conv(self.encoder(x))
        return self.scale_latents(h) if scaled else h

    def decode(
        self, z: torch.Tensor, *, scaled: bool = True, quantize: bool = True
    ) -> torch.Tensor:
        """Image from a latent; the latent is snapped to the codebook first unless ``quantize=False``."""
        if scaled:
            z = self.unscale_latents(z)
        if quantize:
            z = self.quantize(z)[0]
        return self.decoder(self.post_quant_conv(z))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Image from codebook indices [N, *S]."""
        return self.decoder(self.post_quant_conv(self.quantize.lookup(indices)))

    def forward(
        self, x: torch.Tensor, *, generator: torch.Generator | None = None, sample: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Training pass: (reconstruction, codebook + commitment loss, usage logs)."""
        h = self.encode(x, scaled=False)
        z_q, vq_loss, info = self.quantize(h, generator=generator)
        recon = self.decoder(self.post_quant_conv(z_q))
        logs = {"perplexity": info["perplexity"], "usage": info["usage"]}
        return recon, vq_loss, logs
