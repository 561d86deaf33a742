"""CLIP text encoders of SD checkpoints: tokenizer, OpenCLIP <-> HF keys, model, prompt encoding.

The oracle for the converted model is an OpenCLIP text forward written here from plain
``torch.nn`` pieces; the oracle for the tokenizer is a small BPE implementation reading
open-clip's vocab file directly; diffusers' ``encode_prompt`` is the oracle for the SD recipes.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

tf = pytest.importorskip("transformers")
regex = pytest.importorskip("regex")
_ = (tf.CLIPTextConfig, tf.CLIPTextModel, tf.CLIPTokenizer)  # resolve lazy imports at collection
try:  # diffusers' encode_prompt is the oracle for the SD recipes (a test-only dependency)
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
        StableDiffusionXLPipeline,
    )
except ImportError:
    StableDiffusionPipeline = StableDiffusionXLPipeline = None

from ldmkit.interop.clip import (  # noqa: E402
    build_clip_text_model,
    clip_text_config,
    clip_tokenizer,
    encode_prompt_hidden,
    hf_to_openclip,
    load_clip_tokenizer,
    openclip_to_hf,
)

VOCAB, CTX, BOS, EOS = 64, 16, 62, 63  # tiny vocab: EOS is its largest id, as in CLIP
TOKEN_IDS = {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": 0}


def _bpe_file() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open-clip-torch (for its BPE vocab file) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


# --------------------------------------------------------------------------- fixtures


def tiny_openclip(
    width: int = 128, layers: int = 3, vocab: int = VOCAB, ctx: int = CTX, proj: int = 48, seed=0
) -> dict[str, torch.Tensor]:
    """Random OpenCLIP text tower (+ the extras a checkpoint carries), fixed seed."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.1, shift: float = 0.0) -> torch.Tensor:
        return shift + scale * torch.randn(*shape, generator=g)

    w, s = width, width**-0.5
    sd = {"token_embedding.weight": rand(vocab, w, scale=0.5), "positional_embedding": rand(ctx, w)}
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        sd |= {
            p + "ln_1.weight": rand(w, shift=1.0),
            p + "ln_1.bias": rand(w),
            p + "attn.in_proj_weight": rand(3 * w, w, scale=s),
            p + "attn.in_proj_bias": rand(3 * w),
            p + "attn.out_proj.weight": rand(w, w, scale=s),
            p + "attn.out_proj.bias": rand(w),
            p + "ln_2.weight": rand(w, shift=1.0),
            p + "ln_2.bias": rand(w),
            p + "mlp.c_fc.weight": rand(4 * w, w, scale=s),
            p + "mlp.c_fc.bias": rand(4 * w),
            p + "mlp.c_proj.weight": rand(w, 4 * w, scale=s / 2),
            p + "mlp.c_proj.bias": rand(w),
        }
    sd |= {
        "ln_final.weight": rand(w, shift=1.0),
        "ln_final.bias": rand(w),
        "text_projection": rand(w, proj, scale=s),
        "logit_scale": torch.tensor(4.6052),
        "attn_mask": torch.full((ctx, ctx), float("-inf")).triu(1),
        "visual.proj": rand(32, proj),
    }
    return sd


def prompt_ids(pad: int, lengths=(5, 11), ctx: int = CTX, seed: int = 1) -> torch.Tensor:
    """[BOS, random tokens, EOS, pad …] rows, like a tokenizer padding to ``ctx``."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        body = torch.randint(1, BOS, (n,), generator=g).tolist()
        rows.append([BOS, *body, EOS] + [pad] * (ctx - n - 2))
    return torch.tensor(rows)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


@torch.no_grad()
def reference_openclip(sd, ids, act: str, heads: int):
    """OpenCLIP text tower from nn pieces: per-layer outputs, ln_final, projected EOS pooling."""
    width = sd["token_embedding.weight"].shape[1]
    n_layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    length = ids.shape[1]
    x = F.embedding(ids, sd["token_embedding.weight"]) + sd["positional_embedding"][:length]
    causal = torch.full((length, length), float("-inf")).triu(1)

    def norm(prefix: str) -> nn.LayerNorm:
        ln = nn.LayerNorm(width, eps=1e-5)
        ln.load_state_dict({"weight": sd[prefix + ".weight"], "bias": sd[prefix + ".bias"]})
        return ln

    states = []
    for i in range(n_layers):
        p = f"transformer.resblocks.{i}."
        attn = nn.MultiheadAttention(width, heads, batch_first=True).eval()
        attn.load_state_dict({k: sd[p + "attn." + k] for k in attn.state_dict()})
        mlp = nn.Sequential(
            nn.Linear(width, 4 * width),
            nn.GELU() if act == "gelu" else QuickGELU(),
            nn.Linear(4 * width, width),
        )
        mlp.load_state_dict(
            {
                f"{j}.{t}": sd[f"{p}mlp.{name}.{t}"]
                for j, name in ((0, "c_fc"), (2, "c_proj"))
                for t in ("weight", "bias")
            }
        )
        h = norm(p + "ln_1")(x)
        x = x + attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        x = x + mlp(norm(p + "ln_2")(x))
        states.append(x)
    ln_final = norm("ln_final")
    eos_at = ids.argmax(dim=-1)  # OpenCLIP pools at the largest id (EOS)
    pooled = ln_final(x)[torch.arange(len(ids)), eos_at] @ sd["text_projection"]
    return states, ln_final, pooled


def make_model(sd_oc, act="gelu", with_projection=True, **build):
    hf, _ = openclip_to_hf(sd_oc)
    config = clip_text_config(hf, act, **TOKEN_IDS)
    return build_clip_text_model(hf, config, with_projection, **build)


# --------------------------------------------------------------------------- key conversion


def test_openclip_round_trip_is_identical_and_copies_nothing():
    sd = tiny_openclip()
    hf, extras = openclip_to_hf(sd)
    assert set(extras) == {"logit_scale", "attn_mask", "visual.proj"}
    assert all(extras[k] is sd[k] for k in extras)
    assert not any("logit_scale" in k or "attn_mask" in k for k in hf)
    assert hf["text_projection.weight"].shape == (48, 128)
    assert torch.equal(hf["text_projection.weight"], sd["text_projection"].T)
    # q/k/v are row views of in_proj: no copy of the attention weights.
    q = hf["text_model.encoder.layers.1.self_attn.q_proj.weight"]
    assert q.data_ptr() == sd["transformer.resblocks.1.attn.in_proj_weight"].data_ptr()
    back, extras_back = hf_to_openclip(hf)
    assert extras_back == {}
    assert set(back) == set(sd) - set(extras)
    for key, value in back.items():
        assert value.dtype == sd[key].dtype and torch.equal(value, sd[key]), key


def test_hf_round_trip_accepts_flattened_keys_and_keeps_position_ids_aside():
    sd = {k: v.half() for k, v in tiny_openclip().items()}
    hf, _ = openclip_to_hf(sd)
    hf["text_model.embeddings.position_ids"] = torch.arange(CTX)[None]
    oc, extras = hf_to_openclip(hf)
    assert list(extras) == ["text_model.embeddings.position_ids"]
    again, _ = openclip_to_hf(oc)
    assert set(again) == set(hf) - set(extras)
    for key, value in again.items():
        assert value.dtype == torch.float16 and torch.equal(value, hf[key]), key
    # transformers >= 5.6 writes CLIPTextModel keys without the "text_model." prefix.
    flat = {k.removeprefix("text_model."): v for k, v in hf.items()}
    oc_flat, _ = hf_to_openclip(flat)
    assert set(oc_flat) == set(oc) and all(torch.equal(oc_flat[k], oc[k]) for k in oc)


def test_conversion_errors_name_the_keys():
    sd = tiny_openclip(layers=1)
    sd["transformer.resblocks.0.ls_1.gamma"] = torch.ones(128)
    with pytest.raises(ValueError, match=r"transformer\.resblocks\.0\.ls_1\.gamma"):
        openclip_to_hf(sd)
    hf, _ = openclip_to_hf(tiny_openclip(layers=1))
    del hf["text_model.encoder.layers.0.self_attn.k_proj.bias"]
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.k_proj\.bias"):
        hf_to_openclip(hf)
    hf, _ = openclip_to_hf(tiny_openclip(layers=1))
    with pytest.raises(ValueError, match="given twice"):
        hf_to_openclip({**hf, "final_layer_norm.bias": hf["text_model.final_layer_norm.bias"]})


# --------------------------------------------------------------------------- config


def test_config_is_inferred_from_the_weights():
    hf, _ = openclip_to_hf(tiny_openclip())
    config = clip_text_config(hf, "gelu", **TOKEN_IDS)
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (128, 3, 512)
    assert (config.num_attention_heads, config.vocab_size, config.max_position_embeddings) == (
        2,
        VOCAB,
        CTX,
    )
    assert (config.projection_dim, config.hidden_act, config.layer_norm_eps) == (48, "gelu", 1e-5)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (BOS, EOS, 0)
    assert clip_text_config(hf, "quick_gelu", head_dim=32, **TOKEN_IDS).num_attention_heads == 4
    full, _ = openclip_to_hf(tiny_openclip(width=64, layers=1, vocab=49408, ctx=77))
    real = clip_text_config(full, "quick_gelu")  # CLIP's own ids; SD 1.x pads with EOS
    assert (real.bos_token_id, real.eos_token_id, real.pad_token_id) == (49406, 49407, 49407)


def test_config_errors():
    hf, _ = openclip_to_hf(tiny_openclip())
    with pytest.raises(ValueError, match="head_dim 48"):
        clip_text_config(hf, "gelu", head_dim=48, **TOKEN_IDS)
    with pytest.raises(ValueError, match="'swish2'"):
        clip_text_config(hf, "swish2", **TOKEN_IDS)
    with pytest.raises(ValueError, match="bos_token_id 49406 is outside"):
        clip_text_config(hf, "gelu")  # the tiny vocab has no id 49407
    gap = {k: v for k, v in hf.items() if ".layers.1." not in k}
    with pytest.raises(ValueError, match=r"not 0\.\.N-1: \[0, 2\]"):
        clip_text_config(gap, "gelu", **TOKEN_IDS)


# --------------------------------------------------------------------------- model


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_converted_model_matches_openclip_reference(act):
    sd = tiny_openclip()
    model = make_model(sd, act)
    for pad in (0, EOS):  # "!"-padding (SD 2.x, SDXL 2) and EOS-padding (SD 1.x, SDXL 1)
        ids = prompt_ids(pad)
        states, ln_final, pooled = reference_openclip(sd, ids, act, heads=2)
        expected = {
            ("last", True): ln_final(states[-1]),  # SD 1.x
            ("penultimate", True): ln_final(states[-2]),  # SD 2.x (OpenCLIP "penultimate")
            ("penultimate", False): states[-2],  # SDXL
            ("last", False): states[-1],
        }
        with torch.no_grad():
            for (layer, final_norm), want in expected.items():
                tokens, text_embeds = encode_prompt_hidden(model, ids, layer, final_norm)
                assert tokens.shape == (2, CTX, 128)
                torch.testing.assert_close(tokens, want, atol=1e-5, rtol=0)
                torch.testing.assert_close(text_embeds, pooled, atol=1e-5, rtol=0)


def test_sd2_penultimate_of_all_layers_equals_diffusers_truncated_model():
    sd = tiny_openclip()
    ids = prompt_ids(0)
    full = make_model(sd, with_projection=False)
    short = make_model(sd, with_projection=False, num_layers=2)
    assert short.config.num_hidden_layers == 2 and len(short.encoder.layers) == 2
    # diffusers' SD 2.x folder: the last OpenCLIP layer is absent from the weights altogether.
    hf, _ = openclip_to_hf({k: v for k, v in sd.items() if ".resblocks.2." not in k})
    folder = build_clip_text_model(hf, clip_text_config(hf, "gelu", **TOKEN_IDS))
    with torch.no_grad():
        want, none = encode_prompt_hidden(full, ids, "penultimate", final_norm=True)
        assert none is None  # no projection -> no pooled vector
        for model in (short, folder):
            got, _ = encode_prompt_hidden(model, ids, "last", final_norm=True)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_build_shares_tensors_materialises_buffers_and_casts():
    sd = tiny_openclip(layers=2)
    hf, _ = openclip_to_hf(sd)
    hf["text_model.embeddings.position_ids"] = torch.rand(1, CTX) * 80  # corrupted, ignored
    config = clip_text_config(hf, "gelu", **TOKEN_IDS)
    model = build_clip_text_model(hf, config, with_projection=True)
    assert not model.training
    tensors = [*model.parameters(), *model.buffers()]
    assert not any(t.is_meta for t in tensors)
    emb = model.text_model.embeddings
    assert torch.equal(emb.position_ids, torch.arange(CTX)[None])
    assert emb.token_embedding.weight.data_ptr() == sd["token_embedding.weight"].data_ptr()
    q = model.text_model.encoder.layers[0].self_attn.q_proj.weight
    assert q.data_ptr() == sd["transformer.resblocks.0.attn.in_proj_weight"].data_ptr()
    half = build_clip_text_model(hf, config, dtype=torch.bfloat16)  # plain CLIPTextModel
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert not hasattr(half, "text_projection")


def test_build_errors_name_keys_and_shapes():
    hf, _ = openclip_to_hf(tiny_openclip(layers=2))
    config = clip_text_config(hf, "gelu", **TOKEN_IDS)
    broken = {k: v for k, v in hf.items() if not k.endswith("layers.1.mlp.fc2.bias")}
    with pytest.raises(ValueError, match=r"missing keys: .*layers\.1\.mlp\.fc2\.bias"):
        build_clip_text_model(broken, config)
    with pytest.raises(ValueError, match=r"unexpected keys: .*text_model\.pooler\.weight"):
        build_clip_text_model({**hf, "text_model.pooler.weight": torch.ones(1)}, config, True)
    wrong = {**hf, "text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(500, 128)}
    with pytest.raises(
        ValueError, match=r"fc1\.weight: checkpoint \(500, 128\) vs model \(512, 128\)"
    ):
        build_clip_text_model(wrong, config)
    no_proj = {k: v for k, v in hf.items() if k != "text_projection.weight"}
    with pytest.raises(ValueError, match=r"missing keys: text_projection\.weight"):
        build_clip_text_model(no_proj, config, with_projection=True)
    with pytest.raises(ValueError, match=r"missing keys: .*layers\.2\."):
        build_clip_text_model(hf, config, num_layers=3)


def test_encode_errors():
    model = make_model(tiny_openclip(layers=1), with_projection=False)
    ids = prompt_ids(0)
    with pytest.raises(ValueError, match="'middle'"):
        encode_prompt_hidden(model, ids, "middle", True)
    with pytest.raises(ValueError, match="at least 2 layers"):
        encode_prompt_hidden(model, ids, "penultimate", True)
    with pytest.raises(ValueError, match="EOS id 63"):
        encode_prompt_hidden(model, ids.clamp(max=EOS - 1), "last", True)


# --------------------------------------------------------------------------- tokenizer


class ReferenceBPE:
    """CLIP's byte-level BPE, straight from the gzipped merges file (independent oracle)."""

    def __init__(self, path: Path):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            self.merge_lines = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
        self.ranks = {tuple(line.split()): r for r, line in enumerate(self.merge_lines)}
        # Bytes that print as themselves keep their code point; the others map to 256, 257, …
        keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
        moved = [b for b in range(256) if b not in keep]
        self.byte_char = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(moved)}
        alphabet = [self.byte_char[b] for b in keep + moved]
        tokens = alphabet + [c + "</w>" for c in alphabet]
        tokens += ["".join(line.split()) for line in self.merge_lines]
        tokens += ["<|startoftext|>", "<|endoftext|>"]
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.pattern = regex.compile(
            r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
        )

    def word(self, word: str) -> list[str]:
        if word in ("<|startoftext|>", "<|endoftext|>"):
            return [word]  # special tokens are never split
        parts = [self.byte_char[b] for b in word.encode("utf-8")]
        parts[-1] += "</w>"
        while len(parts) > 1:
            pairs = [
                (self.ranks.get((parts[i], parts[i + 1]), 1 << 30), i)
                for i in range(len(parts) - 1)
            ]
            rank, i = min(pairs)
            if rank == 1 << 30:
                break
            first, second = parts[i], parts[i + 1]
            merged, j = [], 0
            while j < len(parts):  # merge every occurrence of the best pair, left to right
                if j + 1 < len(parts) and parts[j] == first and parts[j + 1] == second:
                    merged.append(first + second)
                    j += 2
                else:
                    merged.append(parts[j])
                    j += 1
            parts = merged
        return parts

    def encode(self, text: str) -> list[str]:
        text = " ".join(text.split()).lower()
        pieces = [p for w in self.pattern.findall(text) for p in self.word(w)]
        return [49406, *(self.vocab[p] for p in pieces), 49407]


@pytest.fixture(scope="module")
def reference_bpe() -> ReferenceBPE:
    return ReferenceBPE(_bpe_file())


def test_tokenizer_matches_known_ids_and_reference_bpe(reference_bpe):
    tok = clip_tokenizer()
    assert len(tok) == len(reference_bpe.vocab) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    prompts = [
        "a photo of a cat",
        "An astronaut riding a horse on Mars, 4k,   highly-detailed!!",
        "don't stop: 1234 apples & oranges (ukiyo-e) <|endoftext|>",
        "naïve café, Zürich — 東京",
    ]
    for prompt in prompts:
        assert tok(prompt).input_ids == reference_bpe.encode(prompt), prompt


def test_tokenizer_padding_and_truncation():
    for pad, pad_id in (("<|endoftext|>", 49407), ("!", 0)):
        tok = clip_tokenizer(pad)
        assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (pad_id, 49406, 49407)
        batch = tok(
            ["a photo of a cat", "cat " * 100],
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        assert batch.shape == (2, 77)
        assert batch[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
        assert (batch[0, 7:] == pad_id).all()
        assert batch[1, 0] == 49406 and batch[1, -1] == 49407 and (batch[1, 1:-1] == 2368).all()
    assert clip_tokenizer(model_max_length=64).model_max_length == 64
    with pytest.raises(ValueError, match="'<pad>'"):
        clip_tokenizer("<pad>")


def test_load_clip_tokenizer_from_a_diffusers_folder(tmp_path, reference_bpe):
    folder = tmp_path / "tokenizer_2"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(reference_bpe.vocab), encoding="utf-8")
    merges = "\n".join(["#version: 0.2", *reference_bpe.merge_lines]) + "\n"
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "!"}))
    tok = load_clip_tokenizer(folder)
    prompt = "A majestic lion jumping from a big stone at night"
    assert tok(prompt).input_ids == clip_tokenizer("!")(prompt).input_ids
    assert tok.pad_token_id == 0
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_clip_tokenizer(tmp_path / "missing")


# --------------------------------------------------------------------------- diffusers oracle


@pytest.mark.skipif(StableDiffusionXLPipeline is None, reason="diffusers is not installed")
def test_sdxl_and_sd_recipes_match_diffusers_encode_prompt():
    """diffusers' own encode_prompt (called on a stand-in pipeline object) is the oracle."""
    real = {"vocab": 49408, "ctx": 77}
    hf1, _ = openclip_to_hf(tiny_openclip(width=64, layers=2, seed=3, **real))
    hf2, _ = openclip_to_hf(tiny_openclip(width=128, layers=3, proj=32, seed=4, **real))
    enc1 = build_clip_text_model(hf1, clip_text_config(hf1, "quick_gelu"))
    enc2 = build_clip_text_model(hf2, clip_text_config(hf2, "gelu", pad_token_id=0), True)
    tok1, tok2 = clip_tokenizer(), clip_tokenizer("!")
    prompts = ["a photo of a cat", "an astronaut riding a horse, highly detailed"]
    pipe = SimpleNamespace(
        tokenizer=tok1,
        tokenizer_2=tok2,
        text_encoder=enc1,
        text_encoder_2=enc2,
        config=SimpleNamespace(force_zeros_for_empty_prompt=True),
    )
    with torch.no_grad():
        want, _, want_pooled, _ = StableDiffusionXLPipeline.encode_prompt(
            pipe, prompts, device=torch.device("cpu"), do_classifier_free_guidance=False
        )
        states = []
        for tok, enc in ((tok1, enc1), (tok2, enc2)):
            ids = tok(prompts, padding="max_length", max_length=77, truncation=True).input_ids
            tokens, pooled = encode_prompt_hidden(enc, torch.tensor(ids), "penultimate", False)
            states.append(tokens)
        torch.testing.assert_close(torch.cat(states, dim=-1), want, atol=0, rtol=0)
        torch.testing.assert_close(pooled, want_pooled, atol=0, rtol=0)
        # SD 1.x: last hidden state after the final layer norm.
        sd1 = SimpleNamespace(tokenizer=tok1, text_encoder=enc1)
        want_sd1, _ = StableDiffusionPipeline.encode_prompt(
            sd1, prompts, torch.device("cpu"), 1, False
        )
        ids = tok1(prompts, padding="max_length", max_length=77, truncation=True).input_ids
        got_sd1, _ = encode_prompt_hidden(enc1, torch.tensor(ids), "last", True)
        torch.testing.assert_close(got_sd1, want_sd1, atol=0, rtol=0)
