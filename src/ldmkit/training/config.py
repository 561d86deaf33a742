"""Settings of the training loop (shared by every task)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings; every task's recipe has a ``train:`` section."""

    steps: int = 1000  # optimizer steps in total
    batch_size: int = 32  # per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up from 0
    lr_decay: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.0  # final lr / lr for cosine and linear decay
    grad_clip: float = 1.0  # max global grad norm per optimizer; 0 disables
    ema_decay: float = 0.0  # 0 disables EMA; e.g. 0.999
    mixed_precision: Literal["no", "bf16"] = "no"  # bf16 autocast (weights stay fp32)
    gradient_checkpointing: bool = False
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    sample_every: int = 500  # image grid in RUN/samples; 0: only at the end
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    num_workers: int = 0  # DataLoader workers
    threads: int = 0  # torch intra-op threads; 0 keeps the default

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.checkpoint_every < 1:
            raise ValueError("checkpoint_every must be >= 1")

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based): warm-up, then the chosen decay."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_decay == "constant":
            return self.lr
        span = max(1, self.steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        factor = 0.5 * (1.0 + math.cos(math.pi * t)) if self.lr_decay == "cosine" else 1.0 - t
        return self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * factor)
