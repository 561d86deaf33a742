"""The task interface: what a training job must tell the loop (the loop is written once).

A task owns its networks and losses. The loop owns optimisation and bookkeeping.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Task:
    """Base class of training tasks (``AutoencoderTask``, later ``DiffusionTask`` ...).

    ``training_step`` returns a dict of scalar tensors. Keys that name an entry of
    ``param_groups()`` are objectives: the loop back-propagates each one into its own group
    only (``backward(inputs=...)``) and steps that group's optimizer. Every other key is
    logged. All randomness must come from the ``generator`` argument so resume is exact.
    """

    #: The network that is exported for inference (EMA applies to it).
    model: nn.Module

    def modules(self) -> dict[str, nn.Module]:
        """Every module whose state is trained and checkpointed, by name."""
        return {"model": self.model}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by optimizer name (one optimizer each)."""
        return {"model": [p for p in self.model.parameters() if p.requires_grad]}

    def training_step(
        self, batch: dict[str, Any], step: int, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, batches: list[dict[str, Any]]) -> dict[str, float]:
        """Held-out metrics; called with the inference (EMA) weights in ``self.model``."""
        return {}

    @torch.no_grad()
    def preview(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int] | None:
        """Images in [-1, 1] for the periodic grid and the grid's row length, or None."""
        return None

    def export_config(self) -> dict[str, Any]:
        """The inference model's config, stored as JSON beside its weights."""
        return {}

    def restore_export_config(self, config: dict[str, Any]) -> None:
        """Take back what ``export_config`` saved (called when a run is resumed)."""

    def on_train_end(self, batches: list[dict[str, Any]]) -> None:
        """Called once with the inference weights loaded, before the final checkpoint."""
