"""CLIP text encoders of Stable Diffusion checkpoints: tokenizer, key maps, model, prompt encoding.

Two weight layouts occur in SD checkpoints:

* Hugging Face ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` keys (``text_model.…``,
  ``text_projection.weight``): SD 1.x (``cond_stage_model.transformer.``) and SDXL's first
  encoder (``conditioner.embedders.0.transformer.``). ``transformers`` >= 5.6 flattens
  ``CLIPTextModel`` (no ``text_model.`` prefix); every function here accepts both spellings and
  returns the prefixed one, as stored in checkpoints and diffusers folders.
* OpenCLIP keys (``token_embedding``, ``positional_embedding``, ``transformer.resblocks.N.…``,
  ``ln_final``, ``text_projection`` [width, proj] applied as ``x @ P``): SD 2.x
  (``cond_stage_model.model.``, ViT-H text tower) and SDXL's second encoder
  (``conditioner.embedders.1.model.``, bigG).

Callers strip those checkpoint prefixes; :func:`openclip_to_hf` / :func:`hf_to_openclip` convert
between the layouts losslessly, :func:`clip_text_config` infers the architecture,
:func:`build_clip_text_model` builds the model without a second copy of the weights and
:func:`encode_prompt_hidden` reproduces diffusers' ``encode_prompt`` for SD 1.x, 2.x and XL.
``transformers`` is imported lazily and offline (``ldmkit.conditioning.hf._transformers``).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from ldmkit.conditioning.hf import _check_tokenizer, _transformers
from ldmkit.interop.modules import check_state_dict, names

if TYPE_CHECKING:
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

BOS_ID, EOS_ID = 49406, 49407  # <|startoftext|>, <|endoftext|> in the 49,408-token CLIP vocab
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2  # lines 1..48894 of the BPE file (line 0 is a version header)

# HF key names (prefixed layout).
_TOK = "text_model.embeddings.token_embedding.weight"
_POS = "text_model.embeddings.position_embedding.weight"
_POS_IDS = "text_model.embeddings.position_ids"
_LAYERS = "text_model.encoder.layers."
_PROJ = "text_projection.weight"
_OC_LAYERS = "transformer.resblocks."

# OpenCLIP top-level key -> HF key (plain renames, same tensor).
_TOP = {
    "token_embedding.weight": _TOK,
    "positional_embedding": _POS,
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
# OpenCLIP resblock suffix -> HF encoder-layer suffix (plain renames).
_LAYER = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_IN_PROJ = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}  # fused q|k|v rows
_QKV = ("q", "k", "v")


# --------------------------------------------------------------------------- tokenizer


def _bpe_path() -> Path:
    """open-clip's BPE file, found without importing ``open_clip`` (it needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the CLIP BPE vocabulary ships with open-clip-torch: "
            "pip install --no-deps open-clip-torch==3.3.0 ftfy regex (or pass bpe_path=)"
        )
    for folder in spec.submodule_search_locations:
        if (Path(folder) / _BPE_FILE).is_file():
            return Path(folder) / _BPE_FILE
    raise FileNotFoundError(f"{_BPE_FILE} not found in {list(spec.submodule_search_locations)}")


def _byte_chars() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: byte b -> printable char, in CLIP's vocab order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in chars)
    chars.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return [chars[b] for b in printable] + [chars[b] for b in range(256) if b not in printable]


@functools.lru_cache(maxsize=4)
def _clip_bpe(path: str) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(vocab tokens in id order, merges) from the gzipped BPE file; parsed once per process."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : _NUM_MERGES + 1]
    merges = tuple(tuple(line.split()) for line in lines)
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: expected {_NUM_MERGES} merge lines 'a b' after the header")
    chars = _byte_chars()
    # vocab = 256 bytes, their end-of-word forms, one token per merge, then the two specials.
    tokens = (*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges), BOS, EOS)
    return tokens, merges  # type: ignore[return-value]


def clip_tokenizer(
    pad_token: str = EOS, model_max_length: int = 77, *, bpe_path: str | Path | None = None
) -> CLIPTokenizer:
    """The CLIP BPE tokenizer (49,408 tokens) built offline from open-clip's vocab file.

    ``pad_token``: ``"<|endoftext|>"`` (id 49407) for SD 1.x and SDXL's first tokenizer,
    ``"!"`` (id 0) for SD 2.x and SDXL's second. Built in memory from the parsed file (cached per
    process), so no files are written; ``tokenizer.save_pretrained(folder)`` writes one out.
    """
    tokens, merges = _clip_bpe(str(Path(bpe_path) if bpe_path else _bpe_path()))
    vocab = {token: i for i, token in enumerate(tokens)}
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not in the CLIP vocabulary")
    tf = _transformers()
    return tf.CLIPTokenizer(
        vocab=vocab,
        merges=list(merges),
        unk_token=EOS,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=pad_token,
        model_max_length=model_max_length,
    )


def load_clip_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """A diffusers checkpoint's ``tokenizer``/``tokenizer_2`` folder (vocab.json + merges.txt
    or tokenizer.json), read locally; its ``tokenizer_config.json`` sets the pad token."""
    groups = (("vocab.json", "merges.txt"), ("tokenizer.json",))
    path = _check_tokenizer(folder, "CLIP", groups)
    return _transformers().CLIPTokenizer.from_pretrained(path, local_files_only=True)


# --------------------------------------------------------------------------- key conversion


def _split_layer(key: str, prefix: str) -> tuple[int, str] | None:
    """``prefix + "N.rest"`` -> (N, "rest"), or None when the key has no layer index."""
    index, _, rest = key[len(prefix) :].partition(".")
    return (int(index), rest) if index.isdigit() and rest else None


def _unknown(keys: list[str], layout: str) -> ValueError:
    return ValueError(f"unrecognised {layout} text-encoder layer key(s): {', '.join(keys)}")


def _hf_prefixed(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Accept transformers' flattened ``CLIPTextModel`` keys: add the ``text_model.`` prefix."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        flat = key.startswith(("embeddings.", "encoder.", "final_layer_norm."))
        name = "text_model." + key if flat else key
        if name in out:
            raise ValueError(f"{name} given twice (with and without the 'text_model.' prefix)")
        out[name] = value
    return out


def openclip_to_hf(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """OpenCLIP text tower -> ``(hf, extras)``.

    ``hf`` holds HF ``CLIPTextModelWithProjection`` keys (``text_model.`` prefixed): renamed
    tensors are the input tensors, q/k/v are row views of ``in_proj`` (no copies; clone them
    before saving with safetensors, which refuses shared storage), ``text_projection`` [D, P] is
    transposed into a Linear weight [P, D]. ``extras`` holds every other key unchanged
    (``logit_scale``, the recomputable ``attn_mask``, ``visual.*`` …). Unknown keys under
    ``transformer.resblocks.`` raise ValueError.
    """
    hf: dict[str, Tensor] = {}
    extras: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        layer = _split_layer(key, _OC_LAYERS) if key.startswith(_OC_LAYERS) else None
        if key in _TOP:
            hf[_TOP[key]] = value
        elif key == "text_projection":
            if value.ndim != 2:
                raise ValueError(f"text_projection must be [width, proj], got {value.shape}")
            hf[_PROJ] = value.T.contiguous()  # x @ P == Linear(weight=P.T)
        elif layer is None:
            if key.startswith(_OC_LAYERS):
                unknown.append(key)
            else:
                extras[key] = value
        elif layer[1] in _LAYER:
            hf[f"{_LAYERS}{layer[0]}.{_LAYER[layer[1]]}"] = value
        elif layer[1] in _IN_PROJ:
            if value.shape[0] % 3:
                raise ValueError(f"{key}: first dim {value.shape[0]} is not 3 x width")
            for name, part in zip(_QKV, value.chunk(3, dim=0), strict=True):  # rows [q; k; v]
                hf[f"{_LAYERS}{layer[0]}.self_attn.{name}_proj.{_IN_PROJ[layer[1]]}"] = part
        else:
            unknown.append(key)
    if unknown:
        raise _unknown(unknown, "OpenCLIP")
    return hf, extras


def hf_to_openclip(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """HF CLIP text keys (prefixed or flattened) -> ``(openclip, extras)``; inverse of
    :func:`openclip_to_hf`: q/k/v concatenated into ``in_proj``, ``text_projection.weight``
    transposed back. ``extras`` keeps other keys (e.g. the ``position_ids`` buffer) unchanged.
    """
    top = {hf: oc for oc, hf in _TOP.items()}
    layer_map = {hf: oc for oc, hf in _LAYER.items()}
    out: dict[str, Tensor] = {}
    extras: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    unknown: list[str] = []
    for key, value in _hf_prefixed(sd).items():
        layer = _split_layer(key, _LAYERS) if key.startswith(_LAYERS) else None
        match = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", layer[1]) if layer else None
        if key in top:
            out[top[key]] = value
        elif key == _PROJ:
            out["text_projection"] = value.T.contiguous()
        elif layer is None:
            if key.startswith(_LAYERS):
                unknown.append(key)
            else:
                extras[key] = value
        elif layer[1] in layer_map:
            out[f"{_OC_LAYERS}{layer[0]}.{layer_map[layer[1]]}"] = value
        elif match:
            qkv.setdefault((layer[0], match[2]), {})[match[1]] = value
        else:
            unknown.append(key)
    if unknown:
        raise _unknown(unknown, "HF CLIP")
    for (index, kind), parts in sorted(qkv.items()):
        missing = [f"{_LAYERS}{index}.self_attn.{n}_proj.{kind}" for n in _QKV if n not in parts]
        if missing:
            raise ValueError(f"cannot fuse in_proj_{kind}: missing {', '.join(missing)}")
        shapes = {tuple(parts[n].shape) for n in _QKV}
        if len(shapes) != 1:
            raise ValueError(f"layer {index} q/k/v {kind} shapes differ: {sorted(shapes)}")
        out[f"{_OC_LAYERS}{index}.attn.in_proj_{kind}"] = torch.cat([parts[n] for n in _QKV])
    return out, extras


# --------------------------------------------------------------------------- config and model


def _layer_index(key: str) -> int:
    """Encoder layer index of an HF key, -1 for keys outside the encoder layers."""
    parsed = _split_layer(key, _LAYERS) if key.startswith(_LAYERS) else None
    return parsed[0] if parsed else -1


def _layer_count(sd: Mapping[str, Tensor]) -> int:
    """Number of encoder layers; their indices must be exactly 0..N-1."""
    indices = {_layer_index(k) for k in sd} - {-1}
    if not indices:
        raise ValueError(f"no {_LAYERS}N.* keys: not a CLIP text encoder state dict")
    if indices != set(range(len(indices))):
        raise ValueError(f"encoder layer indices are not 0..N-1: {sorted(indices)}")
    return len(indices)


def _require(sd: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in sd:
        raise ValueError(f"missing {key}: not a CLIP text encoder state dict")
    return sd[key]


def clip_text_config(
    sd_hf: Mapping[str, Tensor],
    hidden_act: str,
    *,
    head_dim: int = 64,
    bos_token_id: int = BOS_ID,
    eos_token_id: int = EOS_ID,
    pad_token_id: int = EOS_ID,
) -> CLIPTextConfig:
    """``CLIPTextConfig`` inferred from HF-layout weights.

    ``hidden_act``: ``"quick_gelu"`` for OpenAI CLIP-L (SD 1.x, SDXL encoder 1), ``"gelu"`` for
    OpenCLIP (SD 2.x, SDXL encoder 2). Heads = hidden / ``head_dim`` (64 in all SD encoders).
    ``pad_token_id``: 49407 (``<|endoftext|>``) for SD 1.x / SDXL 1, 0 (``!``) for SD 2.x /
    SDXL 2. ``eos_token_id`` != 2, so HF pools at the first EOS token (as OpenCLIP's argmax does
    when EOS is the largest id). ``projection_dim`` comes from ``text_projection.weight``.
    """
    tf = _transformers()
    from transformers.activations import ACT2FN

    if hidden_act not in ACT2FN:
        raise ValueError(f"hidden_act {hidden_act!r} is not a transformers activation")
    sd = _hf_prefixed(sd_hf)
    vocab_size, hidden = _require(sd, _TOK).shape
    layers = _layer_count(sd)
    if hidden % head_dim:
        raise ValueError(f"hidden size {hidden} is not a multiple of head_dim {head_dim}")
    for name, token_id in (("bos", bos_token_id), ("eos", eos_token_id), ("pad", pad_token_id)):
        if not 0 <= token_id < vocab_size:
            raise ValueError(f"{name}_token_id {token_id} is outside the vocab of {vocab_size}")
    options = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": _require(sd, f"{_LAYERS}0.mlp.fc1.weight").shape[0],
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // head_dim,
        "max_position_embeddings": _require(sd, _POS).shape[0],
        "hidden_act": hidden_act,
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }
    if _PROJ in sd:
        options["projection_dim"] = sd[_PROJ].shape[0]
    return tf.CLIPTextConfig(**options)


def build_clip_text_model(
    sd_hf: Mapping[str, Tensor],
    config: CLIPTextConfig,
    with_projection: bool = False,
    dtype: torch.dtype = torch.float32,
    *,
    num_layers: int | None = None,
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """``CLIPTextModel`` (or ``…WithProjection``) holding ``sd_hf``'s tensors, in eval mode.

    Built on the meta device and filled with ``load_state_dict(assign=True)``: the model takes
    the given tensors (cast to ``dtype`` when they differ), never a second full copy. Strict:
    missing or unexpected keys and shape mismatches raise ValueError naming them. Ignored on
    purpose: ``position_ids`` (rebuilt as 0..L-1; some SD 1.x files hold corrupted copies) and,
    without ``with_projection``, ``text_projection.weight``.

    ``num_layers``: keep only the first N encoder layers (dropping the rest of ``sd_hf``).
    SD 2.x single files hold all 24 OpenCLIP layers: build them all (lossless) and encode with
    ``layer="penultimate", final_norm=True``, or pass ``num_layers=23`` to get diffusers'
    23-layer model and encode with ``layer="last"`` — both give the same states.
    """
    tf = _transformers()
    sd = _hf_prefixed(sd_hf)
    sd.pop(_POS_IDS, None)
    if not with_projection:
        sd.pop(_PROJ, None)
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        config = type(config).from_dict({**config.to_dict(), "num_hidden_layers": num_layers})
        sd = {k: v for k, v in sd.items() if _layer_index(k) < num_layers}
    cls = tf.CLIPTextModelWithProjection if with_projection else tf.CLIPTextModel
    with torch.device("meta"):
        model = cls(config)  # shapes only: no memory, no random init
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattens CLIPTextModel's keys
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    check_state_dict(model.state_dict(), sd, cls.__name__)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    # Non-persistent buffers stay on meta after assign: rebuild position_ids = [[0 .. L-1]].
    embeddings = getattr(model, "text_model", model).embeddings
    device = embeddings.token_embedding.weight.device
    positions = torch.arange(config.max_position_embeddings, device=device)
    embeddings.position_ids = positions.expand((1, -1))
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device: {names(left)}")
    return model.eval()


# --------------------------------------------------------------------------- prompt encoding


def encode_prompt_hidden(
    model: CLIPTextModel | CLIPTextModelWithProjection,
    input_ids: Tensor,
    layer: Literal["last", "penultimate"] = "last",
    final_norm: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """(token states [B, L, D], projected pooled ``text_embeds`` [B, P] or None), as diffusers'
    ``encode_prompt`` computes them (no attention mask; the causal mask hides the padding).

    * SD 1.x: ``layer="last", final_norm=True`` (= ``last_hidden_state``).
    * SD 2.x, all 24 layers: ``layer="penultimate", final_norm=True`` (OpenCLIP's
      ``layer="penultimate"``); diffusers' 23-layer model: ``layer="last", final_norm=True``.
    * SDXL, both encoders: ``layer="penultimate", final_norm=False`` (``hidden_states[-2]``).

    The second item is ``text_embeds`` (final norm of the LAST layer at the first EOS token,
    projected; SDXL's pooled vector from encoder 2) for ``CLIPTextModelWithProjection``, None
    for a plain ``CLIPTextModel`` (call the model for its ``pooler_output``). Runs with
    gradients unless the caller wraps it in ``torch.no_grad()``.
    """
    if layer not in ("last", "penultimate"):
        raise ValueError(f"layer must be 'last' or 'penultimate', got {layer!r}")
    config = model.config
    if layer == "penultimate" and config.num_hidden_layers < 2:
        raise ValueError("layer='penultimate' needs a model with at least 2 layers")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got {tuple(input_ids.shape)}")
    if config.eos_token_id != 2 and not (input_ids == config.eos_token_id).any(-1).all():
        raise ValueError(f"every row of input_ids needs the EOS id {config.eos_token_id} (pooling)")
    text_model = getattr(model, "text_model", model)
    ids = input_ids.to(text_model.embeddings.token_embedding.weight.device)
    want_states = layer == "penultimate" or not final_norm
    out = model(input_ids=ids, output_hidden_states=want_states)
    if layer == "last" and final_norm:
        tokens = out.last_hidden_state  # final_layer_norm(last layer)
    else:
        # hidden_states = (embeddings, layer 1, …, layer N), none of them normalised.
        tokens = out.hidden_states[-1 if layer == "last" else -2]
        if final_norm:
            tokens = text_model.final_layer_norm(tokens)
    pooled = out.text_embeds if hasattr(model, "text_projection") else None
    return tokens, pooled


def hf_state(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A CLIP text model's tensors under the canonical ``text_model.``-prefixed HF keys (as in
    SD single files and diffusers folders), without the ``position_ids`` buffer."""
    return {k: v for k, v in _hf_prefixed(sd).items() if k != _POS_IDS}


def layer_count(sd: Mapping[str, Tensor]) -> int:
    """Number of encoder layers of an HF-layout CLIP text state dict."""
    return _layer_count(_hf_prefixed(sd))
