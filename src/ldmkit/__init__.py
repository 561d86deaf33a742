"""ldmkit: a toolkit for latent diffusion models."""

__version__ = "0.1.0"
