"""ldmkit.denoisers."""
