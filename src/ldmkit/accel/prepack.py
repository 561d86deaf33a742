"""oneDNN weight pre-packing for CPU inference: convolutions and linear layers.

An eager ``F.conv2d`` / ``F.linear`` on CPU reorders its weight into oneDNN's blocked layout on
every call; ``torch.compile`` with freezing gets much of its CPU lead from doing that once.
``prepack(module)`` does it once in eager mode: each ``nn.Conv2d`` / ``nn.Linear`` becomes a
``PackedConv2d`` / ``PackedLinear`` that keeps its parameters (same names, same
``state_dict``), and caches the packed copy of its weight for the last input shape it saw. The
cache is rebuilt when the weight changes (its version counter, storage or dtype), so
``load_state_dict`` and ``.to()`` stay correct; with gradients enabled, or off CPU, the layers
run the ordinary path. The packed kernels are the ones inductor's freezing pass calls
(``mkldnn._convolution_pointwise`` / ``_linear_pointwise``, and MKL's packed GEMM for fp32
linear layers). They compute the same products; the summation order may differ from the
kernel PyTorch picks for the plain layer, so outputs match to rounding (on the SD 1.5 UNet at
256 px: bit-identical convolutions in bf16, 1.4e-5 max abs difference in fp32).

``GEGLU`` feed-forward layers become ``PackedGEGLU``: in bf16 on AMX CPUs the projection and
the gating run as one pass of ldmkit's AMX GEMM (``ldmkit.accel.amx_gemm``). That kernel also
takes the low-precision GEMMs of at most ``AMX_MAX_ROWS`` rows, which stream their weights.

Cost: the packed weights are a second copy of the conv/linear weights in memory.
``unpack(module)`` turns the layers back into plain ones and frees the copies.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.accel import amx_gemm, winograd
from ldmkit.nn.attention import GEGLU

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def available(dtype: torch.dtype) -> bool:
    """Whether this PyTorch build and CPU can run packed oneDNN kernels in ``dtype``."""
    if not torch.backends.mkldnn.is_available() or dtype not in _DTYPES:
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return True


def _usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()  # a compiled graph gets the plain ops
        and x.dtype == weight.dtype
        and available(x.dtype)
    )


class _PackCache:
    """The packed weight for one (weight version, storage, dtype, input shape) key. Copies and
    pickles of a module start with an empty cache (packed tensors are opaque and derived)."""

    __slots__ = ("key", "packed")

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.packed: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict) -> _PackCache:
        return _PackCache()

    def __reduce__(self) -> tuple:
        return (_PackCache, ())

    def get(self, weight: torch.Tensor, shape: tuple, pack) -> torch.Tensor:
        # (weights made under inference_mode have no version counter: storage and dtype only)
        version = None if weight.is_inference() else weight._version
        key = (version, weight.data_ptr(), weight.dtype, shape)
        if key != self.key:
            self.packed = None  # free the old copy before making the new one
            self.packed = pack()
            self.key = key
        return self.packed


# bf16 GEMMs of at most this many rows (SD 1.5's 4x4 level at 256 px, the time embedding) do
# little but stream their weights from memory; ldmkit's AMX GEMM requests them ahead of use
# (``csrc/gemm_amx.c``). In the SD 1.5 UNet at 256 px (bf16, batch 2, 2 threads) these layers
# ran 1.38-1.40x faster than on oneDNN's packed linear (``benchmarks/ab_fastpath.py --path
# skinny --size 256 --repeats 8 --layer-rows 32``, paired medians; 0.96x with the prefetch
# taken out). Up to 128 rows gained nothing more. 0 turns this off.
AMX_MAX_ROWS = 32


def _gemm(
    cache: _PackCache,
    a: torch.Tensor,
    weight: torch.Tensor,
    flat: Callable[[], torch.Tensor],
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``a [..., K] @ flat().T + bias`` for a low-precision ``a`` (``flat()`` the layer's weight
    as [out, K], detached): ldmkit's AMX GEMM for at most ``AMX_MAX_ROWS`` rows where it
    runs, oneDNN's packed linear otherwise."""
    rows = a.numel() // a.shape[-1]
    if rows <= AMX_MAX_ROWS and amx_gemm.supports(a, weight, bias):
        packed = cache.get(weight, ("amx",), lambda: amx_gemm.pack(flat()))
        return amx_gemm.linear(a, packed, weight.shape[0], bias)
    packed = cache.get(
        weight, ("gemm", rows), lambda: torch.ops.mkldnn._reorder_linear_weight(flat(), rows)
    )
    return torch.ops.mkldnn._linear_pointwise(a, packed, bias, "none", [], "")


class PackedConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose CPU inference runs on a cached oneDNN-packed weight."""

    # At or below this many output positions per image a convolution is a skinny GEMM that
    # oneDNN's convolution kernel runs poorly; low-precision ones then run as im2col + a packed
    # GEMM. SD 1.5's 1280-channel 3x3 convolutions, bf16, batch 2, 2 threads: 3.7 ms against
    # 6.2 ms at 4x4, 8.7 against 9.7 ms at 8x8, but 13.4 against 7.0 ms at 16x16 (640
    # channels); the whole UNet step at 256 px: 1.04-1.10x from 16 to 64. 0 turns this off.
    im2col_max_positions = 64
    # Low-precision 1x1 convolutions (stride 1, no padding) at any size run as one packed GEMM
    # over the NHWC pixels (a view of channels-last input): oneDNN's convolution kernel took
    # 0.98-1.19x the time of its linear kernel on the SD 1.5 UNet's 1x1 shapes (six of seven
    # slower; bf16, batch 2).
    gemm_pointwise = True
    # bf16 3x3 convolutions on ldmkit's AMX implicit GEMM (``amx_gemm.conv3x3``) where it
    # applies. Off by default: against oneDNN's convolution it ranged 0.77-1.48x over the SD 1.5
    # UNet's shapes, and the shapes it won changed with the host's load; the whole UNet with it
    # on took 1.034x (512 px) and 0.994x (256 px) of its time.
    amx = False

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        if self.padding_mode != "zeros" or isinstance(self.padding, str) or not _usable(x, weight):
            return super()._conv_forward(x, weight, bias)
        if self._as_gemm(x):
            return self._im2col_forward(x, weight, bias)
        if self.amx and amx_gemm.conv_applies(self, x):
            u = self._pack.get(weight, ("amx3x3",), lambda: amx_gemm.pack_conv3x3(weight))
            return amx_gemm.conv3x3(x, u, self.out_channels, bias)
        if winograd.worth_it(self, x):
            u = self._pack.get(weight, ("winograd",), lambda: winograd.transform_weight(weight))
            return winograd.conv3x3(x, u, bias)
        args = (list(self.padding), list(self.stride), list(self.dilation), self.groups)

        def pack() -> torch.Tensor:
            # oneDNN picks the blocked layout for this input shape (as inductor's freezing does)
            return torch.ops.mkldnn._reorder_convolution_weight(
                weight.detach(), *args, list(x.shape)
            )

        packed = self._pack.get(weight, tuple(x.shape), pack)
        return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, *args, "none", [], "")

    def _pointwise(self) -> bool:
        return self.kernel_size == (1, 1) and self.padding == (0, 0)

    def _as_gemm(self, x: torch.Tensor) -> bool:
        kh, kw = self.kernel_size
        ho = x.shape[-2] + 2 * self.padding[0] - kh + 1
        wo = x.shape[-1] + 2 * self.padding[1] - kw + 1
        return (
            x.dtype != torch.float32
            and self.groups == 1
            and self.stride == (1, 1)
            and self.dilation == (1, 1)
            and (ho * wo <= self.im2col_max_positions or self.gemm_pointwise and self._pointwise())
        )

    def _im2col_forward(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """The convolution as one GEMM: patches in (kh, kw, C) order on NHWC data, against the
        weight flattened in the same order."""
        (kh, kw), (ph, pw), b = self.kernel_size, self.padding, x.shape[0]
        if self._pointwise():  # the pixels themselves (a view of channels-last input)
            cols = x.permute(0, 2, 3, 1)
            ho, wo = x.shape[-2:]
        else:
            xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))  # [B, H+2ph, W+2pw, C]
            ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
            taps = [xp[:, i : i + ho, j : j + wo] for i in range(kh) for j in range(kw)]
            cols = torch.cat(taps, -1)

        def flat() -> torch.Tensor:
            return weight.detach().permute(0, 2, 3, 1).reshape(weight.shape[0], -1)

        out = _gemm(self._pack, cols.reshape(b * ho * wo, -1), weight, flat, bias)
        return out.view(b, ho, wo, -1).permute(0, 3, 1, 2)  # NCHW view of NHWC data


class PackedLinear(nn.Linear):
    """``nn.Linear`` whose CPU inference runs on a cached packed weight (oneDNN for bf16/fp16,
    ldmkit's AMX GEMM for bf16 with few rows, MKL's packed GEMM for fp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _usable(x, self.weight) or x.dim() < 2:
            return super().forward(x)
        weight, bias = self.weight, self.bias
        if x.dtype == torch.float32:
            if not torch._C.has_mkl:
                return super().forward(x)
            rows = x.numel() // x.shape[-1]
            packed = self._pack.get(
                weight, (rows,), lambda: torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
            )
            out = torch.ops.mkl._mkl_linear(x.reshape(rows, -1), packed, weight, bias, rows)
            return out.reshape(*x.shape[:-1], -1)
        return _gemm(self._pack, x, weight, weight.detach, bias)


class PackedGEGLU(GEGLU):
    """``GEGLU`` whose bf16 CPU inference is one pass of ldmkit's AMX GEMM with the gating
    fused (``amx_gemm.geglu``: the [tokens, 2 x inner] product is never written); elsewhere
    the plain ``GEGLU`` (its ``proj`` is then a ``PackedLinear``)."""

    # Below this many rows (tokens x batch) the product is a skinny GEMM that streams the
    # weight, and oneDNN's linear + gelu + mul was as fast or faster: SD 1.5's 1280 -> 2 x 5120
    # projection at 128 rows took 0.87-0.96x its time, at 512 rows 1.01-1.07x, at 2048 1.33x.
    min_rows = 256

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.proj.weight, self.proj.bias
        if x.numel() < self.min_rows * x.shape[-1] or not amx_gemm.supports(x, w, b):
            return super().forward(x)
        packed = self._pack.get(w, ("amx_geglu",), lambda: amx_gemm.pack(w, amx_gemm.GEGLU))
        return amx_gemm.geglu(x, packed, w.shape[0], b)


_SWAPS = {nn.Conv2d: PackedConv2d, nn.Linear: PackedLinear, GEGLU: PackedGEGLU}
_UNSWAPS = {v: k for k, v in _SWAPS.items()}


def prepack(module: nn.Module) -> nn.Module:
    """Make every ``nn.Conv2d`` / ``nn.Linear`` / ``GEGLU`` in ``module`` (in place, returned)
    pack its weight for CPU inference. Parameters, buffers, names and hooks are kept; nothing
    is copied until the first call without gradients."""
    for m in module.modules():
        packed_cls = _SWAPS.get(type(m))
        if packed_cls is not None:
            m.__class__ = packed_cls  # same parameters and state; only the forward differs
            m._pack = _PackCache()
    return module


def unpack(module: nn.Module) -> nn.Module:
    """Undo ``prepack``: plain layers again, packed copies freed."""
    for m in module.modules():
        plain_cls = _UNSWAPS.get(type(m))
        if plain_cls is not None:
            m.__class__ = plain_cls
            del m._pack
    return module


@contextmanager
def unpacked(module: nn.Module) -> Iterator[nn.Module]:
    """Plain layers inside the block (for tracers and exporters, which cannot see through the
    packed kernels), packed again after it."""
    swapped = [m for m in module.modules() if type(m) in _UNSWAPS]
    unpack(module)
    try:
        yield module
    finally:
        for m in swapped:
            m.__class__ = _SWAPS[type(m)]
            m._pack = _PackCache()
