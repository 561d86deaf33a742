"""ldmkit.diffusion."""
