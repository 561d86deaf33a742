"""ldmkit: a toolkit for latent diffusion models."""

__version__ = "0.1.0"


def load_pipeline(path, **options):  # noqa: ANN001, ANN003, ANN201 - documented in pipelines
    """Load a trained diffusion run or a Stable Diffusion checkpoint as a pipeline.

    See ``ldmkit.pipelines.load_pipeline``.
    """
    from ldmkit.pipelines.text2img import load_pipeline as _load

    return _load(path, **options)
