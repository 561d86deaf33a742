"""Shared fixtures: tiny recipes that train in seconds on a CPU."""

from __future__ import annotations

import pytest

from ldmkit.autoencoders.task import AutoencoderRecipe
from ldmkit.config import from_dict

TINY_AE = {
    "model": {
        "base_channels": 8,
        "channel_mult": [1, 2],
        "num_res_blocks": 1,
        "latent_channels": 2,
        "norm_groups": 4,
    },
    "loss": {"disc_start": 2, "disc_channels": 8, "disc_layers": 2},
    "data": {"name": "shapes", "image_size": 16, "val_size": 8},
    "train": {
        "steps": 6,
        "batch_size": 4,
        "lr": 1e-3,
        "ema_decay": 0.9,
        "checkpoint_every": 2,
        "sample_every": 3,
        "eval_every": 3,
        "keep_checkpoints": 2,
    },
}


def tiny_recipe(run_dir, **sections) -> AutoencoderRecipe:
    """The tiny recipe with ``section={key: value}`` updates."""
    data = {k: dict(v) for k, v in TINY_AE.items()}
    for name, updates in sections.items():
        data[name].update(updates)
    return from_dict(AutoencoderRecipe, {"run_dir": str(run_dir), **data})


@pytest.fixture
def make_recipe():
    """Factory: ``make_recipe(run_dir, train={...})`` -> a tiny AutoencoderRecipe."""
    return tiny_recipe


@pytest.fixture
def recipe(tmp_path) -> AutoencoderRecipe:
    return tiny_recipe(tmp_path / "run")
