"""The training loop, written once for every task.

It owns: one optimizer per parameter group, LR warm-up/decay, EMA, gradient accumulation
and clipping, bf16 autocast, gradient checkpointing, a progress bar, TensorBoard and JSONL
scalars, periodic image grids, held-out evaluation, NaN/inf detection and atomic
checkpoints with exact resume (data order, RNG, optimizer and EMA state are all restored).
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from ldmkit.config import save_yaml
from ldmkit.training.checkpoint import (
    latest_checkpoint,
    load_training_state,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
)
from ldmkit.training.config import TrainConfig
from ldmkit.training.ema import EMA
from ldmkit.training.task import Task
from ldmkit.utils.io import atomic_write_json

log = logging.getLogger("ldmkit.training")

# Datasets longer than this (generated ones) are read in index order: their items are
# already random, and a permutation of 2^31 indices would not fit in memory.
_MAX_SHUFFLE = 1 << 24


class TrainingDiverged(RuntimeError):
    """A loss or gradient became NaN or infinite."""


class _BatchSampler(Sampler[list[int]]):
    """Batches of indices from batch number ``start`` on; epoch ``e`` uses permutation seed (seed, e).

    The order depends only on (seed, batch number), so a resumed run sees the same data.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int):
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self._perm: tuple[int, torch.Tensor] | None = None

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if self.n > _MAX_SHUFFLE:
            return offset
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return int(self._perm[1][offset])

    def __iter__(self) -> Iterator[list[int]]:
        b = self.start
        while True:
            first = b * self.batch_size
            yield [self._index(first + i) for i in range(self.batch_size)]
            b += 1


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names. Adam/AdamW use PyTorch's fused kernel (one pass over all
    parameters) where the parameters' device has one: PyTorch only defaults to its multi-tensor
    kernels on accelerators, so on CPU it would otherwise loop over the tensors in Python, about
    a tenth of a bf16 training step of the small SD-layout UNet here (``benchmarks/speed.py``).
    Same update rule; the results differ from the loop by rounding."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.betas[0], weight_decay=cfg.weight_decay
        )
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    kwargs = dict(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    try:
        return cls(params, **kwargs, fused=True)
    except RuntimeError:  # a device or dtype without the fused kernel
        return cls(params, **kwargs)


class Trainer:
    """Runs a :class:`Task` to ``cfg.steps`` optimizer steps in ``run_dir``, resuming if possible."""

    def __init__(
        self,
        task: Task,
        cfg: TrainConfig,
        run_dir: str | Path,
        train_data: Dataset,
        val_data: Dataset | None = None,
        *,
        val_batches: int = 4,
        progress: bool = True,
    ):
        if len(train_data) == 0:
            raise ValueError("the training dataset is empty")
        self.task, self.cfg, self.run_dir = task, cfg, Path(run_dir)
        self.train_data, self.val_data = train_data, val_data
        self.val_batches, self.progress = val_batches, progress
        self.groups = task.param_groups()
        self.optimizers = {name: make_optimizer(cfg, ps) for name, ps in self.groups.items()}
        self.ema = EMA(task.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.elapsed = 0.0  # seconds of training, summed over resumes
        self.metrics: dict[str, float] = {}
        self._stop_requested = False
        if cfg.gradient_checkpointing:
            for module in task.model.modules():
                if hasattr(module, "gradient_checkpointing"):
                    module.gradient_checkpointing = True

    # -- state ------------------------------------------------------------------------------
    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        for name, module in self.task.modules().items():
            tensors.update({f"module.{name}.{k}": v for k, v in module.state_dict().items()})
        plain: dict[str, Any] = {"step": self.step, "elapsed_seconds": self.elapsed, "optim": {}}
        for name, opt in self.optimizers.items():
            t, p = optimizer_to_flat(opt, f"optim.{name}")
            tensors.update(t)
            plain["optim"][name] = p
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        tensors["rng.generator"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        plain["metrics"] = self.metrics
        return tensors, plain

    def _load_state(self, tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
        for name, module in self.task.modules().items():
            prefix = f"module.{name}."
            module.load_state_dict(
                {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            )
        for name, opt in self.optimizers.items():
            optimizer_from_flat(opt, tensors, plain["optim"][name], f"optim.{name}")
        if self.ema is not None:
            self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        self.generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
        self.step, self.elapsed = int(plain["step"]), float(plain["elapsed_seconds"])
        self.metrics = dict(plain.get("metrics", {}))

    def _inference_weights(self) -> Any:
        return self.ema.swapped_in() if self.ema is not None else nullcontext(self.task.model)

    def save(self) -> Path:
        with self._inference_weights() as model:
            weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        tensors, plain = self._state()
        return save_checkpoint(
            self.run_dir,
            self.step,
            model_weights=weights,
            model_config=self.task.export_config(),
            state_tensors=tensors,
            state_json=plain,
            keep=self.cfg.keep_checkpoints,
        )

    def resume(self) -> bool:
        """Load the run's latest checkpoint if there is one; True if it did."""
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return False
        self._load_state(*load_training_state(ckpt))
        self.task.restore_export_config(json.loads((ckpt / "model.json").read_text()))
        log.info("resumed %s at step %d", ckpt, self.step)
        return True

    # -- pieces of a step -------------------------------------------------------------------
    def _loader(self) -> Iterator[dict[str, Any]]:
        sampler = _BatchSampler(
            len(self.train_data),
            self.cfg.batch_size,
            self.cfg.seed,
            self.step * self.cfg.grad_accum,
        )
        return iter(
            DataLoader(self.train_data, batch_sampler=sampler, num_workers=self.cfg.num_workers)
        )

    def _val_list(self) -> list[dict[str, Any]]:
        if self.val_data is None or len(self.val_data) == 0:
            return []
        loader = DataLoader(self.val_data, batch_size=self.cfg.batch_size, shuffle=False)
        return [b for b, _ in zip(loader, range(self.val_batches), strict=False)]

    def _check_finite(self, name: str, value: torch.Tensor) -> None:
        if not torch.isfinite(value).all():
            where = latest_checkpoint(self.run_dir)
            kept = (
                f"the last good checkpoint is {where}" if where else "no checkpoint was written yet"
            )
            raise TrainingDiverged(
                f"{name} became {value.item() if value.numel() == 1 else 'non-finite'} at step "
                f"{self.step}; training stopped and {kept}. Lower train.lr, raise train.warmup_steps "
                "or set train.grad_clip, then resume from that checkpoint."
            )

    def _train_step(self, batches: Iterator[dict[str, Any]]) -> dict[str, float]:
        cfg = self.cfg
        lr = cfg.lr_at(self.step)
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = lr
        logs: dict[str, float] = {}
        autocast = torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"
        )
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            with autocast:
                out = self.task.training_step(batch, self.step, self.generator)
            objectives = [name for name in self.groups if name in out]
            for name, value in out.items():
                self._check_finite(f"loss '{name}'", value.detach().float())
                logs[name] = logs.get(name, 0.0) + value.detach().float().item() / cfg.grad_accum
            for i, name in enumerate(objectives):
                retain = i < len(objectives) - 1  # objectives may share one graph
                (out[name] / cfg.grad_accum).backward(inputs=self.groups[name], retain_graph=retain)
        for name, opt in self.optimizers.items():
            if cfg.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(self.groups[name], cfg.grad_clip)
                self._check_finite(f"gradient norm of '{name}'", norm)
                logs[f"grad_norm/{name}"] = float(norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.ema.decay_at(self.step))
        logs["lr"] = lr
        return logs

    def _write_grid(self, batch: dict[str, Any]) -> None:
        from ldmkit.data.transforms import make_grid

        with self._inference_weights():
            self.task.model.eval()
            out = self.task.preview(batch)
            self.task.model.train()
        if out is not None:
            images, nrow = out
            path = self.run_dir / "samples" / f"step_{self.step:08d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            make_grid(images.float().clamp(-1, 1), nrow=nrow).save(path)

    def evaluate(self, val: list[dict[str, Any]]) -> dict[str, float]:
        if not val:
            return {}
        with self._inference_weights():
            self.task.model.eval()
            metrics = self.task.evaluate(val)
            self.task.model.train()
        return metrics

    def request_stop(self, *_: object) -> None:
        """Finish the current step, checkpoint and return (the first Ctrl-C does this)."""
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True
        log.warning(
            "stop requested: finishing this step and saving a checkpoint (Ctrl-C again to abort)"
        )

    def _clear_previous_run(self) -> None:
        """Starting afresh: remove an earlier run's checkpoints, samples and logs in run_dir."""
        old = [self.run_dir / d for d in ("checkpoints", "samples", "logs")]
        old = [d for d in old if d.exists()]
        if old:
            log.warning("restart: removing %s", ", ".join(str(d) for d in old))
            for d in old:
                shutil.rmtree(d)

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, *, resume: bool = True, stop_at: int | None = None) -> dict[str, float]:
        """Train to ``cfg.steps`` (or pause after ``stop_at``), checkpointing on the way.

        ``resume=False`` starts from scratch and removes the run folder's earlier checkpoints,
        samples and logs.

        Returns the last held-out metrics. A paused or interrupted run continues exactly
        where it stopped when ``fit`` is called again on the same run folder.
        """
        cfg = self.cfg
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.resume()
        else:
            self._clear_previous_run()
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        val = self._val_list()
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(self.run_dir / "logs"), purge_step=self.step)
        jsonl = (self.run_dir / "logs" / "scalars.jsonl").open("a")
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self.request_stop) if main_thread else None
        self.task.model.train()
        batches = self._loader()
        bar = tqdm(
            total=end,
            initial=self.step,
            desc="train",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        try:
            while self.step < end and not self._stop_requested:
                started = time.perf_counter()
                logs = self._train_step(batches)
                self.step += 1
                self.elapsed += time.perf_counter() - started
                if self.step % cfg.log_every == 0 or self.step == end:
                    for k, v in logs.items():
                        writer.add_scalar(f"train/{k}", v, self.step)
                    jsonl.write(json.dumps({"step": self.step, **logs}) + "\n")
                    jsonl.flush()
                    main = {k: f"{v:.4g}" for k, v in logs.items() if k in self.groups}
                    bar.set_postfix(main, refresh=False)
                bar.update(1)
                finished = self.step == cfg.steps
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or finished:
                    self.metrics = self.evaluate(val)
                    for k, v in self.metrics.items():
                        writer.add_scalar(f"val/{k}", v, self.step)
                    jsonl.write(
                        json.dumps(
                            {"step": self.step, **{f"val/{k}": v for k, v in self.metrics.items()}}
                        )
                        + "\n"
                    )
                if val and ((cfg.sample_every and self.step % cfg.sample_every == 0) or finished):
                    self._write_grid(val[0])
                if finished:
                    with self._inference_weights():
                        self.task.model.eval()
                        self.task.on_train_end(val)
                        self.task.model.train()
                if self.step % cfg.checkpoint_every == 0 or finished or self.step == end:
                    self.save()
            if self._stop_requested and self.step < end:
                self.save()
                log.warning("stopped at step %d; run the same command again to resume", self.step)
        finally:
            if main_thread:
                signal.signal(signal.SIGINT, previous)
            bar.close()
            writer.close()
            jsonl.close()
        return self.metrics


def run_training(
    task: Task,
    recipe: Any,
    train_data: Dataset,
    val_data: Dataset | None,
    *,
    val_batches: int,
    resume: bool = True,
    stop_at: int | None = None,
    progress: bool = True,
    summary: Callable[[Trainer], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The part every ``train_*`` entry point shares: save the resolved recipe, train, and
    write RUN/metrics.json (step, training time, parameters, ``summary()`` extras, val_*)."""
    run_dir = Path(recipe.run_dir).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(recipe, run_dir / "config.yaml")
    trainer = Trainer(
        task,
        recipe.train,
        run_dir,
        train_data,
        val_data,
        val_batches=val_batches,
        progress=progress,
    )
    metrics = trainer.fit(resume=resume, stop_at=stop_at)
    result = {
        "step": trainer.step,
        "train_seconds": round(trainer.elapsed, 1),
        "parameters": sum(p.numel() for p in task.model.parameters()),
        **(summary(trainer) if summary is not None else {}),
        **{f"val_{k}": v for k, v in metrics.items()},
    }
    atomic_write_json(run_dir / "metrics.json", result)
    return result
