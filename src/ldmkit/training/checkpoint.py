"""Atomic checkpoints: safetensors for tensors, JSON for everything else.

Layout of a run folder::

    RUN/checkpoints/step_00001000/model.safetensors  inference weights (EMA when enabled)
                                 /model.json         the model's config (e.g. latent scale)
                                 /state.safetensors  raw weights, optimizer moments, EMA, RNG
                                 /state.json         step, optimizer hyper-parameters, timers
    RUN/checkpoints/latest                           name of the newest complete checkpoint

A checkpoint folder is written under a temporary name and renamed when complete, then
``latest`` is replaced atomically, so a process killed at any moment leaves ``latest``
naming a complete checkpoint (the old one or the new one). Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from ldmkit.utils.io import (
    atomic_write_dir,
    atomic_write_json,
    atomic_write_text,
    load_tensors,
    save_tensors,
)

CHECKPOINTS = "checkpoints"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A run folder without a usable checkpoint."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model_weights: dict[str, torch.Tensor],
    model_config: dict[str, Any],
    state_tensors: dict[str, torch.Tensor],
    state_json: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write a complete checkpoint for ``step`` and point ``latest`` at it."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)

    def write(tmp: Path) -> None:
        save_tensors(model_weights, tmp / "model.safetensors")
        atomic_write_json(tmp / "model.json", model_config)
        save_tensors(state_tensors, tmp / "state.safetensors")
        atomic_write_json(tmp / "state.json", state_json)

    # replace: the same step may be saved again after a resume
    atomic_write_dir(final, write, replace=True)
    atomic_write_text(root / LATEST, final.name + "\n")
    _prune(root, keep=keep, protect=final.name)
    return final


def _prune(root: Path, *, keep: int, protect: str) -> None:
    """Remove all but the newest ``keep`` checkpoints and any leftover temporary folders."""
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in done[:-keep]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".step_*"):
        shutil.rmtree(leftover, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None if it has none yet."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run folder or a checkpoint folder; return the checkpoint folder."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"no such run or checkpoint: {path}")
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path} holds no checkpoint yet (expected {path / CHECKPOINTS})")
    return found


def load_model_files(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inference weights and model config of a run or checkpoint folder."""
    ckpt = resolve_checkpoint(path)
    config = json.loads((ckpt / "model.json").read_text())
    return load_tensors(ckpt / "model.safetensors"), config


def load_training_state(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return load_tensors(ckpt / "state.safetensors"), json.loads((ckpt / "state.json").read_text())


# -- optimizer state <-> (tensors, json) ------------------------------------------------------
def optimizer_to_flat(
    opt: torch.optim.Optimizer, prefix: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``opt.state_dict()`` into safetensors-ready tensors and JSON-ready values."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for idx, entry in sd["state"].items():
        plain["state"][str(idx)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{idx}.{key}"] = value
            else:
                plain["state"][str(idx)][key] = value
    return tensors, plain


def optimizer_from_flat(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], plain: dict[str, Any], prefix: str
) -> None:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in plain["state"].items()}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            idx, key = name[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(idx), {})[key] = value
    # The kernel choice is this machine's, not the checkpoint's (a run may resume elsewhere);
    # a group-count mismatch is left to load_state_dict, which names it.
    groups = plain["param_groups"]
    if len(groups) == len(opt.param_groups):
        impl = ("fused", "foreach", "capturable", "differentiable")
        groups = [
            {**saved, **{k: live[k] for k in impl if k in live}}
            for saved, live in zip(groups, opt.param_groups, strict=True)
        ]
    opt.load_state_dict({"state": state, "param_groups": groups})
