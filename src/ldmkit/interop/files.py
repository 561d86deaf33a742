"""Reading and writing checkpoint files: safetensors (checked before use) and, on request, pickles.

Nothing here unpickles unless the caller passes ``allow_pickle=True``; even then
``torch.load(weights_only=True)`` is used, which refuses arbitrary objects. A safetensors file is
checked against its own header first, so a truncated download gets a clear error instead of a
crash halfway through loading. Tensors are read one at a time and cast on the fly, so loading
an fp16 file as fp32 holds one fp32 copy plus a single fp16 tensor, never two full copies.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ldmkit.utils.io import save_tensors

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# safetensors dtype name -> bytes per element (to check a header against the file size)
_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
    "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


_TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class CheckpointFormatError(ValueError):
    """A checkpoint file or folder that cannot be read as asked (the message says why)."""


def safetensors_header(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """``({name: {"dtype", "shape", "data_offsets"}}, metadata)`` of a safetensors file.

    Raises :class:`CheckpointFormatError` for a file that is not safetensors or is shorter than
    its header says (a truncated copy or download).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointFormatError(f"{path}: {size} bytes is too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointFormatError(
                f"{path}: not a safetensors file, or truncated (header of {n} bytes, file {size})"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointFormatError(f"{path}: unreadable safetensors header ({err})") from err
    metadata = header.pop("__metadata__", None) or {}
    end = 0
    for name, info in header.items():
        start, stop = info["data_offsets"]
        numel = 1
        for s in info["shape"]:
            numel *= s
        if (
            stop - start != numel * _DTYPE_BYTES.get(info["dtype"], 0)
            and info["dtype"] in _DTYPE_BYTES
        ):
            raise CheckpointFormatError(f"{path}: tensor {name!r} has inconsistent offsets")
        end = max(end, stop)
    if 8 + n + end > size:
        raise CheckpointFormatError(
            f"{path} is truncated: its header describes {8 + n + end:,} bytes but the file has "
            f"{size:,} (an interrupted download or copy?)"
        )
    return header, metadata


def read_safetensors(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    keys: Iterable[str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a checked safetensors file, floats cast to ``dtype`` one by one."""
    header, metadata = safetensors_header(path)
    wanted = list(header) if keys is None else list(keys)
    unknown = [k for k in wanted if k not in header]
    if unknown:
        raise KeyError(f"{path}: no tensors named {unknown[:5]}")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        base = 8 + n
        out: dict[str, torch.Tensor] = {}
        for name in wanted:
            info = header[name]
            dt = _TORCH_DTYPES.get(info["dtype"])
            if dt is None:
                raise CheckpointFormatError(f"{path}: tensor {name!r} has dtype {info['dtype']}")
            start, stop = info["data_offsets"]
            # read straight into the tensor's memory: no mmap, no intermediate bytes object
            t = torch.empty(info["shape"], dtype=dt)
            f.seek(base + start)
            if (
                stop > start
                and f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != stop - start
            ):
                raise CheckpointFormatError(f"{path}: tensor {name!r} is cut short")
            out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out, metadata


def read_pickle(
    path: str | Path, *, allow_pickle: bool, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors of a ``.ckpt``/``.pt``/``.bin`` file, only with ``allow_pickle=True``.

    Loaded with ``torch.load(weights_only=True)`` (plain tensors and containers only). A
    Lightning-style ``{"state_dict": {...}}`` wrapper is unwrapped; scalar entries such as
    ``global_step`` are returned as metadata strings.
    """
    path = Path(path)
    if not allow_pickle:
        raise CheckpointFormatError(
            f"{path} is a pickle file ({path.suffix}); loading it can run arbitrary code, so it "
            "is refused by default. Pass allow_pickle=True (CLI: --allow-pickle) if you trust "
            "it, or convert it once to .safetensors."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointFormatError(
            f"{path}: cannot be read as a weights-only pickle: {err}"
        ) from err
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{path} holds a {type(obj).__name__}, not a state dict")
    metadata = {
        k: str(v) for k, v in obj.items() if isinstance(v, int | float | str) and k != "state_dict"
    }
    state = obj.get("state_dict", obj)
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    return out, metadata


def read_weights(
    path: str | Path, *, allow_pickle: bool = False, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of one weights file, by its suffix (safetensors or pickle)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix in SAFETENSORS_SUFFIXES:
        return read_safetensors(path, dtype=dtype)
    if path.suffix in PICKLE_SUFFIXES:
        return read_pickle(path, allow_pickle=allow_pickle, dtype=dtype)
    raise CheckpointFormatError(
        f"{path}: unknown weights format {path.suffix!r}; expected "
        f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}"
    )


def read_sharded(
    folder: Path, stem: str, *, allow_pickle: bool = False, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The weights of a diffusers/transformers component folder.

    Looks for ``{stem}.safetensors``, a sharded ``{stem}.safetensors.index.json`` and, only with
    ``allow_pickle``, ``{stem}.bin`` (``stem`` is ``diffusion_pytorch_model`` or ``model``).
    """
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return read_safetensors(single, dtype=dtype)[0]
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            out.update(read_safetensors(folder / shard, dtype=dtype)[0])
        return out
    pickled = folder / f"{stem}.bin"
    if pickled.is_file():
        return read_pickle(pickled, allow_pickle=allow_pickle, dtype=dtype)[0]
    raise CheckpointFormatError(
        f"{folder}: no weights ({stem}.safetensors, {stem}.safetensors.index.json or {stem}.bin)"
    )


def write_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write tensors atomically (temporary file, then rename)."""
    save_tensors(tensors, path, metadata)
