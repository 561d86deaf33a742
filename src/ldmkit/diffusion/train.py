"""Entry point behind ``ldmkit train diffusion``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ldmkit.config import load_config
from ldmkit.diffusion.task import DiffusionRecipe, DiffusionTask, prepare_run
from ldmkit.training.loop import run_training

log = logging.getLogger("ldmkit")


def train_diffusion(
    config: str | Path | DiffusionRecipe,
    overrides: list[str] | None = None,
    *,
    resume: bool = True,
    stop_at: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or resume) a latent diffusion model; returns the final metrics.

    Writes RUN/config.yaml, RUN/autoencoder/ (a copy of the first stage), RUN/latents/
    (the cached posteriors), checkpoints, samples, logs and RUN/metrics.json.
    """
    recipe = (
        config
        if isinstance(config, DiffusionRecipe)
        else load_config(DiffusionRecipe, config, overrides)
    )
    autoencoder, train, val = prepare_run(recipe, progress=progress)  # errors surface here
    torch.manual_seed(recipe.train.seed)  # the initial weights depend on the seed only
    task = DiffusionTask(recipe, autoencoder, train)
    log.info(
        "training %s %s diffusion model (%.2fM parameters) on %d latents of shape %s -> %s",
        recipe.model.network,
        recipe.model.parameterization,
        sum(p.numel() for p in task.model.parameters()) / 1e6,
        len(train),
        tuple(train.mean.shape[1:]),
        recipe.run_dir,
    )
    return run_training(
        task, recipe, train, val, val_batches=4, resume=resume, stop_at=stop_at, progress=progress
    )
