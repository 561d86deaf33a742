"""Exponential moving average of a module's parameters (Polyak averaging)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    """Keeps ``shadow = decay * shadow + (1 - decay) * param`` for every floating parameter.

    Buffers (e.g. codebook statistics) are copied, not averaged.
    """

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.module = module
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def decay_at(self, step: int) -> float:
        """Warm-up: ``min(decay, (1 + step) / (10 + step))``, so the random initial weights
        do not linger in the average (with decay 0.999 they would still weigh 37% after
        1000 steps)."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        d = self.decay if decay is None else decay
        params = dict(self.module.named_parameters())
        for key, value in self.module.state_dict().items():
            if key in params and value.is_floating_point():
                self.shadow[key].lerp_(value.detach().to(self.shadow[key].dtype), 1.0 - d)
            else:
                self.shadow[key].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}")
        for key in self.shadow:
            self.shadow[key].copy_(state[key])

    @contextmanager
    def swapped_in(self) -> Iterator[nn.Module]:
        """Temporarily load the averaged weights into the module (restored on exit)."""
        backup = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        self.module.load_state_dict(self.shadow)
        try:
            yield self.module
        finally:
            self.module.load_state_dict(backup)
