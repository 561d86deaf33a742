"""Entry point behind ``ldmkit train diffusion``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ldmkit.config import load_config, save_yaml
from ldmkit.diffusion.task import DiffusionRecipe, DiffusionTask, prepare_run
from ldmkit.training.loop import Trainer
from ldmkit.utils.io import atomic_write_json

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
    run_dir = Path(recipe.run_dir).expanduser()
    autoencoder, train, val = prepare_run(
        recipe, progress=progress
    )  # data and autoencoder errors surface here
    torch.manual_seed(recipe.train.seed)  # the initial weights depend on the seed only
    task = DiffusionTask(recipe, autoencoder, train)
    save_yaml(recipe, run_dir / "config.yaml")
    n_params = sum(p.numel() for p in task.model.parameters())
    log.info(
        "training %s %s diffusion model (%.2fM parameters) on %d latents of shape %s -> %s",
        recipe.model.network,
        recipe.model.parameterization,
        n_params / 1e6,
        len(train),
        tuple(train.mean.shape[1:]),
        run_dir,
    )
    trainer = Trainer(task, recipe.train, run_dir, train, val, val_batches=4, progress=progress)
    metrics = trainer.fit(resume=resume, stop_at=stop_at)
    summary = {
        "step": trainer.step,
        "train_seconds": round(trainer.elapsed, 1),
        "parameters": n_params,
        **{f"val_{k}": v for k, v in metrics.items()},
    }
    atomic_write_json(run_dir / "metrics.json", summary)
    return summary
