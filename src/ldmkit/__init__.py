"""ldmkit: a toolkit for latent diffusion models."""

__version__ = "0.1.0"


def load_pipeline(path):  # noqa: ANN001, ANN201 - re-exported, documented in ldmkit.pipelines
    """Load a trained diffusion run as a pipeline (see ``ldmkit.pipelines.load_pipeline``)."""
    from ldmkit.pipelines.text2img import load_pipeline as _load

    return _load(path)
