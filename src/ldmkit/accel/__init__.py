"""Training-free acceleration: wrappers that make an unmodified network cheaper to run."""
