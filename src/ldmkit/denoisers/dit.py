"""Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

Patchify the latent (a stride-``p`` conv), add a position embedding, run adaLN-Zero
transformer blocks conditioned on ``c = t_emb (+ y_emb)``, and unpatchify with a final
adaLN-modulated linear layer. Modulation and the final layer are zero-initialised, so every
block starts as the identity and the network's initial output is exactly 0.

Beyond the paper: vector conditioning (pooled text, sizes; ``vector_dim``) and an optional
cross-attention sublayer on a token context (``context_dim``), placed after self-attention
with its own adaLN shift/scale/gate, as in the text-conditioned DiT variants (PixArt-alpha,
Chen et al. 2023). Any latent size divisible by the patch size works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldmkit.nn.attention import Attention
from ldmkit.nn.embeddings import TimestepMLP, sincos_2d_position_embedding, timestep_embedding


@dataclass
class DiTConfig:
    """Architecture of a ``DiT`` (2-D latents).

    Fields:
        in_channels / out_channels: latent channels (``out_channels`` defaults to in).
        concat_channels: extra channels the caller concatenates to ``x`` (as in ``UNetConfig``).
        patch_size: ``p``; latent height and width must be multiples of it.
        hidden_size, depth, num_heads, mlp_ratio: transformer width, blocks, heads, MLP width
            factor (DiT-S/2: 384, 12, 6, 4.0; DiT-XL/2: 1152, 28, 16, 4.0).
        pos_embed: ``"sincos"`` (fixed, computed for the actual token grid) or ``"learned"``
            (stored for a ``sample_size`` latent, bicubically resized for other grids).
        sample_size: base latent size (int or (height, width)) for the learned embedding.
        num_classes: class conditioning; the table has ``num_classes + 1`` rows, the last being
            the "null" class for classifier-free guidance.
        vector_dim: vector conditioning [B, vector_dim] through a Linear-SiLU-Linear MLP.
        context_dim: cross-attention to a [B, L, context_dim] context; ``None`` = none.
        upcast_attention: compute attention in float32.
    """

    in_channels: int = 4
    out_channels: int | None = None
    concat_channels: int = 0
    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    pos_embed: Literal["sincos", "learned"] = "sincos"
    sample_size: int | tuple[int, int] = 32
    num_classes: int | None = None
    vector_dim: int | None = None
    context_dim: int | None = None
    upcast_attention: bool = False
    frequency_embedding_size: int = 256

    def validate(self) -> None:
        for name in ("in_channels", "patch_size", "hidden_size", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by {self.num_heads}")
        if self.pos_embed == "sincos" and self.hidden_size % 4:
            raise ValueError("sincos position embedding needs hidden_size divisible by 4")
        if any(s % self.patch_size for s in self.base_size):
            raise ValueError(f"sample_size {self.sample_size} not divisible by patch_size")

    @property
    def base_size(self) -> tuple[int, int]:
        s = self.sample_size
        return (s, s) if isinstance(s, int) else (s[0], s[1])


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def _zero(module: nn.Linear) -> None:
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)


class DiTBlock(nn.Module):
    """adaLN-Zero block: self-attention, (cross-attention,) MLP, each gated by ``c``.

    ``adaLN_modulation(c)`` gives shift/scale/gate for self-attention and MLP (in DiT's order)
    followed, with cross-attention, by shift/scale/gate for it.
    """

    def __init__(
        self,
        hidden: int,
        heads: int,
        mlp_ratio: float = 4.0,
        context_dim: int | None = None,
        upcast: bool = False,
    ):
        super().__init__()
        dim_head = hidden // heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, None, heads, dim_head, upcast=upcast, qkv_bias=True)
        self.has_cross = context_dim is not None
        if self.has_cross:
            self.norm_cross = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
            self.cross_attn = Attention(hidden, context_dim, heads, dim_head, upcast=upcast)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp_hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden, hidden),
        )
        n_mod = 9 if self.has_cross else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, n_mod * hidden))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        mod = self.adaLN_modulation(c).chunk(9 if self.has_cross else 6, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        x = x + gate_msa[:, None] * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa))
        if self.has_cross:
            shift_ca, scale_ca, gate_ca = mod[6:]
            h = _modulate(self.norm_cross(x), shift_ca, scale_ca)
            x = x + gate_ca[:, None] * self.cross_attn(h, context, context_mask)
        return x + gate_mlp[:, None] * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from tokens to ``p * p * out_channels``."""

    def __init__(self, hidden: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer on [B, C, H, W] latents with H, W multiples of ``patch_size``.

    ``blocks`` is an explicit ModuleList that caching wrappers can address. Set
    ``gradient_checkpointing = True`` to recompute each block in the backward pass.
    """

    gradient_checkpointing: bool = False

    def __init__(self, config: DiTConfig):
        super().__init__()
        config.validate()
        self.config = c = config
        d, p = c.hidden_size, c.patch_size
        self.out_channels = c.out_channels or c.in_channels
        self.x_embedder = nn.Conv2d(c.in_channels + c.concat_channels, d, p, stride=p)
        self.t_embedder = TimestepMLP(c.frequency_embedding_size, d)
        self.y_embedder = nn.Embedding(c.num_classes + 1, d) if c.num_classes is not None else None
        self.vector_embedder = TimestepMLP(c.vector_dim, d) if c.vector_dim is not None else None
        if c.pos_embed == "learned":
            gh, gw = (s // p for s in c.base_size)
            self.pos_embed: nn.Parameter | None = nn.Parameter(torch.zeros(1, d, gh, gw))
        else:
            self.pos_embed = None
        self._sincos_cache: dict[tuple, torch.Tensor] = {}
        self.blocks = nn.ModuleList(
            DiTBlock(d, c.num_heads, c.mlp_ratio, c.context_dim, c.upcast_attention)
            for _ in range(c.depth)
        )
        self.final_layer = FinalLayer(d, p, self.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's initialisation: Xavier linears, N(0, 0.02) embeddings, zeroed adaLN + output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        for mlp in (self.t_embedder, self.vector_embedder):
            if mlp is not None:
                nn.init.normal_(mlp[0].weight, std=0.02)
                nn.init.normal_(mlp[2].weight, std=0.02)
        for block in self.blocks:
            _zero(block.adaLN_modulation[-1])
        _zero(self.final_layer.adaLN_modulation[-1])
        _zero(self.final_layer.linear)

    def position_embedding(self, gh: int, gw: int, like: torch.Tensor) -> torch.Tensor:
        """[1, gh * gw, hidden] position embedding for a gh x gw token grid."""
        if self.pos_embed is not None:
            pos = self.pos_embed
            if pos.shape[-2:] != (gh, gw):
                pos = F.interpolate(pos, size=(gh, gw), mode="bicubic", align_corners=False)
            return pos.flatten(2).transpose(1, 2).to(like.dtype)
        if torch.compiler.is_compiling():  # in the graph: a cache lookup would guard on shapes
            emb = sincos_2d_position_embedding(self.config.hidden_size, gh, gw)
            return emb[None].to(device=like.device, dtype=like.dtype)
        key = (gh, gw, like.device, like.dtype)
        if key not in self._sincos_cache:
            emb = sincos_2d_position_embedding(self.config.hidden_size, gh, gw)
            self._sincos_cache[key] = emb[None].to(device=like.device, dtype=like.dtype)
        return self._sincos_cache[key]

    def _condition(self, timesteps: torch.Tensor, y: torch.Tensor | None, b: int) -> torch.Tensor:
        """c = t_emb + y_emb; integer ``y`` uses the class table, floating ``y`` the vector MLP."""
        c = self.config
        weight = self.t_embedder[0].weight
        t_freq = timestep_embedding(timesteps, c.frequency_embedding_size)
        cond = self.t_embedder(t_freq.to(weight.dtype))
        if y is None:
            if self.y_embedder is not None:  # unconditional = the null class
                y = torch.full((b,), c.num_classes, dtype=torch.long, device=weight.device)
            elif self.vector_embedder is not None:
                raise ValueError(f"this DiT needs a vector y [B, {c.vector_dim}]")
            else:
                return cond
        if y.is_floating_point():
            if self.vector_embedder is None:
                raise ValueError("floating-point y given but the DiT has no vector_dim")
            return cond + self.vector_embedder(y.to(weight.dtype))
        if self.y_embedder is None:
            raise ValueError("integer y (class labels) given but the DiT has no num_classes")
        return cond + self.y_embedder(y)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        *,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoiser output [B, out_channels, H, W].

        Args:
            x: [B, in_channels + concat_channels, H, W], H and W multiples of ``patch_size``.
            timesteps: [B] or scalar timesteps / ``c_noise`` (may be fractional).
            context: [B, L, context_dim] cross-attention tokens (needed iff ``context_dim``).
            y: class indices [B] (long; ``None`` = the null class) or a vector [B, vector_dim].
            context_mask: [B, L] bool, True for real context tokens, False for padding.
        """
        c, p = self.config, self.config.patch_size
        if x.ndim != 4:
            raise ValueError(f"DiT expects x of shape [B, C, H, W], got {tuple(x.shape)}")
        b, ch, h, w = x.shape
        if ch != c.in_channels + c.concat_channels:
            raise ValueError(f"x has {ch} channels, expected {c.in_channels + c.concat_channels}")
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} must be divisible by patch_size {p}")
        if (context is None) != (c.context_dim is None):
            raise ValueError(
                "context is required iff the DiT has cross-attention "
                f"(context_dim={c.context_dim}, context given: {context is not None})"
            )
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(b)
        cond = self._condition(timesteps, y, b)

        tokens = self.x_embedder(x).flatten(2).transpose(1, 2)  # [B, gh * gw, D]
        tokens = tokens + self.position_embedding(h // p, w // p, tokens)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, cond, context, context_mask, use_reentrant=False)
            else:
                tokens = block(tokens, cond, context, context_mask)
        out = self.final_layer(tokens, cond)  # [B, gh * gw, p * p * C]
        # unpatchify: (gh, gw, p, p, C) -> (C, gh * p, gw * p)
        out = out.reshape(b, h // p, w // p, p, p, self.out_channels)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(b, self.out_channels, h, w)
