"""Text embeddings for cross-attention, and the text encoder trained with the diffusion model.

Every text encoder in ldmkit is an ``nn.Module`` with ``encode(texts) -> TextEmbedding`` and the
attributes ``dim``, ``pooled_dim``, ``max_length`` and ``trainable``; ``""`` is the unconditional
prompt for classifier-free guidance. ``TransformerTextEncoder`` is the encoder of the LDM
paper's text-to-image model (Rombach et al. 2022, Sec. 4.3.1: a transformer over tokenized
prompts, trained jointly with the UNet): token + learned position embeddings, pre-norm
transformer blocks (Vaswani et al. 2017) with GEGLU feed-forward, a final LayerNorm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ldmkit.conditioning.tokenizer import ByteTokenizer, Tokenizer, WordTokenizer
from ldmkit.config import to_dict
from ldmkit.nn.attention import Attention, FeedForward


@dataclass
class TextEmbedding:
    """Encoded prompts.

    tokens: [B, L, D] float32, the cross-attention context.
    mask: [B, L] bool, True for real tokens (False for padding).
    pooled: [B, D_pooled] float32, one vector per prompt (for ``vector`` conditioning).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: str | torch.device) -> TextEmbedding:
        return TextEmbedding(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))

    @staticmethod
    def cat(items: list[TextEmbedding]) -> TextEmbedding:
        """Concatenate along the batch (e.g. conditional + unconditional for CFG)."""
        return TextEmbedding(
            torch.cat([e.tokens for e in items]),
            torch.cat([e.mask for e in items]),
            torch.cat([e.pooled for e in items]),
        )


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` [B, L, D] over the positions where ``mask`` [B, L] is True -> [B, D]."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


@dataclass
class TextEncoderConfig:
    """Config of ``TransformerTextEncoder`` (JSON/YAML-ready; ``vocab`` is filled from data).

    tokenizer: ``"word"`` (vocabulary of the training captions, ``vocab`` required; build it
        with ``WordTokenizer.from_texts(captions).vocab``) or ``"byte"`` (UTF-8 bytes).
    pooled: ``"mean"`` (masked mean over the real tokens) or ``"eos"`` (the ``<eos>`` state).
    """

    tokenizer: Literal["word", "byte"] = "word"
    vocab: dict[str, int] | None = None
    dim: int = 128
    depth: int = 2
    heads: int = 4
    max_length: int = 32
    pooled: Literal["mean", "eos"] = "mean"

    def validate(self) -> None:
        if self.tokenizer == "word" and not self.vocab:
            raise ValueError(
                "tokenizer 'word' needs a vocab; build one from the training captions with "
                "WordTokenizer.from_texts(captions).vocab"
            )
        if self.tokenizer == "byte" and self.vocab is not None:
            raise ValueError(
                "vocab is only used with tokenizer 'word'; remove it or set it to null"
            )
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.depth < 0 or self.max_length < 2:
            raise ValueError("depth must be >= 0 and max_length >= 2")


class _EncoderBlock(nn.Module):
    """Pre-norm self-attention (padding keys masked out) and GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, None, heads, dim // heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.ff(self.norm2(x))


class TransformerTextEncoder(nn.Module):
    """Small transformer text encoder trained jointly with the diffusion model.

    Output tokens at padding positions are zero, so every output is a function of the real
    tokens alone. Initialisation draws from torch's global RNG (deterministic given a seed).
    """

    trainable = True

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.tokenizer: Tokenizer = (
            WordTokenizer(config.vocab, config.max_length)
            if config.tokenizer == "word"
            else ByteTokenizer(config.max_length)
        )
        self.dim = self.pooled_dim = config.dim
        self.max_length = config.max_length
        self.token_embedding = nn.Embedding(self.tokenizer.vocab_size, config.dim)
        self.position_embedding = nn.Parameter(torch.zeros(config.max_length, config.dim))
        self.blocks = nn.ModuleList(
            _EncoderBlock(config.dim, config.heads) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.02)

    @property
    def spec(self) -> dict[str, Any]:
        """The ``load_text_encoder`` spec that rebuilds this encoder (weights aside)."""
        return {"kind": "trained", **to_dict(self.config)}

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> TextEmbedding:
        """``ids`` [B, L] and ``mask`` [B, L] (from ``self.tokenizer``) -> TextEmbedding."""
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x).float() * mask.unsqueeze(-1)  # zero the padding positions
        if self.config.pooled == "mean":
            pooled = masked_mean(x, mask)
        else:  # the <eos> state: last real token of each row
            last = mask.long().sum(1) - 1
            pooled = x[torch.arange(x.shape[0], device=x.device), last]
        return TextEmbedding(x, mask, pooled)

    def encode(self, texts: list[str]) -> TextEmbedding:
        """Tokenize ``texts`` (padded to ``max_length``) and encode them, with gradients."""
        ids, mask = self.tokenizer(texts)
        device = self.position_embedding.device
        return self(ids.to(device), mask.to(device))
