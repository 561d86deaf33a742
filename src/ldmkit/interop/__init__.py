"""Interoperability: Stable Diffusion single-file checkpoints, diffusers folders, CLIP."""
