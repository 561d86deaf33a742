"""Atomic file writing: write to a temporary file in the same folder, then rename.

``os.replace`` is atomic on POSIX and Windows, so a reader (or a process killed halfway)
sees either the old file or the new one, never a partial one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then move the finished file onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # flush to disk before the rename makes it visible
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; use the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_dir(
    path: str | Path, write: Callable[[Path], None], *, replace: bool = False
) -> Path:
    """Call ``write(tmp_dir)`` on a new temporary sibling folder, then rename it to ``path``.

    Unless ``replace``, ``path`` must not exist (a FileExistsError says so before anything is
    written); with it, an existing ``path`` is removed only once the new folder is complete.
    A failure removes the temporary folder, so ``path`` appears complete or not at all.
    """
    path = Path(path)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} exists; choose a new folder (nothing was written)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
        if path.exists():  # replace=True
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_text(text)

    atomic_write(path, write)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_tensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Save tensors as safetensors, atomically (tensors made contiguous, shared storage split)."""
    flat = {
        k: v.detach().contiguous().clone() if _shares(v) else v.detach().contiguous()
        for k, v in tensors.items()
    }
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def _shares(t: torch.Tensor) -> bool:
    # safetensors refuses views into larger storages; clone those.
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file (never unpickles)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return load_file(str(path), device=str(device))
