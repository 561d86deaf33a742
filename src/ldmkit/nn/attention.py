"""Multi-head attention and the transformer blocks of latent diffusion UNets.

Module and parameter names follow CompVis ``ldm/modules/attention.py`` (``CrossAttention``,
``FeedForward``, ``BasicTransformerBlock``, ``SpatialTransformer``), which diffusers shares for
these layers (``to_q``, ``to_k``, ``to_v``, ``to_out.0``, ``ff.net.0.proj``, ``ff.net.2``), so
Stable Diffusion 1.x/2.x/XL weights load one-to-one. The architecture is that of Rombach et
al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion Models"): transformer blocks
of Vaswani et al. 2017 with GEGLU feed-forward layers (Shazeer 2020, "GLU Variants Improve
Transformer"). Attention runs through ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.nn.embeddings import sincos_2d_position_embedding
from ldmkit.nn.layers import conv_nd, group_norm, sdpa, tokens_to_image


class Attention(nn.Module):
    """Multi-head (self- or cross-) attention on token sequences [B, N, query_dim].

    Args:
        query_dim: channels of the queries (and of the output).
        context_dim: channels of the keys/values source; ``None`` means self-attention.
        heads, dim_head: number of heads and channels per head (inner dim = heads * dim_head).
        dropout: dropout after the output projection (``to_out.1``).
        upcast: compute the attention itself in float32 (inputs in fp16/bf16 are upcast and the
            result cast back), as SD 2.x needs in fp16.
        qkv_bias: biases on ``to_q/to_k/to_v`` (CompVis has none; DiT/ViT use them).
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        upcast: bool = False,
        qkv_bias: bool = False,
    ):
        super().__init__()
        inner = heads * dim_head
        self.is_cross = context_dim is not None
        context_dim = context_dim or query_dim
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))
        # fused copies of the input projections (``fuse_projections``): not saved, not trained
        self.register_buffer("fused_weight", None, persistent=False)
        self.register_buffer("fused_bias", None, persistent=False)

    def fuse_projections(self, fuse: bool = True) -> None:
        """Run the q/k/v projections as one matmul (self-attention) or k/v as one (cross-
        attention), from concatenated copies of their weights made now; ``False`` drops them.
        For inference: later changes to ``to_q/to_k/to_v`` are not seen until fused again."""
        if not fuse:
            self.fused_weight = self.fused_bias = None
            return
        layers = [self.to_k, self.to_v] if self.is_cross else [self.to_q, self.to_k, self.to_v]
        with torch.no_grad():
            self.fused_weight = torch.cat([m.weight for m in layers])
            if layers[0].bias is not None:
                self.fused_bias = torch.cat([m.bias for m in layers])

    def _project(
        self, x: torch.Tensor, context: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.fused_weight is None:
            context = x if context is None else context
            return self.to_q(x), self.to_k(context), self.to_v(context)
        if self.is_cross:  # q from x, k and v from the context in one matmul
            k, v = F.linear(context, self.fused_weight, self.fused_bias).chunk(2, dim=-1)
            return self.to_q(x), k, v
        if context is not None and context is not x:
            raise ValueError("fused self-attention projections take no separate context")
        return F.linear(x, self.fused_weight, self.fused_bias).chunk(3, dim=-1)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` [B, N, query_dim], ``context`` [B, L, context_dim] (default ``x``).

        ``mask`` [B, L] bool marks the context tokens that may be attended to (True = real
        token, False = padding). Every row needs at least one True entry.
        """
        b = x.shape[0]
        q, k, v = self._project(x, context)
        context = x if context is None else context
        # [B, N, H*D] -> [B, H, N, D]
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attn_mask = None
        if mask is not None:
            if mask.shape != (b, context.shape[1]):
                raise ValueError(
                    f"mask must have shape {(b, context.shape[1])}, got {tuple(mask.shape)}"
                )
            attn_mask = mask.to(device=q.device, dtype=torch.bool)[:, None, None, :]
        if self.upcast and q.dtype != torch.float32:
            with torch.autocast(q.device.type, enabled=False):
                out = sdpa(q.float(), k.float(), v.float(), attn_mask=attn_mask).to(q.dtype)
        else:
            out = sdpa(q, k, v, attn_mask=attn_mask)
        return self.to_out(out.transpose(1, 2).reshape(b, x.shape[1], -1))


class GEGLU(nn.Module):
    """``a * gelu(b)`` where ``[a, b] = proj(x)`` (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU -> Dropout -> Linear, named ``net.0.proj`` / ``net.2`` as CompVis ``FeedForward``."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and GEGLU feed-forward, each residual.

    Without ``context_dim`` the cross-attention sublayer (``norm2``/``attn2``) is omitted
    (CompVis would make it a second self-attention; no released checkpoint relies on that).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        context_dim: int | None = None,
        dropout: float = 0.0,
        upcast: bool = False,
    ):
        super().__init__()
        self.attn1 = Attention(dim, None, heads, dim_head, dropout, upcast)
        self.ff = FeedForward(dim, dropout=dropout)
        self.has_cross = context_dim is not None
        if self.has_cross:
            self.attn2 = Attention(dim, context_dim, heads, dim_head, dropout, upcast)
            self.norm2 = nn.LayerNorm(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        if self.has_cross:
            x = x + self.attn2(self.norm2(x), context, context_mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the positions of a feature map [B, C, *spatial] (1-D, 2-D or 3-D).

    GroupNorm -> ``proj_in`` (1x1 conv, or Linear with ``use_linear`` as in SD 2.x/XL) ->
    ``depth`` BasicTransformerBlocks on the flattened tokens -> ``proj_out`` (zero-initialised,
    so the block starts as the identity) -> residual.

    ``position_embedding`` (2-D only; not in Stable Diffusion, off by default) adds the fixed
    sin-cos embedding of each token's grid position after ``proj_in``, as DiT does after
    patchifying, so that attention (and so cross-attention to words like "top left") knows
    where each token is instead of inferring it from the convolutions' zero padding.
    """

    def __init__(
        self,
        in_channels: int,
        heads: int,
        dim_head: int,
        depth: int = 1,
        context_dim: int | None = None,
        dropout: float = 0.0,
        use_linear: bool = False,
        upcast: bool = False,
        dims: int = 2,
        norm_groups: int = 32,
        position_embedding: bool = False,
    ):
        super().__init__()
        inner = heads * dim_head
        if position_embedding and (dims != 2 or inner % 4):
            raise ValueError("position_embedding needs 2-D maps and heads * dim_head % 4 == 0")
        self.use_linear, self.position_embedding = use_linear, position_embedding
        self.norm = group_norm(in_channels, norm_groups, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner)
            self.proj_out = nn.Linear(inner, in_channels)
        else:
            self.proj_in = conv_nd(dims, in_channels, inner, 1)
            self.proj_out = conv_nd(dims, inner, in_channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout, upcast)
            for _ in range(depth)
        )
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        spatial = x.shape[2:]
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # [B, C, *S] -> [B, L, C]
        if self.use_linear:
            h = self.proj_in(h)
        if self.position_embedding:
            h = h + sincos_2d_position_embedding(h.shape[-1], *spatial).to(h)
        for block in self.transformer_blocks:
            h = block(h, context, context_mask)
        if self.use_linear:
            return x + tokens_to_image(self.proj_out(h), spatial)
        return x + tokens_to_image(h, spatial, self.proj_out)
