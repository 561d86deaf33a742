"""Build a network straight from a state dict: checked first, then filled without a second copy.

The module is created on the ``meta`` device (no memory, no random initialisation — which for
an 860M-parameter UNet would take longer than reading the file) and the checked tensors are
assigned to it as they are (``load_state_dict(assign=True)``), so the weights exist once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


class StateDictMismatch(ValueError):
    """Weights that do not fit the network built for them (keys and shapes named)."""


def _names(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], what: str
) -> None:
    """Raise :class:`StateDictMismatch` naming missing keys, unexpected keys and shape mismatches."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(given))
        if tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys: {_names(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches: {_names(wrong, 4)}")
    if problems:
        raise StateDictMismatch(f"{what} weights do not fit: " + "; ".join(problems))


def build_from_state_dict(
    factory: Callable[[], M],
    state: Mapping[str, torch.Tensor],
    what: str,
    dtype: torch.dtype | None = None,
) -> M:
    """``factory()`` built on the meta device, checked against ``state`` and filled from it.

    Floating tensors are cast to ``dtype`` when given (read the file in the right dtype instead
    to keep one copy). Anything the weights leave unset (e.g. a non-persistent buffer) is an
    error, never silently left uninitialised.
    """
    with torch.device("meta"):
        module = factory()
    check_state_dict(module.state_dict(), state, what)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    unset = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if unset:
        raise StateDictMismatch(f"{what}: the weights leave {_names(unset)} unset")
    return module.eval()
