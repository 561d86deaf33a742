"""ldmkit.autoencoders."""
