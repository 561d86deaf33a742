"""On-disk cache of frozen text-encoder embeddings, so long runs encode each caption once.

Layout: ``root/<sha256(encoder_id)[:16]>/`` holds ``encoder.json`` (the id, for people) and
safetensors shards. Each shard holds, for every prompt it covers, ``<key>.tokens``,
``<key>.mask`` and ``<key>.pooled``, where ``key = sha256([encoder_id, text])``, and carries
the encoder id in its metadata. Shards are written atomically (temp file + rename), so
concurrent processes (e.g. DDP ranks) can share one cache: a shard is either whole or absent,
and two writers of the same prompts write the same shard.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ldmkit.conditioning.text_encoder import TextEmbedding
from ldmkit.utils.io import atomic_write_json, save_tensors

_FIELDS = ("tokens", "mask", "pooled")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """Embeddings of one frozen encoder, keyed by (``encoder_id``, prompt).

    ``encoder_id`` must change whenever the embeddings would (another model, layer or
    ``max_length``); the frozen encoders' ``encoder_id`` attribute is such a string. Results
    come back on the CPU; ``hits`` and ``misses`` count prompts served from disk and computed.
    """

    def __init__(self, root: str | Path, encoder_id: str):
        self.encoder_id = encoder_id
        self.dir = Path(root) / _sha(encoder_id)[:16]
        if not (self.dir / "encoder.json").is_file():
            atomic_write_json(self.dir / "encoder.json", {"encoder_id": encoder_id})
        self._index: dict[str, Path] = {}  # key -> shard holding it
        self._seen: set[Path] = set()
        self.hits = self.misses = 0
        self._scan()

    def key(self, text: str) -> str:
        return _sha(json.dumps([self.encoder_id, text]))

    def __contains__(self, text: str) -> bool:
        return self.key(text) in self._index

    def __len__(self) -> int:
        return len(self._index)

    def _scan(self) -> None:
        """Index shards not seen yet (headers only; other processes may have added some)."""
        for path in sorted(self.dir.glob("*.safetensors")):
            if path in self._seen:
                continue
            self._seen.add(path)
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("encoder_id") != self.encoder_id:
                    continue
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if name.endswith(".tokens"):
                        self._index[name.removesuffix(".tokens")] = path

    def _write(self, keys: list[str], emb: TextEmbedding) -> None:
        tensors = {
            f"{k}.{field}": getattr(emb, field)[i].cpu()
            for i, k in enumerate(keys)
            for field in _FIELDS
        }
        path = self.dir / f"{_sha(''.join(sorted(keys)))[:16]}.safetensors"
        save_tensors(tensors, path, metadata={"encoder_id": self.encoder_id})
        self._seen.add(path)
        self._index.update(dict.fromkeys(keys, path))

    def get_or_compute(self, texts: list[str], encoder: nn.Module) -> TextEmbedding:
        """Embeddings of ``texts``: read from disk, computing and storing the missing ones."""
        if getattr(encoder, "trainable", True):
            raise ValueError(
                f"EmbeddingCache needs a frozen encoder (trainable=False); {type(encoder).__name__}"
                " is trained with the model, so its embeddings change every step: call "
                "encoder.encode(texts) directly instead"
            )
        keys = [self.key(t) for t in texts]
        missing = {k: t for k, t in zip(keys, texts, strict=True) if k not in self._index}
        if missing:
            self._scan()
            missing = {k: t for k, t in missing.items() if k not in self._index}
        rows: dict[str, tuple[torch.Tensor, ...]] = {}
        if missing:
            emb = encoder.encode(list(missing.values()))
            self._write(list(missing), emb)
            for i, k in enumerate(missing):
                rows[k] = tuple(getattr(emb, field)[i].cpu() for field in _FIELDS)
        self.misses += len(missing)
        self.hits += len(texts) - len(missing)
        self._read([k for k in dict.fromkeys(keys) if k not in rows], rows)
        tokens, mask, pooled = (torch.stack([rows[k][j] for k in keys]) for j in range(3))
        return TextEmbedding(tokens, mask, pooled)

    def _read(self, keys: list[str], rows: dict[str, tuple[torch.Tensor, ...]]) -> None:
        """Load ``keys`` into ``rows``, opening each shard once."""
        by_shard: dict[Path, list[str]] = {}
        for k in keys:
            by_shard.setdefault(self._index[k], []).append(k)
        for path, shard_keys in by_shard.items():
            with safe_open(str(path), framework="pt") as f:
                for k in shard_keys:
                    rows[k] = tuple(f.get_tensor(f"{k}.{field}") for field in _FIELDS)


class CachedTextEncoder:
    """A frozen text encoder whose ``encode`` goes through an ``EmbeddingCache`` on disk.

    Training with a frozen encoder wraps it in this, so each caption is encoded once per run
    (``RUN/text_cache``) instead of once per step; it has the encoder's interface
    (``encode``, ``dim``, ``pooled_dim``, ``max_length``, ``spec``, ``trainable=False``).
    """

    trainable = False

    def __init__(self, encoder: nn.Module, root: str | Path):
        if getattr(encoder, "trainable", True):
            raise ValueError("CachedTextEncoder needs a frozen encoder (trainable=False)")
        self.encoder = encoder
        self.cache = EmbeddingCache(root, encoder.encoder_id)
        self.dim, self.pooled_dim = encoder.dim, encoder.pooled_dim
        self.max_length, self.spec = encoder.max_length, encoder.spec

    def encode(self, texts: list[str]) -> TextEmbedding:
        return self.cache.get_or_compute(list(texts), self.encoder)
