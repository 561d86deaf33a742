"""The latent diffusion UNet (Rombach et al. 2022), in the layout of CompVis ``UNetModel``.

The architecture is the ADM UNet of Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs on
Image Synthesis"), itself after Ho et al. 2020, with the ResBlock attention replaced by
``SpatialTransformer`` cross-attention blocks (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models") and, for SDXL, a vector embedding of pooled text and
size conditioning (Podell et al. 2023). The module tree follows CompVis
``ldm/modules/diffusionmodules/openaimodel.py`` exactly (``time_embed``, ``label_emb``,
``input_blocks``, ``middle_block``, ``output_blocks``, ``out``), so Stable Diffusion 1.x, 2.x
and XL UNet weights (``model.diffusion_model.`` prefix stripped) load one-to-one.

The network maps ``(x, timesteps, context, y) -> output`` of x's spatial shape; what the output
means (eps, v, x0, flow velocity) is decided by the parameterization wrapper around it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldmkit.nn.attention import SpatialTransformer
from ldmkit.nn.embeddings import TimestepMLP, timestep_embedding
from ldmkit.nn.layers import conv_nd, group_norm


@dataclass
class UNetConfig:
    """Architecture of a ``UNet``.

    Levels: level ``i`` works at ``1 / 2**i`` of the input resolution and has
    ``model_channels * channel_mult[i]`` channels. ``attention_levels`` lists the levels whose
    blocks carry a ``SpatialTransformer`` — CompVis' ``attention_resolutions`` are the
    downsampling rates instead, so ``attention_resolutions=[4, 2, 1]`` (SD 1.x/2.x) is
    ``attention_levels=(0, 1, 2)`` and ``[4, 2]`` (SDXL) is ``(1, 2)``. The middle block always
    has a transformer unless ``transformer_depth_middle`` is 0.

    Fields:
        in_channels: channels of the latent being denoised.
        out_channels: output channels (default ``in_channels``).
        concat_channels: extra channels concatenated to the latent by the caller (inpainting
            mask + masked image, low-res image for upscaling). The first conv takes
            ``in_channels + concat_channels``, so ``x`` passed to ``forward`` must have that many
            channels; SD inpainting is ``in_channels=4, concat_channels=5``.
        num_heads / num_head_channels: heads per transformer; if ``num_head_channels`` is set
            it wins and the heads are ``channels // num_head_channels`` (SD 2.x and XL use 64).
        transformer_depth: blocks per transformer, one int or one per level; depths of levels
            not in ``attention_levels`` are ignored (SDXL's ``(0, 2, 10)`` works).
        transformer_depth_middle: blocks in the middle transformer (default: last level's).
        context_dim: channels of the cross-attention context; ``None`` = no cross-attention.
        num_classes: class-conditional model; the embedding table has ``num_classes + 1`` rows,
            index ``num_classes`` being the "null" class for classifier-free guidance.
        vector_dim: SDXL-style vector conditioning (sgm's ``adm_in_channels``, 2816 for SDXL),
            embedded by ``label_emb.0`` (Linear-SiLU-Linear) and added to the time embedding.
        attention_position_embedding: add a fixed 2-D sin-cos position embedding to the tokens
            of every transformer (not in Stable Diffusion; see ``SpatialTransformer``). Small
            models learn where "top left" is far sooner with it.
        dims: spatial dimensions (1, 2 or 3). In 3-D the first axis (frames) is never resampled,
            as in CompVis.
    """

    in_channels: int = 4
    out_channels: int | None = None
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int | tuple[int, ...] = 2
    attention_levels: tuple[int, ...] = (1, 2)
    num_heads: int = 8
    num_head_channels: int | None = None
    transformer_depth: int | tuple[int, ...] = 1
    transformer_depth_middle: int | None = None
    context_dim: int | None = None
    use_linear_in_transformer: bool = False
    upcast_attention: bool = False
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    num_classes: int | None = None
    vector_dim: int | None = None
    concat_channels: int = 0
    attention_position_embedding: bool = False
    dims: int = 2
    norm_groups: int = 32
    dropout: float = 0.0

    def validate(self) -> None:
        levels = len(self.channel_mult)
        if not 1 <= levels <= 6:
            raise ValueError(f"channel_mult must have 1..6 levels, got {self.channel_mult}")
        if self.dims not in (1, 2, 3):
            raise ValueError(f"dims must be 1, 2 or 3, got {self.dims}")
        for name in ("in_channels", "model_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        bad = [i for i in self.attention_levels if not 0 <= i < levels]
        if bad:
            raise ValueError(f"attention_levels {bad} out of range for {levels} levels")
        for name in ("num_res_blocks", "transformer_depth"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != levels:
                raise ValueError(f"{name} needs one entry per level ({levels}), got {value}")
        depths = self.per_level(self.transformer_depth)
        if any(depths[i] < 1 for i in self.attention_levels):
            raise ValueError("levels in attention_levels need transformer_depth >= 1")
        mid = depths[-1] if self.transformer_depth_middle is None else self.transformer_depth_middle
        with_attention = set(self.attention_levels) | ({levels - 1} if mid > 0 else set())
        for level in with_attention:  # raises if heads do not divide the channels
            self.heads(self.model_channels * self.channel_mult[level])
        if self.num_classes is not None and self.vector_dim is not None:
            raise ValueError("use either num_classes or vector_dim (one label_emb), not both")

    def per_level(self, value: int | tuple[int, ...]) -> tuple[int, ...]:
        """An int or per-level tuple as one value per level."""
        return (value,) * len(self.channel_mult) if isinstance(value, int) else tuple(value)

    def heads(self, channels: int) -> tuple[int, int]:
        """(heads, channels per head) of a transformer on ``channels`` channels."""
        if self.num_head_channels is not None:
            heads, dim_head = channels // self.num_head_channels, self.num_head_channels
        else:
            heads, dim_head = self.num_heads, channels // self.num_heads
        if heads * dim_head != channels:
            raise ValueError(f"{channels} channels do not split into heads ({heads}x{dim_head})")
        return heads, dim_head

    @property
    def downsampling_factor(self) -> int:
        """Spatial sizes must be multiples of this (2 ** (levels - 1))."""
        return 2 ** (len(self.channel_mult) - 1)


def _scale_only_spatial(dims: int) -> int | tuple[int, ...]:
    """Resampling factor: 2 on every axis, except the frame axis of 3-D inputs."""
    return (1, 2, 2) if dims == 3 else 2


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv (``op``), or average pooling."""

    def __init__(self, channels: int, use_conv: bool = True, dims: int = 2):
        super().__init__()
        stride = _scale_only_spatial(dims)
        if use_conv:
            self.op = conv_nd(dims, channels, channels, 3, stride=stride, padding=1)
        else:
            self.op = getattr(nn, f"AvgPool{dims}d")(kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution (nearest neighbour), then an optional 3x3 conv (``conv``)."""

    def __init__(self, channels: int, use_conv: bool = True, dims: int = 2):
        super().__init__()
        self.dims = dims
        self.conv = conv_nd(dims, channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        """``size``: the exact output size, for inputs that were not multiples of 2 on the way
        down (the skip connection's size; diffusers' ``upsample_size``)."""
        if size is not None:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        else:
            scale = _scale_only_spatial(self.dims)
            factor = scale if isinstance(scale, int) else tuple(float(s) for s in scale)
            x = F.interpolate(x, scale_factor=factor, mode="nearest")
        return x if self.conv is None else self.conv(x)


class ResBlock(nn.Module):
    """ADM residual block: ``in_layers`` -> add (or scale-shift by) ``emb_layers`` -> ``out_layers``.

    With ``up``/``down`` the block also resamples (``resblock_updown``, BigGAN style); the last
    conv of ``out_layers`` is zero-initialised so the block starts as its skip connection.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        *,
        dims: int = 2,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
        norm_groups: int = 32,
    ):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            group_norm(channels, norm_groups, eps=1e-5),
            nn.SiLU(),
            conv_nd(dims, channels, out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = (
                Upsample(channels, False, dims),
                Upsample(channels, False, dims),
            )
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            group_norm(out_channels, norm_groups, eps=1e-5),
            nn.SiLU(),
            nn.Dropout(dropout),
            conv_nd(dims, out_channels, out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.out_layers[-1].weight)
        nn.init.zeros_(self.out_layers[-1].bias)
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = conv_nd(dims, channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            # resample between the activation and the first conv, on both paths
            h = self.h_upd(self.in_layers[:-1](x))
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.ndim - 2)))
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class TimestepEmbedSequential(nn.Sequential):
    """A block of the UNet: passes the embedding to ResBlocks and the context to transformers."""

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        upsample_size: Sequence[int] | None = None,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, context_mask)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """Latent diffusion UNet with optional cross-attention, class or vector conditioning.

    Blocks are explicit lists that caching and pruning wrappers can address:
    ``input_blocks[i]`` (the stem conv, then per level ``num_res_blocks`` ResBlock(+transformer)
    blocks and a Downsample block), ``middle_block`` (ResBlock, transformer, ResBlock) and
    ``output_blocks[j]`` (each taking the skip of ``input_blocks[-1 - j]``). Set
    ``gradient_checkpointing = True`` to recompute each block in the backward pass.
    """

    gradient_checkpointing: bool = False

    def __init__(self, config: UNetConfig):
        super().__init__()
        config.validate()
        self.config = c = config
        levels = len(c.channel_mult)
        n_res = c.per_level(c.num_res_blocks)
        depths = c.per_level(c.transformer_depth)
        emb_dim = 4 * c.model_channels
        res_kw = dict(
            dims=c.dims,
            dropout=c.dropout,
            use_scale_shift_norm=c.use_scale_shift_norm,
            norm_groups=c.norm_groups,
        )

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads, dim_head = c.heads(ch)
            return SpatialTransformer(
                ch,
                heads,
                dim_head,
                depth=depth,
                context_dim=c.context_dim,
                dropout=c.dropout,
                use_linear=c.use_linear_in_transformer,
                upcast=c.upcast_attention,
                dims=c.dims,
                norm_groups=c.norm_groups,
                position_embedding=c.attention_position_embedding,
            )

        self.time_embed = TimestepMLP(c.model_channels, emb_dim)
        if c.num_classes is not None:
            self.label_emb: nn.Module | None = nn.Embedding(c.num_classes + 1, emb_dim)
        elif c.vector_dim is not None:
            self.label_emb = nn.Sequential(TimestepMLP(c.vector_dim, emb_dim))
        else:
            self.label_emb = None

        # encoder: stem conv, then ResBlock(+transformer) blocks and a downsample per level
        ch = c.model_channels
        stem = conv_nd(c.dims, c.in_channels + c.concat_channels, ch, 3, padding=1)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(stem)])
        skip_channels = [ch]
        for level, mult in enumerate(c.channel_mult):
            for _ in range(n_res[level]):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, c.model_channels * mult, **res_kw)]
                ch = c.model_channels * mult
                if level in c.attention_levels:
                    layers.append(transformer(ch, depths[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != levels - 1:
                down = (
                    ResBlock(ch, emb_dim, ch, down=True, **res_kw)
                    if c.resblock_updown
                    else Downsample(ch, True, c.dims)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)

        depth_mid = depths[-1] if c.transformer_depth_middle is None else c.transformer_depth_middle
        middle = [ResBlock(ch, emb_dim, ch, **res_kw)]
        if depth_mid > 0:
            middle.append(transformer(ch, depth_mid))
        middle.append(ResBlock(ch, emb_dim, ch, **res_kw))
        self.middle_block = TimestepEmbedSequential(*middle)

        # decoder: num_res_blocks + 1 blocks per level, each consuming one skip connection
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(n_res[level] + 1):
                skip = skip_channels.pop()
                layers = [ResBlock(ch + skip, emb_dim, c.model_channels * mult, **res_kw)]
                ch = c.model_channels * mult
                if level in c.attention_levels:
                    layers.append(transformer(ch, depths[level]))
                if level and i == n_res[level]:
                    layers.append(
                        ResBlock(ch, emb_dim, ch, up=True, **res_kw)
                        if c.resblock_updown
                        else Upsample(ch, True, c.dims)
                    )
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            group_norm(ch, c.norm_groups, eps=1e-5),
            nn.SiLU(),
            conv_nd(c.dims, ch, c.out_channels or c.in_channels, 3, padding=1),
        )
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def _check_inputs(
        self, x: torch.Tensor, context: torch.Tensor | None, y: torch.Tensor | None
    ) -> None:
        c = self.config
        if x.ndim != c.dims + 2:
            raise ValueError(f"expected x of shape [B, C, {c.dims} spatial dims], got {x.shape}")
        if x.shape[1] != c.in_channels + c.concat_channels:
            raise ValueError(
                f"x has {x.shape[1]} channels; expected in_channels + concat_channels = "
                f"{c.in_channels + c.concat_channels}"
            )
        f = c.downsampling_factor
        spatial = x.shape[3:] if c.dims == 3 else x.shape[2:]  # frames are not resampled
        if c.resblock_updown and any(s % f for s in spatial):
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} must be a multiple of {f} "
                f"(2 ** (levels - 1)) for a UNet with {len(c.channel_mult)} levels and "
                "resblock_updown (its pooling floors odd sizes)"
            )
        if c.context_dim is None and context is not None:
            raise ValueError("context given but the UNet has no cross-attention (context_dim)")
        if c.context_dim is not None and context is None:
            raise ValueError(f"this UNet needs a context [B, L, {c.context_dim}]")
        if self.label_emb is None and y is not None:
            raise ValueError("y given but the UNet has neither num_classes nor vector_dim")
        if c.vector_dim is not None and y is None:
            raise ValueError(f"this UNet needs a vector y [B, {c.vector_dim}]")

    def embed(
        self, timesteps: torch.Tensor | float, y: torch.Tensor | None, x: torch.Tensor
    ) -> torch.Tensor:
        """The embedding every ResBlock receives: time MLP (+ class or vector embedding) [B, 4C]."""
        b = x.shape[0]
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(b)
        t_emb = timestep_embedding(timesteps, self.config.model_channels)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))
        if self.config.num_classes is not None:
            if y is None:  # the null class (classifier-free guidance)
                y = torch.full((b,), self.config.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.label_emb(y)
        elif y is not None:
            emb = emb + self.label_emb(y.to(emb.dtype))
        return emb

    def _run(self, block: nn.Module, h: torch.Tensor, *args: Any) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, *args, use_reentrant=False)
        return block(h, *args)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        *,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoiser output [B, out_channels, *spatial].

        Args:
            x: [B, in_channels + concat_channels, *spatial].
            timesteps: [B] or scalar timesteps / ``c_noise`` (may be fractional).
            context: [B, L, context_dim] cross-attention tokens.
            y: class indices [B] (``num_classes``; ``None`` means the null class) or a vector
                [B, vector_dim] (``vector_dim``).
            context_mask: [B, L] bool, True for real context tokens, False for padding.
        """
        self._check_inputs(x, context, y)
        emb = self.embed(timesteps, y, x)

        h, skips = x, []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context, context_mask)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context, context_mask)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            # an Upsample goes to the next skip's size: odd sizes were rounded up on the way down
            size = tuple(skips[-1].shape[2:]) if skips else None
            h = self._run(block, h, emb, context, context_mask, size)
        return self.out(h)
