"""GroupNorm (and the SiLU after it) for bf16 channels-last CPU inference, in C.

PyTorch 2.13's channels-last bf16 GroupNorm has slow shapes: [2, 128, 16, 16] took 0.3-0.4 ms
against 0.04 ms for the same tensor in NCHW, and it was 12% of the small UNet's bf16 step
(converting the layout around it cost more than it saved). ``csrc/group_norm.c`` runs it in
three passes over the NHWC data (group means, centred variances, then normalise + affine +
optional SiLU), statistics in fp32.

``fuse(module)`` (called by ``fastpaths.prepare_for_inference`` for bf16 on CPU) turns every
``nn.GroupNorm`` into a ``NativeGroupNorm`` (same parameters and ``state_dict``) and, where an
``nn.Sequential`` has GroupNorm then ``nn.SiLU`` (the UNet's ResBlocks and output head), moves
the SiLU into the norm and makes the ``nn.SiLU`` an identity. The module computes the same
function on every path: with gradients, under ``torch.compile``/tracing, or on other dtypes
and layouts it runs ``F.group_norm`` (then ``F.silu`` when fused). ``unfuse`` restores the
plain modules.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.accel import native

_FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp")
_CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = native.load_for_cpu("group_norm", _FLAGS, _CPU_FLAGS)
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.ldm_group_norm_nhwc_bf16.argtypes = [
        ptr, ptr, i64, i64, i64, i64, ptr, ptr, ctypes.c_float, ctypes.c_int, ctypes.c_int,
    ]  # fmt: skip
    lib.ldm_group_norm_nhwc_bf16.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether the kernel runs here (x86-64 with AVX-512 BF16, a C compiler, ``LDMKIT_NATIVE``
    not 0)."""
    return _library() is not None


def supports(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """bf16 [N, C, H, W] channels-last CPU tensor, no autograd through it or ``params``, not
    compiling or tracing."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and not native.needs_grad(x, *params)
        and not native.tracing()
        and available()
    )


def group_norm(
    x: torch.Tensor,
    groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool = False,
) -> torch.Tensor:
    """``F.group_norm`` (then ``F.silu`` if ``silu``) of a tensor ``supports`` accepts;
    returns a channels-last bf16 tensor."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the GroupNorm kernel is not available on this machine")
    n, c, h, w = x.shape
    y = torch.empty_like(x, memory_format=torch.channels_last)
    gamma = None if weight is None else weight.detach().float().contiguous()
    beta = None if bias is None else bias.detach().float().contiguous()
    rc = lib.ldm_group_norm_nhwc_bf16(
        x.data_ptr(), y.data_ptr(), n, h * w, c, groups,
        None if gamma is None else gamma.data_ptr(), None if beta is None else beta.data_ptr(),
        eps, int(silu), torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("GroupNorm kernel: out of memory")
    return y


class NativeGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (then SiLU when ``fused_silu``) through the C kernel when it applies."""

    fused_silu = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if supports(x, self.weight, self.bias):
            return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.fused_silu)
        y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.silu(y) if self.fused_silu else y


class FusedSiLU(nn.SiLU):
    """An ``nn.SiLU`` whose work the ``NativeGroupNorm`` before it does: the identity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fuse(module: nn.Module) -> nn.Module:
    """GroupNorms to ``NativeGroupNorm``s, GroupNorm -> SiLU pairs in ``nn.Sequential``s fused
    (in place; returned). No-op where the kernel is unavailable."""
    if not available():
        return module
    for m in module.modules():
        if type(m) is nn.GroupNorm:
            m.__class__ = NativeGroupNorm
    for seq in module.modules():
        if isinstance(seq, nn.Sequential):
            layers = list(seq)
            for norm, act in zip(layers, layers[1:], strict=False):
                if type(norm) is NativeGroupNorm and type(act) is nn.SiLU:
                    norm.fused_silu = True
                    act.__class__ = FusedSiLU
    return module


def unfuse(module: nn.Module) -> nn.Module:
    """Undo ``fuse``: plain ``nn.GroupNorm`` and ``nn.SiLU`` modules again."""
    for m in module.modules():
        if type(m) is NativeGroupNorm:
            m.__dict__.pop("fused_silu", None)
            m.__class__ = nn.GroupNorm
        elif type(m) is FusedSiLU:
            m.__class__ = nn.SiLU
    return module
