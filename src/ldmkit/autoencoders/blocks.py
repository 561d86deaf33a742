"""Encoder and decoder of the perceptual autoencoders (LDM / Stable Diffusion VAE layout).

The module tree follows CompVis ``ldm/modules/diffusionmodules/model.py`` block for block
(``conv_in``, ``down[i].block[j]``, ``down[i].downsample``, ``mid.block_1``, ``mid.attn_1``,
``mid.block_2``, ``up[i].block[j]``, ``up[i].upsample``, ``norm_out``, ``conv_out``), so the
Stable Diffusion VAE's weights map onto it one-to-one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldmkit.nn.layers import conv_nd, group_norm, spatial_attention


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, plus a (1x1 conv) shortcut."""

    def __init__(
        self, in_ch: int, out_ch: int, *, dims: int = 2, groups: int = 32, dropout: float = 0.0
    ):
        super().__init__()
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = conv_nd(dims, in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv_nd(dims, out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = conv_nd(dims, in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections (as in the SD VAE)."""

    def __init__(self, ch: int, *, dims: int = 2, groups: int = 32):
        super().__init__()
        self.norm = group_norm(ch, groups)
        self.q, self.k, self.v, self.proj_out = (conv_nd(dims, ch, ch, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + spatial_attention(self.q(h), self.k(h), self.v(h), self.proj_out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with asymmetric (0, 1) padding, as in the SD VAE."""

    def __init__(self, ch: int, *, dims: int = 2):
        super().__init__()
        self.dims = dims
        self.conv = conv_nd(dims, ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1) * self.dims))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv."""

    def __init__(self, ch: int, *, dims: int = 2):
        super().__init__()
        self.conv = conv_nd(dims, ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, ch: int, *, dims: int, groups: int, attention: bool, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, dims=dims, groups=groups, dropout=dropout)
        self.attn_1 = AttnBlock(ch, dims=dims, groups=groups) if attention else nn.Identity()
        self.block_2 = ResnetBlock(ch, ch, dims=dims, groups=groups, dropout=dropout)


class _Level(nn.Module):
    """One resolution level: a list of ResnetBlocks and an optional resampler."""

    def __init__(self, blocks: list[nn.Module], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()  # kept empty: the SD VAE has no attention outside the middle
        if resample is not None:
            setattr(self, name, resample)


class _Coder(nn.Module):
    """Shared helpers: gradient checkpointing of the ResnetBlocks."""

    gradient_checkpointing: bool = False

    def _run(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, use_reentrant=False)
        return block(h)

    def _mid(self, h: torch.Tensor) -> torch.Tensor:
        return self._run(self.mid.block_2, self.mid.attn_1(self._run(self.mid.block_1, h)))


class Encoder(_Coder):
    """Image [N, C, *S] -> moments [N, out_ch, *S / 2^(levels-1)]."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        dims: int = 2,
        groups: int = 32,
        mid_attention: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.conv_in = conv_nd(dims, in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            block_out = ch * mult
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(
                    ResnetBlock(block_in, block_out, dims=dims, groups=groups, dropout=dropout)
                )
                block_in = block_out
            last = level == len(ch_mult) - 1
            down = None if last else Downsample(block_in, dims=dims)
            self.down.append(_Level(blocks, down, "downsample"))
        self.mid = _Mid(
            block_in, dims=dims, groups=groups, attention=mid_attention, dropout=dropout
        )
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = conv_nd(dims, block_in, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = self._run(block, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self._mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(_Coder):
    """Latent [N, z_ch, *S] -> image [N, out_ch, *S * 2^(levels-1)]."""

    def __init__(
        self,
        *,
        z_channels: int,
        out_channels: int,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        dims: int = 2,
        groups: int = 32,
        mid_attention: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = conv_nd(dims, z_channels, block_in, 3, padding=1)
        self.mid = _Mid(
            block_in, dims=dims, groups=groups, attention=mid_attention, dropout=dropout
        )
        levels: list[nn.Module] = []
        for level in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[level]
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(
                    ResnetBlock(block_in, block_out, dims=dims, groups=groups, dropout=dropout)
                )
                block_in = block_out
            up = Upsample(block_in, dims=dims) if level != 0 else None
            levels.insert(0, _Level(blocks, up, "upsample"))  # up[0] is the finest level
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = conv_nd(dims, block_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self._mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = self._run(block, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
