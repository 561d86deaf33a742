"""ldmkit.conditioning."""
