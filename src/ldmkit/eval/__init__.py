"""ldmkit.eval."""
