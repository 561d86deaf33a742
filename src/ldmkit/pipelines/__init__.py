"""Pipelines: trained models wired for use (``load_pipeline``)."""

from ldmkit.pipelines.text2img import LatentDiffusionPipeline, load_pipeline

__all__ = ["LatentDiffusionPipeline", "load_pipeline"]
