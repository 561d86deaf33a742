"""Build a network straight from a state dict: checked first, then filled without a second copy.

The module is created on the ``meta`` device (no memory, no random initialisation — which for
an 860M-parameter UNet would take longer than reading the file) and the checked tensors are
assigned to it as they are (``load_state_dict(assign=True)``), so the weights exist once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


class StateDictMismatch(ValueError):
    """Weights that do not fit the network built for them (keys and shapes named)."""


def names(keys: list[str], limit: int = 8) -> str:
    """Up to ``limit`` of ``keys``, comma-separated, with the count of the rest."""
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def shape_of(value: Any) -> tuple[int, ...]:
    """The shape of a tensor (or of anything with ``.shape``), or a shape given as a sequence."""
    return tuple(int(s) for s in (value.shape if hasattr(value, "shape") else value))


def check_state_dict(expected: Mapping[str, Any], given: Mapping[str, Any], what: str) -> None:
    """Raise :class:`StateDictMismatch` naming missing keys, unexpected keys and shape mismatches.

    Values are tensors, or anything with ``.shape``, or shapes. The error is raised before
    anything is built, so bad weights never leave a half-loaded network.
    """
    want = {k: shape_of(v) for k, v in expected.items()}
    have = {k: shape_of(v) for k, v in given.items()}
    missing = sorted(want.keys() - have.keys())
    unexpected = sorted(have.keys() - want.keys())
    wrong = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
    problems = []
    if missing:
        problems.append(f"missing keys: {names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {names(unexpected)}")
    if wrong:
        shown = [f"{k}: checkpoint {have[k]} vs model {want[k]}" for k in wrong]
        problems.append(f"shape mismatches: {names(shown, 4)}")
    if problems:
        raise StateDictMismatch(f"{what} weights do not fit: " + "; ".join(problems))


def build_from_state_dict(
    factory: Callable[[], M],
    state: Mapping[str, torch.Tensor],
    what: str,
) -> M:
    """``factory()`` built on the meta device, checked against ``state`` and filled from it.

    The tensors are used as they are (dtype included; cast the module afterwards). Anything the
    weights leave unset (e.g. a non-persistent buffer) is an error, never silently left
    uninitialised.
    """
    with torch.device("meta"):
        module = factory()
    check_state_dict(module.state_dict(), state, what)
    module.load_state_dict(state, strict=True, assign=True)
    unset = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if unset:
        raise StateDictMismatch(f"{what}: the weights leave {names(unset)} unset")
    return module.eval()
