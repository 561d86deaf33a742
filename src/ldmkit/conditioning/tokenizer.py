"""Tokenizers for the text encoder trained with the diffusion model; no download needed.

``ByteTokenizer`` reads any string as its UTF-8 bytes (a fixed vocabulary of 256 + 3 specials);
``WordTokenizer`` builds a word vocabulary from the training captions, the natural choice for
the small closed vocabularies of toy and domain caption sets. Both turn a batch of strings into
``(ids [B, L], mask [B, L])``: ``<bos> tokens... <eos>``, truncated to ``max_length`` (the
``<eos>`` is kept) and padded with ``pad_id = 0`` to exactly ``max_length``, so every batch —
and the conditional and unconditional halves of a CFG batch — has the same length.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
_WORD = re.compile(r"[^\W_]+")  # runs of Unicode letters and digits


class Tokenizer:
    """Shared batching: specials, truncation and padding around ``tokenize`` (no specials)."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, max_length: int):
        if max_length < 2:
            raise ValueError(
                f"max_length must be >= 2 (room for <bos> and <eos>), got {max_length}"
            )
        self.max_length = max_length

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def tokenize(self, text: str) -> list[int]:
        """Ids of ``text`` without specials."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """``[bos, *ids, eos]`` truncated to ``max_length`` (``eos`` always kept), unpadded."""
        ids = self.tokenize(text)[: self.max_length - 2]
        return [self.bos_id, *ids, self.eos_id]

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch of strings -> ``(ids LongTensor [B, max_length], mask bool [B, max_length])``."""
        if isinstance(texts, str):
            raise TypeError("pass a list of strings, not a single string")
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), self.max_length), dtype=torch.bool)
        for i, text in enumerate(texts):
            row = self.encode(text)
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = True
        return ids, mask


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: id = byte + 3; specials pad=0, bos=1, eos=2 (vocabulary 259).

    Truncation never splits a multi-byte character, so ``decode`` of a truncated
    sequence is a prefix of the original text.
    """

    offset = 3

    def __init__(self, max_length: int = 64):
        super().__init__(max_length)

    @property
    def vocab_size(self) -> int:
        return 256 + self.offset

    def tokenize(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        limit = self.max_length - 2
        if len(data) > limit:  # drop a partial character at the cut
            data = data[:limit].decode("utf-8", errors="ignore").encode("utf-8")
        return [b + self.offset for b in data]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids (with or without specials and padding) back to the string."""
        data = bytes(i - self.offset for i in map(int, ids) if i >= self.offset)
        return data.decode("utf-8", errors="replace")


class WordTokenizer(Tokenizer):
    """Lower-cased words (split on anything not a letter or digit) from a fixed vocabulary.

    ``vocab`` maps token -> id and must hold ``<pad>=0, <bos>=1, <eos>=2, <unk>=3``; words
    outside it become ``<unk>``. Build one from captions with ``from_texts`` and store it in
    a checkpoint's JSON config with ``to_dict``/``from_dict``.
    """

    unk_id = 3

    def __init__(self, vocab: dict[str, int], max_length: int = 32):
        super().__init__(max_length)
        specials = {PAD: self.pad_id, BOS: self.bos_id, EOS: self.eos_id, UNK: self.unk_id}
        wrong = {t: i for t, i in specials.items() if vocab.get(t) != i}
        if wrong:
            raise ValueError(f"word vocab must map the special tokens as {specials}; check {wrong}")
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise ValueError("word vocab ids must be exactly 0 .. len(vocab) - 1")
        self.vocab = dict(vocab)
        self._words = sorted(self.vocab, key=self.vocab.__getitem__)

    @staticmethod
    def split(text: str) -> list[str]:
        """Lower-case words of ``text``: ``"A red-circle!"`` -> ``["a", "red", "circle"]``."""
        return _WORD.findall(text.lower())

    @classmethod
    def from_texts(
        cls,
        texts: Iterable[str],
        min_count: int = 1,
        max_words: int | None = None,
        max_length: int = 32,
    ) -> WordTokenizer:
        """Vocabulary of the words seen at least ``min_count`` times (most frequent first,
        ties alphabetical, so the result does not depend on caption order), at most
        ``max_words`` of them."""
        counts = Counter(word for text in texts for word in cls.split(text))
        words = sorted(
            (w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w)
        )
        words = words[:max_words] if max_words is not None else words
        vocab = {t: i for i, t in enumerate([PAD, BOS, EOS, UNK, *words])}
        return cls(vocab, max_length)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def tokenize(self, text: str) -> list[int]:
        return [self.vocab.get(w, self.unk_id) for w in self.split(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids back to space-joined words (specials other than ``<unk>`` dropped)."""
        skip = (self.pad_id, self.bos_id, self.eos_id)
        return " ".join(self._words[i] for i in map(int, ids) if i not in skip)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``from_dict`` inverts it."""
        return {"type": "word", "max_length": self.max_length, "vocab": dict(self.vocab)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WordTokenizer:
        if data.get("type", "word") != "word" or "vocab" not in data:
            raise ValueError("not a word tokenizer dict (needs type 'word' and a 'vocab' mapping)")
        return cls({str(k): int(v) for k, v in data["vocab"].items()}, int(data["max_length"]))
