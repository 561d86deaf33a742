"""Stable Diffusion checkpoints: parity of whole pipelines with diffusers, conversions, errors.

Tiny random-weight models with the real SD 1.5, SD 2.1-v and SDXL block layouts (small
channel counts) are built in diffusers, saved as diffusers folders, loaded by ldmkit, and run
side by side on identical inputs; then written back in every format and re-read by both.
"""

from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from ldmkit.interop.clip import clip_tokenizer  # noqa: E402
from ldmkit.interop.convert import convert, save_diffusers, save_single_file  # noqa: E402
from ldmkit.interop.files import CheckpointFormatError  # noqa: E402
from ldmkit.interop.load import load_stable_diffusion  # noqa: E402
from ldmkit.interop.modules import StateDictMismatch  # noqa: E402

PROMPTS = ["a red fox in the snow"]
NEGATIVE = ["blurry"]


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (diffusers zero-inits output layers, which would hide errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm_scale = p.ndim == 1 and "norm" in name and name.endswith("weight")
            p.copy_(1 + 0.1 * noise if is_norm_scale else 0.05 * noise)
    return module.eval()


def _clip(hidden_act: str, hidden: int = 64, projection: int | None = None, seed: int = 0):
    cfg = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=hidden // 64, max_position_embeddings=77, hidden_act=hidden_act,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1, projection_dim=projection or hidden,
    )  # fmt: skip
    torch.manual_seed(seed)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return randomize(cls(cfg), seed)


def _vae(scaling: float):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=scaling,
        sample_size=64,
    )  # fmt: skip
    return randomize(vae, 1)


def _scheduler(prediction: str):
    return diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, prediction_type=prediction,
    )  # fmt: skip


def sd_pipeline(kind: str):
    """A tiny diffusers pipeline with the block layout of ``kind`` (sd15, sd21v, sdxl)."""
    torch.manual_seed(0)
    if kind == "sdxl":
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 64, 128),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 1, 2),
            cross_attention_dim=128, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=6 * 256 + 32,
        )  # fmt: skip
        return diffusers.StableDiffusionXLPipeline(
            vae=_vae(0.13025), unet=randomize(unet, 2),
            text_encoder=_clip("quick_gelu", seed=3), tokenizer=clip_tokenizer(),
            text_encoder_2=_clip("gelu", projection=32, seed=4),
            tokenizer_2=clip_tokenizer(pad_token="!"), scheduler=_scheduler("epsilon"),
        )  # fmt: skip
    v = kind == "sd21v"
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(2, 4, 8, 8) if v else 8, cross_attention_dim=64,
        use_linear_projection=v, upcast_attention=v,
    )  # fmt: skip
    return diffusers.StableDiffusionPipeline(
        vae=_vae(0.18215), unet=randomize(unet, 2),
        text_encoder=_clip("gelu" if v else "quick_gelu", seed=3),
        tokenizer=clip_tokenizer(pad_token="!" if v else "<|endoftext|>"),
        scheduler=_scheduler("v_prediction" if v else "epsilon"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def make_pair(kind: str, tmp_path_factory):
    """(kind, diffusers pipeline, its folder, ldmkit pipeline loaded from that folder)."""
    built = sd_pipeline(kind)
    folder = tmp_path_factory.mktemp(kind) / "diffusers"
    built.save_pretrained(folder)
    ref = type(built).from_pretrained(folder, local_files_only=True)
    return kind, ref, folder, load_stable_diffusion(folder)


@pytest.fixture(scope="module", params=["sd15", "sd21v", "sdxl"])
def pair(request, tmp_path_factory):
    return make_pair(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """For checks whose code path does not depend on the family."""
    return make_pair("sd15", tmp_path_factory)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_ten_step_pipeline_matches_diffusers(pair, sampler):
    kind, ref, _, pipe = pair
    ref.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(ref.scheduler.config)
    size = 64
    kw = dict(num_inference_steps=10, guidance_scale=5.0, height=size, width=size)
    expected = ref(
        PROMPTS, negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(7),
        output_type="latent", **kw,
    ).images  # fmt: skip
    got = pipe(
        PROMPTS, negative_prompt=NEGATIVE, steps=10, sampler=sampler, guidance=5.0, seed=7,
        height=size, width=size, output="latent", progress=False,
    )  # fmt: skip
    assert rel(got, expected) <= 1e-4, (kind, sampler, rel(got, expected))


def test_unet_vae_and_text_encoders_match(pair):
    kind, ref, _, pipe = pair
    g = torch.Generator().manual_seed(0)
    ctx_dim = ref.unet.config.cross_attention_dim
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, ctx_dim, generator=g)
    t = torch.tensor([999, 10])
    with torch.no_grad():
        kwargs, y = {}, None
        if kind == "sdxl":
            pooled, ids = (
                torch.randn(2, 32, generator=g),
                torch.tensor([[64, 64, 0, 0, 64, 64]] * 2),
            )
            kwargs = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
            y = pipe._size_vector(pooled, (64, 64, 0, 0, 64, 64))
        expected = ref.unet(x, t, encoder_hidden_states=ctx, **kwargs).sample
        assert (pipe.unet(x, t, ctx, y) - expected).abs().max() <= 1e-5
        img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
        moments = ref.vae.encode(img).latent_dist
        assert (pipe.vae.encode(img, scaled=False) - moments.mean).abs().max() <= 1e-5
        z = torch.randn(1, 4, 8, 8, generator=g)
        assert (pipe.vae.decode(z, scaled=False) - ref.vae.decode(z).sample).abs().max() <= 1e-5
        ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")
        assert torch.equal(pipe.text_encoder(ids.input_ids)[0], ref.text_encoder(ids.input_ids)[0])


def test_seed_draws_diffusers_initial_noise(pair):
    _, ref, _, pipe = pair
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    seen = {}
    pipe(PROMPTS, steps=2, sampler="ddim", seed=11, height=64, width=64, output="latent",
         progress=False, callback=lambda d: seen.setdefault("x", d["x"].clone()))  # fmt: skip
    expected = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(11))
    vp = seen["x"] / (1 + float(pipe.sigmas("ddim", 2, "diffusers")[0][0]) ** 2) ** 0.5
    assert torch.allclose(vp, expected, atol=1e-6)


def test_round_trips_are_lossless_and_diffusers_reads_ldmkit_output(pair, tmp_path):
    kind, ref, folder, pipe = pair
    single = save_single_file(pipe, tmp_path / "model.safetensors")
    back = load_stable_diffusion(single)
    for a, b in [
        (pipe.unet, back.unet),
        (pipe.vae, back.vae),
        *zip(pipe.text_encoders, back.text_encoders, strict=True),
    ]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # single file -> diffusers -> single file: identical tensors
    again = convert(convert(single, tmp_path / "d2", to="diffusers"), tmp_path / "s2.safetensors",
                    to="single-file")  # fmt: skip
    from safetensors.torch import load_file

    first, second = load_file(single), load_file(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    # ldmkit's diffusers folder loads in diffusers with identical UNet weights
    written = save_diffusers(pipe, tmp_path / "from_ldmkit")
    cls = type(ref)
    loaded = cls.from_pretrained(written, local_files_only=True)
    for k, v in ref.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[k], v), k
    # ldmkit export round trip
    exported = convert(single, tmp_path / "ldm", to="ldmkit")
    again = load_stable_diffusion(exported)
    assert all(
        torch.equal(v, again.unet.state_dict()[k]) for k, v in pipe.unet.state_dict().items()
    )


def test_diffusers_from_single_file_reads_ldmkit_single_file(pair, tmp_path):
    kind, ref, folder, pipe = pair

    single = save_single_file(pipe, tmp_path / "model.safetensors")
    loaded = type(ref).from_single_file(str(single), config=str(folder), local_files_only=True)
    for k, v in ref.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[k], v), k
    for k, v in ref.vae.state_dict().items():
        assert torch.equal(loaded.vae.state_dict()[k], v), k


def test_bad_input_is_named(tmp_path, pair):
    kind, ref, folder, pipe = pair
    single = save_single_file(pipe, tmp_path / "m.safetensors")
    data = single.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        load_stable_diffusion(tmp_path / "cut.safetensors")
    torch.save({"state_dict": {"a": torch.zeros(1)}}, tmp_path / "m.ckpt")
    with pytest.raises(CheckpointFormatError, match="allow_pickle"):
        load_stable_diffusion(tmp_path / "m.ckpt")
    from safetensors.torch import load_file, save_file

    state = load_file(single)
    key = next(k for k in state if k.startswith("model.diffusion_model.out.2.weight"))
    state[key] = state[key][:, :2].contiguous()
    save_file(state, tmp_path / "bad.safetensors", metadata={"format": "pt"})
    with pytest.raises((StateDictMismatch, ValueError), match="out.2.weight"):
        load_stable_diffusion(tmp_path / "bad.safetensors")
    meta = json.loads((folder / "model_index.json").read_text())
    assert meta["_class_name"].startswith("StableDiffusion")


def test_sizes_that_are_multiples_of_8_only_match_diffusers(pair):
    kind, ref, _, pipe = pair
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    h, w = 72, 88  # latents 9 x 11: not multiples of the UNet's downsampling
    expected = ref(
        PROMPTS, num_inference_steps=4, guidance_scale=3.0, height=h, width=w,
        generator=torch.Generator().manual_seed(1), output_type="latent",
    ).images  # fmt: skip
    got = pipe(PROMPTS, steps=4, sampler="ddim", guidance=3.0, seed=1, height=h, width=w,
               output="latent", progress=False)  # fmt: skip
    assert got.shape == expected.shape == (1, 4, 9, 11)
    assert rel(got, expected) <= 1e-4


def test_bf16_keeps_the_vae_in_fp32_and_stays_close(pair):
    kind, _, folder, pipe = pair
    low = load_stable_diffusion(folder, dtype=torch.bfloat16)
    assert next(low.unet.parameters()).dtype == torch.bfloat16
    assert next(low.vae.parameters()).dtype == torch.float32
    kw = dict(steps=4, sampler="euler", guidance=3.0, seed=0, height=64, width=64, progress=False)
    exact = pipe(PROMPTS, output="tensor", **kw)
    approx = low(PROMPTS, output="tensor", **kw)
    assert torch.isfinite(approx).all()
    assert (approx - exact).abs().mean() < 0.05  # bf16 has 8 mantissa bits


def test_cli_converts_and_samples(pair, tmp_path):
    from ldmkit.cli import main

    kind, _, folder, _ = pair
    single = tmp_path / "m.safetensors"
    assert main(["convert", str(folder), str(single), "--to", "single-file"]) == 0
    out = tmp_path / "img.png"
    args = ["sample", "--checkpoint", str(single), "--prompt", "a fox", "--steps", "2"]
    assert main([*args, "--height", "64", "--width", "64", "--out", str(out)]) == 0
    assert out.is_file()
    assert main(["convert", str(single), str(tmp_path / "d"), "--to", "diffusers"]) == 0
    assert main(["convert", str(single), str(tmp_path / "d"), "--to", "diffusers"]) == 2


def test_inpainting_checkpoint_runs_text_to_image(tmp_path):
    ref = sd_pipeline("sd15")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**{**ref.unet.config, "in_channels": 9})
    ref.unet = randomize(unet, 5)
    ref.register_modules(unet=ref.unet)
    ref.save_pretrained(tmp_path / "inpaint")
    pipe = load_stable_diffusion(tmp_path / "inpaint")
    assert pipe.family.name == "sd1-inpaint" and pipe.unet.config.concat_channels == 5
    images = pipe(PROMPTS, steps=2, sampler="euler", height=64, width=64, progress=False)
    assert images[0].size == (64, 64)
    single = save_single_file(pipe, tmp_path / "inpaint.safetensors")
    assert load_stable_diffusion(single).family.name == "sd1-inpaint"


def test_foreign_single_file_needs_a_family_for_unreleased_sizes(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    kind, _, _, pipe = pair
    bare = tmp_path / "bare.safetensors"  # no ldmkit metadata, as a file from elsewhere
    save_file(load_file(save_single_file(pipe, tmp_path / "m.safetensors")), bare)
    with pytest.raises(ValueError, match="context"):
        load_stable_diffusion(bare)  # tiny sizes match no release: the error says what it saw
    family = {"sd15": "sd1", "sd21v": "sd2-v", "sdxl": "sdxl"}[kind]
    loaded = load_stable_diffusion(bare, family=family)
    assert loaded.family.name == family and any("sizes" in n for n in loaded.notes)
    sa, sb = pipe.unet.state_dict(), loaded.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    if kind == "sd21v":
        eps = load_stable_diffusion(bare, family="sd2-v", prediction="eps")
        assert eps.scheduler.prediction == "eps" and eps.family.name == "sd2"


def test_lone_unet_and_vae_files_in_either_layout(pair, tmp_path):
    from safetensors.torch import save_file

    from ldmkit.interop.load import load_unet, load_vae

    kind, ref, folder, pipe = pair
    family = {"sd15": "sd1", "sd21v": "sd2-v", "sdxl": "sdxl"}[kind]
    save_file(dict(ref.unet.state_dict()), tmp_path / "unet.safetensors")  # diffusers keys
    save_file(pipe.unet.state_dict(), tmp_path / "unet_ldm.safetensors")  # original keys
    heads = {"num_head_channels": 16} if kind != "sd15" else {"family": family}
    for name in ("unet.safetensors", "unet_ldm.safetensors"):
        unet = load_unet(tmp_path / name, **heads)
        assert all(torch.equal(v, unet.state_dict()[k]) for k, v in pipe.unet.state_dict().items())
    unet = load_unet(folder / "unet")  # a diffusers unet/ folder: its config.json decides
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in pipe.unet.state_dict().items())
    save_file(dict(ref.vae.state_dict()), tmp_path / "vae.safetensors")
    vae = load_vae(tmp_path / "vae.safetensors")
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in pipe.vae.state_dict().items())
    with pytest.raises(CheckpointFormatError, match="only a UNet"):
        load_stable_diffusion(tmp_path / "unet_ldm.safetensors")


def test_every_sampler_runs_a_checkpoint(sd15):
    from ldmkit.samplers import SAMPLERS

    kind, _, _, pipe = sd15
    for name in SAMPLERS:
        for schedule in ("diffusers", "karras"):
            out = pipe(PROMPTS, steps=3, sampler=name, schedule=schedule, seed=0, height=64,
                       width=64, output="latent", progress=False)  # fmt: skip
            assert torch.isfinite(out).all(), (name, schedule)


def test_missing_and_unexpected_keys_are_named(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, _, pipe = pair
    state = load_file(save_single_file(pipe, tmp_path / "m.safetensors"))
    state.pop("model.diffusion_model.out.0.weight")
    state["model.diffusion_model.input_blocks.0.0.extra"] = torch.zeros(1)
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match="out.0.weight") as err:
        load_stable_diffusion(tmp_path / "broken.safetensors", family=pipe.family.name)
    assert "input_blocks.0.0.extra" in str(err.value) or "out.0.weight" in str(err.value)


def test_tiled_vae_and_deepcache_on_a_checkpoint(sd15):
    from ldmkit.accel.cache import deepcache

    kind, _, _, pipe = sd15
    kw = dict(steps=6, sampler="dpmpp_2m", seed=0, height=96, width=96, progress=False)
    full = pipe(PROMPTS, output="tensor", **kw)
    tiled = pipe(PROMPTS, output="tensor", vae_tile=8, **kw)
    assert tiled.shape == full.shape and (tiled - full).abs().mean() < 0.1
    with deepcache(pipe, interval=2) as cached:
        fast = pipe(PROMPTS, output="latent", **kw)
    assert cached.cached_calls > 0 and pipe.denoiser.net.unet is pipe.unet  # restored
    exact = pipe(PROMPTS, output="latent", **kw)
    assert torch.isfinite(fast).all() and not torch.equal(fast, exact)


def test_sd2_text_encoder_drops_the_unused_last_block_and_keeps_it():
    from ldmkit.interop.clip import encode_prompt_hidden, hf_to_openclip
    from ldmkit.interop.families import FAMILIES
    from ldmkit.interop.load import _text_encoder_from_single

    cfg = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=24,
        num_attention_heads=1, max_position_embeddings=77, hidden_act="gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0, projection_dim=64,
    )  # fmt: skip
    torch.manual_seed(0)
    full = randomize(transformers.CLIPTextModelWithProjection(cfg), 7)
    openclip, _ = hf_to_openclip(dict(full.state_dict()))
    spec = FAMILIES["sd2-v"].text_encoders[0]
    model, used, leftover = _text_encoder_from_single(openclip, spec)
    assert model.config.num_hidden_layers == 23 and used.layer == "last"
    assert "text_projection" in leftover
    assert any(k.startswith("transformer.resblocks.23.") for k in leftover)
    ids = clip_tokenizer(pad_token="!")(PROMPTS, padding="max_length", max_length=77,
                                        return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        ours, _ = encode_prompt_hidden(model, ids, "last", True)
        ref, _ = encode_prompt_hidden(full, ids, "penultimate", True)  # OpenCLIP's definition
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_low_precision_single_file_load_leaves_the_vae_exact(sd15, tmp_path):
    _, _, _, pipe = sd15
    single = save_single_file(pipe, tmp_path / "m.safetensors")
    low = load_stable_diffusion(single, dtype=torch.bfloat16)
    assert next(low.unet.parameters()).dtype == torch.bfloat16
    for k, v in pipe.vae.state_dict().items():  # not rounded through bf16 on the way in
        assert torch.equal(low.vae.state_dict()[k], v), k


def test_compiled_pipeline_matches_eager_at_new_sizes_without_recompiling(sd15):
    """``pipe.compile()`` with dynamo's guards and graphs (``aot_eager``: no code generation;
    the inductor backend itself is exercised in tests/test_compile.py)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    _, _, folder, _ = sd15
    pipe = load_stable_diffusion(folder)  # its own copy: compiling changes the pipeline
    kw = dict(steps=2, sampler="dpmpp_2m", seed=0, output="tensor", progress=False)
    sizes = [(PROMPTS[:1], 128, 128), (PROMPTS, 72, 88)]  # (no level down to one pixel)
    eager = [pipe(p, height=h, width=w, **kw) for p, h, w in sizes]
    torch._dynamo.reset()
    counters.clear()
    pipe.compile(backend="aot_eager")
    for (p, h, w), ref in zip(sizes, eager, strict=True):
        torch.testing.assert_close(pipe(p, height=h, width=w, **kw), ref, atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 2  # the UNet and the VAE decode
    torch._dynamo.reset()
